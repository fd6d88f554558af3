"""benchmarks/choosing_recorded.py: the learning-rate choice, the bad-input error, and a ``--quick`` sweep's recording.

The quick sweep's accuracies mean nothing (2 steps); what is checked is the bookkeeping the chapter relies on: every
grid run is there, the chosen rate follows the validation accuracies by the stated rule, the other seeds ran at the
chosen rate only, and the recording says how, where and with what it was made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import peft_edu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import choosing_recorded  # noqa: E402 (benchmarks/ is not a package)


def grid_run(method, lr, validation, seed=0):
    return {"method": method, "learning rate": lr, "seed": seed, "validation accuracy": validation}


def test_choose_takes_the_best_validation_accuracy_and_the_smaller_rate_on_a_tie():
    runs = [grid_run("A", 1e-3, 0.70), grid_run("A", 3e-3, 0.80), grid_run("A", 9e-3, 0.75),
            # a tie between the two larger rates: the smaller of them wins, listed after the larger one
            grid_run("B", 3e-2, 0.60), grid_run("B", 9e-2, 0.65), grid_run("B", 2.7e-1, 0.65),
            grid_run("C", 1e-4, 0.50),
            # a tie at the top, smaller rate listed last
            grid_run("D", 9e-3, 0.55), grid_run("D", 3e-3, 0.55)]
    assert choosing_recorded.choose(runs) == {"A": 3e-3, "B": 9e-2, "C": 1e-4, "D": 3e-3}
    assert choosing_recorded.choose(runs[::-1]) == {"A": 3e-3, "B": 9e-2, "C": 1e-4, "D": 3e-3}


def test_choose_ignores_the_seeds_run_only_at_the_chosen_rate():
    runs = [grid_run("A", 1e-3, 0.70), grid_run("A", 3e-3, 0.65), grid_run("A", 3e-3, 0.95, seed=1)]
    assert choosing_recorded.choose(runs) == {"A": 1e-3}


def test_grid_is_three_rates_a_factor_3_apart_around_the_centre():
    for name, (_, centre) in choosing_recorded.METHODS.items():
        low, middle, high = choosing_recorded.grid(name)
        assert middle == centre and low == pytest.approx(centre / 3) and high == pytest.approx(3 * centre), name


def test_an_unknown_method_is_an_error_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        choosing_recorded.parse_args(["--methods", "LoRA r=8,LoRA r=16", "--out", "x"])
    error = capsys.readouterr().err
    assert "LoRA r=16" in error and all(name in error for name in choosing_recorded.METHODS)
    with pytest.raises(ValueError, match="unknown method 'LoRA r=16'.*prompt tuning"):
        choosing_recorded.run_one("LoRA r=16", 1e-3, 0)


@pytest.fixture
def restore_threads():  # --jobs 1 trains in this process with one torch thread
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # trains MiniLM: 10 runs of 2 steps
def test_quick_sweep_records_every_grid_run_and_chooses_by_validation(tmp_path, restore_threads):
    choosing_recorded.main(["--quick", "--out", str(tmp_path / "quick")])
    recording = json.loads((tmp_path / "quick.json").read_text())
    methods = list(choosing_recorded.QUICK_METHODS)
    seeds = choosing_recorded.QUICK_SETTINGS["seeds"]
    assert list(recording["grid"]) == methods and list(recording["chosen"]) == methods
    runs = recording["runs"]
    for method in methods:
        rates = recording["grid"][method]
        assert rates == choosing_recorded.grid(method)
        grid_runs = {r["learning rate"]: r for r in runs if r["method"] == method and r["seed"] == seeds[0]}
        assert sorted(grid_runs) == rates  # one seed-0 run per rate of the grid, no other
        best = max(r["validation accuracy"] for r in grid_runs.values())
        chosen = recording["chosen"][method]
        assert chosen == min(lr for lr, r in grid_runs.items() if r["validation accuracy"] == best)
        later = [r for r in runs if r["method"] == method and r["seed"] != seeds[0]]
        assert sorted(r["seed"] for r in later) == seeds[1:] and {r["learning rate"] for r in later} == {chosen}
        (row,) = [row for row in recording["summary"] if row["method"] == method]
        assert row["chosen rate"] == chosen and sorted(row["seeds"]) == seeds
        assert row["grid validation accuracy"] == [grid_runs[lr]["validation accuracy"] for lr in rates]
    assert len(runs) == len(methods) * (3 + len(seeds) - 1)
    for run in runs:
        assert run["steps"] == 2  # 32 sentences in batches of 16
        assert 0 <= run["validation accuracy"] <= 1 and 0 <= run["test accuracy"] <= 1
        assert 0 < run["trainable parameters"] < run["all parameters"] and run["training time (s)"] > 0
        assert run["training loss (mean of the last epoch)"] > 0
    assert recording["command"].endswith("choosing_recorded.py --quick --out " + str(tmp_path / "quick"))
    assert recording["machine"]["cpu"] and recording["machine"]["cpu_cores"] >= 1 and recording["date"]
    assert all(recording["versions"][name] not in ("", "not installed") for name in ("torch", "transformers",
                                                                                     "peft_edu", "python"))
    assert recording["settings"]["train examples"] == 32 and recording["settings"]["quick"] is True
    report = (tmp_path / "quick.md").read_text()
    assert all(f"| {method} |" in report for method in methods)


@pytest.mark.slow  # trains MiniLM: 5 runs of 2 steps
def test_the_bbc_sweep_trains_a_five_way_head_on_bbc_news_at_its_own_length(tmp_path, restore_threads):
    choosing_recorded.main(["--task", "bbc", "--quick", "--methods", "LoRA r=8", "--out", str(tmp_path / "bbc")])
    recording = json.loads((tmp_path / "bbc.json").read_text())
    assert recording["task"] == "bbc" and recording["settings"]["quick"] is True
    assert recording["settings"]["max length"] == choosing_recorded.QUICK_OVERRIDES["max length"]
    lora = choosing_recorded.METHODS["LoRA r=8"][0]
    two_way, five_way = (peft_edu.count_parameters(lora(0, n))[0] for n in (2, 5))
    hidden = 384  # MiniLM's classifier: hidden -> num_labels, with a bias
    assert five_way - two_way == 3 * (hidden + 1)
    assert {run["trainable parameters"] for run in recording["runs"]} == {five_way}
    assert (tmp_path / "bbc.md").read_text().startswith("# Choosing a method, recorded sweep: BBC News on MiniLM")
    # the full BBC settings differ from polarity's only in the length, which BBC's longer texts need
    bbc, polarity = choosing_recorded.TASKS["bbc"][2], choosing_recorded.TASKS["polarity"][2]
    assert {k for k in polarity if bbc[k] != polarity[k]} == {"max length"} and bbc["max length"] == 48


def test_an_unknown_task_is_an_error_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        choosing_recorded.parse_args(["--task", "imdb", "--out", "x"])
    assert "imdb" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown task 'imdb'; the tasks are: polarity, bbc"):
        choosing_recorded.load_data("imdb")


def test_a_resumed_sweep_trains_only_the_runs_it_lacks(monkeypatch):
    """--resume: the runs an interrupted sweep printed are kept; a finished grid's missing seeds run at its chosen
    rate, an unfinished grid's missing rates run, and nothing that is there runs again."""
    trained = []

    def fake_run(name, lr, seed):
        trained.append((name, lr, seed))
        return {**grid_run(name, lr, 0.6, seed), "test accuracy": 0.6}

    monkeypatch.setattr(choosing_recorded, "_start_worker", lambda settings, task: None)
    monkeypatch.setattr(choosing_recorded, "_run_in_worker", fake_run)
    lora, prompt = choosing_recorded.grid("LoRA r=8"), choosing_recorded.grid("prompt tuning")
    done = [grid_run("LoRA r=8", lr, v) for lr, v in zip(lora, (0.7, 0.8, 0.5))] + [grid_run("LoRA r=8", lora[1], 0.75, 1)]
    done += [grid_run("prompt tuning", prompt[0], 0.55)]
    runs, chosen = choosing_recorded.sweep(["LoRA r=8", "prompt tuning"], choosing_recorded.SETTINGS, 1, done)
    assert sorted(trained) == sorted([("LoRA r=8", lora[1], 2), ("prompt tuning", prompt[1], 0), ("prompt tuning", prompt[2], 0),
                                      ("prompt tuning", prompt[1], 1), ("prompt tuning", prompt[1], 2)])
    assert chosen == {"LoRA r=8": lora[1], "prompt tuning": prompt[1]}   # 0.6, 0.6 over 0.55: the smaller of the tie
    assert len(runs) == len(done) + len(trained)


