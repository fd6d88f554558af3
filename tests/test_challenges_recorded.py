"""benchmarks/challenges_recorded.py: the three experiments' design, the reuse of the sweep's runs, and a quick run.

The quick run's accuracies mean nothing (2 steps); what is checked is what the chapter relies on: the runs it plots
are the ones the docstring describes, each data-size run keeps the 60-step budget, and the recording says how,
where and with what it was made.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import challenges_recorded as challenges  # noqa: E402 (benchmarks/ is not a package)
import choosing_recorded  # noqa: E402


def test_every_training_set_size_keeps_the_sweeps_60_steps():
    base = choosing_recorded.SETTINGS
    assert challenges.steps_of(base) == 60
    for size, epochs in [(80, 12), (240, 4), (960, 1)]:
        settings = challenges.data_size_settings(size, base)
        assert settings["train examples"] == size and settings["epochs"] == epochs
        assert challenges.steps_of(settings) == 60
    with pytest.raises(ValueError, match="100 sentences make 7 batches, which do not divide 60 steps"):
        challenges.data_size_settings(100, base)


def test_the_full_run_list_is_the_documented_design():
    chosen = json.loads(Path(challenges.SWEEP_RECORDING).read_text())["chosen"]
    specs = challenges.jobs_to_run(False, chosen)
    grid = [s for s in specs if s["experiment"] == "rank-rate"]
    sizes = [s for s in specs if s["experiment"] == "data-size"]
    assert len([s for s in specs if s["experiment"] == "transfer"]) == 3
    assert len(grid) == 2 * 4 * 5 * 3 and len({challenges._key(s) for s in specs}) == len(specs)
    assert {s["rank"] for s in grid} == {2, 8, 32, 128} and {s["seed"] for s in grid} == {0, 1, 2}
    rates = sorted({s["learning rate"] for s in grid})
    assert 5e-3 in rates and all(b / a == pytest.approx(3) for a, b in zip(rates, rates[1:]))
    # the 960-sentence cells come from the sweep, not from new runs; the others train at the sweep's chosen rate
    assert {s["train examples"] for s in sizes} == {80, 240} and len(sizes) == 3 * 2 * 3
    assert all(s["learning rate"] == chosen[s["method"]] for s in sizes)


def test_the_sweeps_runs_fill_the_full_size_cells():
    sweep = json.loads(Path(challenges.SWEEP_RECORDING).read_text())
    rows = challenges.sweep_runs_at_full_size(sweep)
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        (name, seed) for name in challenges.DATA_SIZE_METHODS for seed in (0, 1, 2))
    assert all(r["learning rate"] == sweep["chosen"][r["method"]] and r["train examples"] == 960 for r in rows)


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 128), (True, 16 / math.sqrt(128))])
def test_the_two_scalings_are_alpha_over_r_and_alpha_over_sqrt_r(rslora, expected):
    model = challenges.lora_variant(128, rslora)(0)
    scalings = [m.scaling for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]
    assert len(scalings) == 2 * 6 and scalings == pytest.approx([expected] * len(scalings))  # query, value x 6 layers


def test_a_resumed_run_trains_only_what_it_lacks(monkeypatch):
    trained = []
    monkeypatch.setattr(challenges, "_start_worker", lambda settings: None)
    monkeypatch.setattr(challenges, "run_spec", lambda spec: trained.append(spec) or {**spec, "test accuracy": 0.5})
    specs = [{"experiment": "rank-rate", "scaling": "alpha / r", "rank": r, "learning rate": 5e-3, "seed": 0}
             for r in (2, 8)]
    done = [{**specs[0], "test accuracy": 0.7}, {**specs[0], "rank": 999, "test accuracy": 0.1}]  # one not asked for
    runs = challenges.run_all(specs, choosing_recorded.SETTINGS, 1, done)
    assert trained == [specs[1]] and len(runs) == 2 and runs[0]["test accuracy"] == 0.7


@pytest.fixture
def restore_threads():  # --jobs 1 trains in this process with one torch thread
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # trains MiniLM: 6 runs of 2 steps, and one transfer seed
def test_quick_run_records_the_three_experiments(tmp_path, restore_threads):
    challenges.main(["--quick", "--out", str(tmp_path / "quick")])
    recording = json.loads((tmp_path / "quick.json").read_text())
    runs = [run for run in recording["runs"] if run["experiment"] != "transfer"]
    (transfer,) = [run for run in recording["runs"] if run["experiment"] == "transfer"]
    assert len(runs) == 2 * 1 * 2 + 2 and all(run["steps"] == 2 for run in runs)
    assert list(transfer["starts"]) == list(challenges.TRANSFER_STARTS) and transfer["seed"] == 0
    assert all(0 <= start["test accuracy"] <= 1 and start["steps"] == 1 for start in transfer["starts"].values())
    assert {(r["scaling"], r["learning rate"]) for r in runs if r["experiment"] == "rank-rate"} == {
        (scaling, lr) for scaling in challenges.SCALINGS for lr in challenges.RATES[1:3]}
    assert {r["train examples"] for r in runs if r["experiment"] == "data-size"} == {16}
    for run in runs:
        assert 0 <= run["validation accuracy"] <= 1 and 0 <= run["test accuracy"] <= 1 and run["trainable parameters"] > 0
    assert len(recording["summary"]["rank-rate"]) == 4 and len(recording["summary"]["data-size"]) == 2
    assert [row["start"] for row in recording["summary"]["transfer"]] == list(challenges.TRANSFER_STARTS)
    assert recording["command"].endswith("challenges_recorded.py --quick --out " + str(tmp_path / "quick"))
    assert recording["machine"]["cpu"] and recording["date"] and recording["versions"]["torch"] not in ("", "not installed")
    report = (tmp_path / "quick.md").read_text()
    assert "| alpha / sqrt(r) | 2 |" in report and "| LoRA r=8 | 0.005 |" in report and "| head only, base encoder | 1 |" in report


@pytest.mark.slow  # trains MiniLM on polarity for 2 steps
def test_the_four_transfer_starts_start_where_the_docstring_says(monkeypatch, restore_threads):
    """LoRA's usual start has B = 0; from the polarity adapter, A and B are the trained adapter's; the head-only
    starts train the head alone, on the merged polarity encoder or on the base encoder."""
    from peft_edu.assets import load_bbc_news, load_encoder
    import peft_edu.training

    torch.set_num_threads(1)
    seen = {}
    real_train = peft_edu.training.train

    def spy(model, *args, **kwargs):
        params = dict(model.named_parameters())
        seen[len(seen)] = {"B": [p.detach().clone() for n, p in params.items() if "lora_B" in n],
                           "A": {n: p.detach().clone() for n, p in params.items() if "lora_A" in n},
                           "trainable": sorted(n for n, p in params.items() if p.requires_grad),
                           "query": first_query_weight(model)}
        return real_train(model, *args, **kwargs)

    def first_query_weight(model):   # LoRA wraps the projection: its frozen weight is the base layer's
        query = model.bert.encoder.layer[0].attention.self.query
        return getattr(query, "base_layer", query).weight.detach().clone()

    monkeypatch.setattr(peft_edu.training, "train", spy)
    tokenizer, polarity = choosing_recorded.load_data()
    result = challenges.transfer(0, tokenizer, polarity, load_bbc_news(), choosing_recorded.QUICK_SETTINGS, quick=True)
    assert list(result["starts"]) == list(challenges.TRANSFER_STARTS) and len(seen) == 4
    usual, from_adapter, head_adapted, head_base = (seen[i] for i in range(4))
    base_query = load_encoder(num_labels=5)[1].bert.encoder.layer[0].attention.self.query.weight
    assert all(b.abs().max() == 0 for b in usual["B"]) and len(usual["B"]) == 12
    assert all(b.abs().max() > 0 for b in from_adapter["B"])  # the polarity adapter's B, trained for 2 steps
    assert any(not torch.equal(from_adapter["A"][n], usual["A"][n]) for n in usual["A"])
    assert head_adapted["trainable"] == head_base["trainable"] == ["classifier.bias", "classifier.weight"]
    assert torch.equal(head_base["query"], base_query) and not torch.equal(head_adapted["query"], base_query)
    assert all(run["steps"] == 1 for run in result["starts"].values())  # 16 articles, batch 16, 1 epoch


def test_an_unknown_transfer_start_is_an_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown start.*'LoRA, from BBC'.*head only, base encoder"):
        challenges.transfer(0, None, None, None, choosing_recorded.QUICK_SETTINGS, starts=["LoRA, from BBC"])


@pytest.mark.slow  # 2 runs of 1 step on BBC News
def test_starts_that_need_no_adapter_skip_the_polarity_source(restore_threads):
    from peft_edu.assets import load_bbc_news

    torch.set_num_threads(1)
    tokenizer, polarity = choosing_recorded.load_data()
    starts = ["LoRA, usual start", "head only, base encoder"]
    result = challenges.transfer(0, tokenizer, polarity, load_bbc_news(), choosing_recorded.QUICK_SETTINGS, quick=True,
                                 starts=starts)
    assert result["source test accuracy"] is None and list(result["starts"]) == starts
