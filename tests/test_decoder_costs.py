"""benchmarks/decoder_costs.py: where each method trains, its counts against the arithmetic, and a quick recording.

The chapter reads the full recording and re-measures one method live; what is checked here is what it relies on:
the method names match the encoder sweep's, "where trained" names the adapted modules, the trainable counts follow
from SmolLM2's shapes, and the recording says how, where and with what it was made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import choosing_recorded  # noqa: E402 (benchmarks/ is not a package)
import decoder_costs  # noqa: E402


def test_the_decoder_has_every_method_of_the_encoder_sweep_but_the_head():
    assert set(decoder_costs.METHODS) == set(choosing_recorded.METHODS) - {"head only"}
    for name, make_config in decoder_costs.METHODS.items():
        config = make_config()
        assert name == "full fine-tuning" if config is None else config.task_type == "CAUSAL_LM", name


@pytest.mark.slow  # MiniLM, no training
def test_where_trained_names_the_adapted_modules_of_the_first_layer():
    build = {name: choosing_recorded.METHODS[name][0] for name in ("LoRA r=8", "Houlsby", "IA³", "P-tuning v2")}
    assert decoder_costs.where_trained(build["LoRA r=8"](0)) == (["attention.self.query", "attention.self.value"],
                                                                ["classifier"])
    assert decoder_costs.where_trained(build["Houlsby"](0)) == (["attention.output", "output"], ["classifier"])
    assert decoder_costs.where_trained(build["IA³"](0)) == (
        ["attention.self.key", "attention.self.value", "attention.output.dense", "output.dense"], ["classifier"])
    assert decoder_costs.where_trained(build["P-tuning v2"](0)) == ([], ["classifier", "prompt_encoder"])


@pytest.mark.slow  # SmolLM2: 2 methods on 2 pairs of 16 tokens
def test_quick_recording_counts_what_smollm2s_shapes_give(tmp_path):
    recording = decoder_costs.main(["--quick", "--out", str(tmp_path / "quick")])
    assert json.loads((tmp_path / "quick.json").read_text()) == recording
    config = recording["config"]
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    d_kv = config["num_key_value_heads"] * config["head_dim"]
    assert (layers, hidden, d_kv) == (30, 576, 192)   # grouped-query attention: 3 key/value heads of 64
    rows = {row["method"]: row for row in recording["methods"]}
    assert list(rows) == list(decoder_costs.QUICK_METHODS)
    lora, prefix = rows["LoRA r=8"], rows["P-tuning v2"]
    r, n = 8, 20
    assert lora["trainable parameters"] == layers * r * ((hidden + hidden) + (hidden + d_kv))   # q_proj, v_proj
    assert lora["trains in the first layer"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert lora["trains outside the layers"] == []
    assert prefix["trainable parameters"] == n * 2 * layers * d_kv   # a key and a value per layer and position
    assert prefix["trains in the first layer"] == [] and prefix["trains outside the layers"] == ["prompt_encoder"]
    trained_tensors = {"LoRA r=8": layers * 2 * 2, "P-tuning v2": 1}   # A and B of two projections; one prefix
    for name, row in rows.items():
        assert row["step memory (bytes)"] == (row["weights (bytes)"] + row["gradients + AdamW (bytes)"]
                                              + row["activations (bytes)"])
        # fp32 gradients and AdamW's two moments: 3 * 4 bytes per trained weight, and a 4-byte step count per tensor
        assert row["gradients + AdamW (bytes)"] == 12 * row["trainable parameters"] + 4 * trained_tensors[name]
        assert row["step FLOP"] > 2 * row["inference FLOP"] > 0
        assert row["inference FLOP"] > recording["base inference FLOP"]   # q/v products, or 20 more keys
    assert recording["batch"] == {**decoder_costs.QUICK_BATCH, "quick": True}
    assert recording["date"] and recording["machine"]["cpu"]
    assert all(recording["versions"][name] not in ("", "not installed") for name in ("torch", "transformers", "peft_edu"))
    report = (tmp_path / "quick.md").read_text()
    assert all(f"| {name} |" in report for name in rows)


def test_an_unknown_method_is_an_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'head only'; the methods are: full fine-tuning, LoRA r=8"):
        decoder_costs.measure("head only", None, {})
