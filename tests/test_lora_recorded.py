"""benchmarks/lora_recorded.py, the LoRA chapter's recorded sweep: its quick mode writes what the chapter reads.

The chapter trains seed 0 live and reads seeds 1 and 2 from the recording, so what is checked here is what that
needs: one row per method with the counts the chapter's claims use, full fine-tuning's top-8 energy shares, the
versions and settings that the page shows, and that a run is a function of its seed (the live seed can then be
compared with the recorded one).
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import lora_recorded  # noqa: E402 (benchmarks/ is not a package)

HIDDEN, LAYERS, RANK, HEAD = 384, 6, 8, 2 * 384 + 2  # all-MiniLM-L6-v2 and the chapter's LoRA (query, value; r=8)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cumulative_energy_of_a_known_spectrum():
    torch.manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(6, 6))
    right, _ = torch.linalg.qr(torch.randn(6, 6))
    update = left @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0])) @ right.T   # energies 9, 4, 1
    cumulative = lora_recorded.cumulative_energy(update)
    assert torch.allclose(cumulative[:3], torch.tensor([9 / 14, 13 / 14, 1.0]), atol=1e-5)
    assert torch.allclose(cumulative[3:], torch.ones(3), atol=1e-5)


def test_bad_thread_count_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lora_recorded.main(["--quick", "--threads", "0", "--out", str(tmp_path / "x")])
    assert "--threads 0" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow  # loads MiniLM for each of the three runs
def test_quick_sweep_records_what_the_chapter_reads(tmp_path, restore_threads):
    record = lora_recorded.main(["--quick", "--out", str(tmp_path / "quick")])
    saved = json.loads((tmp_path / "quick.json").read_text())
    assert saved["runs"] == record["runs"] and saved["command"].endswith("--quick --out " + str(tmp_path / "quick"))
    assert saved["versions"]["peft_edu"] == importlib.metadata.version("peft_edu")
    assert saved["versions"]["torch"] == torch.__version__ and saved["machine"]["torch_threads"] == 1
    assert saved["settings"]["quick"] and saved["seeds"] == [0]
    runs = {run["method"]: run for run in saved["runs"]}
    assert list(runs) == list(lora_recorded.METHODS) and all(run["seed"] == 0 for run in runs.values())
    assert {run["steps"] for run in runs.values()} == {2}
    n_test = lora_recorded.QUICK_SETTINGS["limit"]["test"]
    for name, run in runs.items():
        assert run["learning rate"] == lora_recorded.METHODS[name][1]
        assert (run["test accuracy"] * n_test) == pytest.approx(round(run["test accuracy"] * n_test)), run
        assert 0 <= run["test accuracy"] <= 1 and run["training time (s)"] > 0
    assert runs["head only"]["trainable parameters"] == HEAD
    assert runs["LoRA r=8"]["trainable parameters"] == LAYERS * 2 * RANK * (HIDDEN + HIDDEN) + HEAD
    full = runs["full fine-tuning"]
    assert full["trainable parameters"] == full["all parameters"] == runs["head only"]["all parameters"]
    shares = lora_recorded.TOP_K_SHARES
    assert [name for name, run in runs.items() if shares in run] == ["full fine-tuning"]
    assert len(full[shares]) == LAYERS and all(0 < share <= 1 for share in full[shares])
    report = (tmp_path / "quick.md").read_text()
    assert all(f"| {name} | 0 |" in report for name in lora_recorded.METHODS)


@pytest.mark.slow
def test_a_run_is_decided_by_its_seed(restore_threads):
    """The same seed gives the same run (what lets the chapter compare its live seed with the recorded one), and
    another seed another one."""
    torch.set_num_threads(1)
    tokenizer = lora_recorded.load_encoder(num_labels=2)[0]
    data = lora_recorded.load_polarity()

    def lora_factors(seed):
        _, model, _ = lora_recorded.run_one(tokenizer, data, "LoRA r=8", seed, lora_recorded.QUICK_SETTINGS,
                                            torch.device("cpu"))
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])

    first = lora_factors(0)
    assert torch.equal(first, lora_factors(0))
    assert not torch.allclose(first, lora_factors(1))