def test_a_grid_finished_by_the_resumed_sweep_keeps_the_seeds_it_has_at_the_chosen_rate(monkeypatch):
    """An extended grid: the first sweep's rates and the other seeds at its choice are there, one new rate is not.
    The new rate runs; when the old choice still wins, its seeds are not trained again (they were, once: a bug)."""
    trained = []

    def fake_run(name, lr, seed):
        trained.append((name, lr, seed))
        return {**grid_run(name, lr, 0.5, seed), "test accuracy": 0.5}

    monkeypatch.setattr(choosing_recorded, "_start_worker", lambda settings, task: None)
    monkeypatch.setattr(choosing_recorded, "_run_in_worker", fake_run)
    lora = choosing_recorded.grid("LoRA r=8")
    done = [grid_run("LoRA r=8", lr, v) for lr, v in zip(lora[:2], (0.7, 0.8))]
    done += [grid_run("LoRA r=8", lora[1], 0.75, seed) for seed in (1, 2)]
    runs, chosen = choosing_recorded.sweep(["LoRA r=8"], choosing_recorded.SETTINGS, 1, done)
    assert trained == [("LoRA r=8", lora[2], 0)]
    assert chosen == {"LoRA r=8": lora[1]} and len(runs) == len(done) + 1


def test_resume_reads_logs_and_recordings_and_keeps_a_run_found_twice_once(tmp_path):
    first, again = grid_run("LoRA r=8", 1e-3, 0.7), grid_run("LoRA r=8", 1e-3, 0.1)
    recording, log = tmp_path / "recording.json", tmp_path / "sweep.log"
    recording.write_text(json.dumps({"runs": [first], "date": "2026-12-04", "machine": {"wall_time_s": 60.0}}))
    log.write_text("resuming: ...\n" + json.dumps(again) + "\n" + json.dumps(grid_run("LoRA r=8", 3e-3, 0.6)) + "\n")
    done, sources = choosing_recorded.load_done([str(recording), str(log)])
    assert [(source["path"], source["runs kept"]) for source in sources] == [(str(recording), 1), (str(log), 1)]
    assert [(run["learning rate"], run["validation accuracy"]) for run in done] == [(1e-3, 0.7), (3e-3, 0.6)]
