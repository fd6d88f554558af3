"""benchmarks/decoder_recorded.py: the labels it trains on, the score, and a ``--quick`` sweep's recording.

The quick run's scores mean nothing (2 steps); what is checked is what the chapter relies on: the loss and the score
see only the answers' tokens, the sweep is the encoder sweep's (same rule for the rate), and the recording says how,
where and with what it was made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import choosing_recorded  # noqa: E402 (benchmarks/ is not a package)
import decoder_costs  # noqa: E402
import decoder_recorded  # noqa: E402


@pytest.fixture(scope="module")
def inputs():
    return decoder_recorded.load_data(decoder_recorded.QUICK_SETTINGS)


def test_the_methods_are_the_decoder_costs_methods_with_a_grid_each():
    assert list(decoder_recorded.METHODS) == list(decoder_costs.METHODS)
    for name, (_, centre) in decoder_recorded.METHODS.items():
        rates = decoder_recorded.grid(name)
        extension = decoder_recorded.EXTENDED.get(name, 0)
        expected = [centre / 3, centre, 3 * centre] + ([9 * centre] if extension == +1 else [])
        expected = ([centre / 9] if extension == -1 else []) + expected
        assert rates == pytest.approx(expected) and centre in rates, name


def test_the_extended_grids_keep_the_first_sweeps_rates_bit_for_bit():
    """--resume matches runs by their exact rate: the three rates of the first sweep must be the very same floats."""
    for name, (_, centre) in decoder_recorded.METHODS.items():
        first = [centre / 3, centre, centre * 3]
        assert set(first) <= set(decoder_recorded.grid(name)), name


@pytest.mark.slow  # SmolLM2's tokenizer and weights
def test_only_the_answer_and_its_end_of_turn_token_are_labelled(inputs):
    tokenizer, _, data = inputs
    rows = data["train"].select(range(4))
    (batch,) = decoder_recorded.qa_batches(tokenizer, rows, batch_size=4, max_length=64)
    whole = [i for i in range(4) if batch["attention_mask"][i].sum() < 64]   # not cut by max_length
    assert whole
    for i in whole:
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tokenizer.decode(labelled) == rows["answer"][i] + tokenizer.eos_token
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()   # no padding is scored


@pytest.mark.slow
def test_the_score_is_the_share_of_answer_tokens_predicted_given_the_text_before(inputs):
    tokenizer, base, data = inputs
    batches = decoder_recorded.qa_batches(tokenizer, data["validation"].select(range(2)), 2, 64)
    scores = decoder_recorded.answer_scores(base, batches, torch.device("cpu"))
    (batch,) = batches
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    scored = target != -100
    right = (logits[:, :-1].argmax(-1)[scored] == target[scored]).float().mean().item()
    assert scores["tokens"] == scored.sum().item() > 0
    assert scores["accuracy"] == pytest.approx(right)
    # the loss is transformers' own (it shifts the labels itself), on the same tokens
    own = base(**batch).loss.item()
    assert scores["loss"] == pytest.approx(own, rel=1e-5)


@pytest.mark.slow  # SmolLM2: 11 runs of 2 steps (LoRA's grid has four rates)
def test_quick_sweep_records_every_grid_run_and_chooses_by_validation(tmp_path):
    threads = torch.get_num_threads()
    try:
        recording = decoder_recorded.main(["--quick", "--out", str(tmp_path / "quick")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "quick.json").read_text()) == json.loads(json.dumps(recording))
    methods = list(decoder_recorded.QUICK_METHODS)
    runs = recording["runs"]
    # seed 0 at every rate of the grid, two more seeds at the chosen rate; 8 pairs in batches of 4
    assert len(runs) == sum(len(decoder_recorded.grid(method)) + 2 for method in methods)
    assert {run["steps"] for run in runs} == {2}
    assert recording["chosen"] == choosing_recorded.choose(runs)
    for method in methods:
        seed0 = sorted(r["learning rate"] for r in runs if r["method"] == method and r["seed"] == 0)
        assert seed0 == decoder_recorded.grid(method)
    counts = {run["method"]: run["trainable parameters"] for run in runs}
    assert counts["LoRA r=8"] == 460_800 and counts["prompt tuning"] == 20 * 576   # as decoder_costs counts them
    for run in runs:
        assert 0 <= run["test accuracy"] <= 1 and run["test loss"] > 0 and run["validation loss"] > 0
    floor = recording["untrained"]
    assert set(floor) == {"validation", "test"} and 0 < floor["test"]["accuracy"] < 1
    assert recording["settings"]["quick"] is True and recording["date"] and recording["machine"]["cpu"]
    assert (tmp_path / "quick.md").read_text().startswith("# Choosing a method on a decoder")


def test_an_unknown_method_is_an_error_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        decoder_recorded.main(["--methods", "head only", "--out", "x"])
    assert "head only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method 'head only'; the methods are: full fine-tuning"):
        decoder_recorded.prepared("head only", 0, None)
