"""The benchmark scripts run and report sane numbers: ``compare_methods.py --quick`` and ``gpu_check.py --cpu-dry-run``.

No timing target is checked here (timed tests on a shared machine would fail at random; the targets belong to the
benchmark's own report). What is checked: every method of the course is measured against its reference with equal
trainable counts, every ratio is a finite positive number, both sides of a pair compute the same first loss, and
the GPU check's CPU-safe parts run and write their files.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare_methods  # noqa: E402 (benchmarks/ is not a package)
import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow  # loads MiniLM and builds 22 adapted copies of it

MERGEABLE = {"LoRA", "rsLoRA (r=64)", "DoRA", "IA³"}
# peft_edu draws its initial weights from the seeded generator as PEFT does, so a PEFT pair starts as one model and
# its first (seeded) step gives one loss. AdapterHub draws its bottleneck adapters differently (measured on a tiny
# BERT: different values), so its pairs are the same architecture but not the same numbers.
SAME_INIT_UNDER_THE_SAME_SEED = "PEFT"


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_compare_methods_quick(tmp_path, restore_threads):
    record = compare_methods.run(["--quick", "--threads", "1", "--out", str(tmp_path / "quick")])
    (result,) = record["results"]
    rows = result["rows"]
    assert {r["method"] for r in rows} == {m.name for m in compare_methods.methods_for("SEQ_CLS", [])}
    for ratio in result["ratios"]:
        ours, theirs = [r for r in rows if r["method"] == ratio["method"]]
        assert ours["library"] == "peft_edu" and theirs["library"] == ratio["reference"]
        assert ours["trainable_params"] == theirs["trainable_params"] == ratio["trainable_params"] > 0
        if ratio["reference"] == SAME_INIT_UNDER_THE_SAME_SEED:  # one model: one loss on the first step
            assert ours["losses"][0] == pytest.approx(theirs["losses"][0], abs=1e-4), ratio["method"]
        numbers = {k: v for k, v in ratio.items() if k not in ("method", "reference", "trainable_params")}
        assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in numbers.values()), numbers
        merged = {k for k in numbers if k.startswith("inference merged")}
        assert merged == ({"inference merged b1", "inference merged b4"} if ratio["method"] in MERGEABLE else set())
    assert result["base"]["latency_b1_s"] > 0 and result["base"]["latency_b4_s"] > 0
    assert record["targets"] and all(isinstance(t["passed"], bool) for t in record["targets"])
    saved = json.loads((tmp_path / "quick.json").read_text())
    assert saved["command"] == record["command"] and saved["machine"]["adapters"]
    report = (tmp_path / "quick.md").read_text()
    assert "PASS" in report or "FAIL" in report
    assert "Houlsby (DoubleSeqBn) | AdapterHub" in report


def test_gpu_check_cpu_dry_run(tmp_path, restore_threads):
    assert gpu_check.main(["--cpu-dry-run", "--out-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["card"] == "cpu-dry-run" and record["versions"]["torch"] == torch.__version__
    statuses = {name: part["status"] for name, part in record["parts"].items()}
    assert statuses == {name: "ok" for name, *_ in gpu_check.PARTS}, {
        name: part.get("error") for name, part in record["parts"].items() if part["status"] != "ok"}
    for precision in ("float32", "bfloat16", "autocast_bf16"):
        assert (tmp_path / f"compare_methods_{precision}.md").is_file()
        assert json.loads((tmp_path / f"compare_methods_{precision}.json").read_text())["results"]
    parts = record["parts"]
    assert parts["gradient_checkpointing"]["result"]["adapter_tensors_without_gradient"] == 0
    assert parts["gradient_checkpointing"]["result"]["memory_with / without"] < 1
    assert parts["qlora"]["result"]["trainable_params"] > 0
    assert "| qlora | ok |" in (tmp_path / "gpu_check.md").read_text()
