"""Sandboxed grading (`make grade CHAPTER=adapters`) of the adapters chapter: right, blank, wrong, corrupt.

Submissions are built from the chapter's master notebook by ``tests/grading_helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

from grading_helpers import grade, needs_bwrap, submission

from peft_edu.grading import questions_of

ROOT = Path(__file__).resolve().parents[1]
MASTER = ROOT / "notebooks" / "adapters.ipynb"
FULL = {"q1": 1.0, "q2": 2.0, "q3": 2.0}

RIGHT = {
    "q1": "def bottleneck_params(d, reduction_factor):\n    m = d // reduction_factor\n    return 2 * d * m + m + d",
    "q2": ("def adapter_forward(h, W_down, b_down, W_up, b_up):\n"
           "    return h + torch.relu(h @ W_down.T + b_down) @ W_up.T + b_up"),
    "q3": "def ia3_scale_ffn(x, W, b, l):\n    return (x * l) @ W.T + b",
}
WRONG = {
    "q1": "def bottleneck_params(d, reduction_factor):\n    return 2 * d * (d // reduction_factor)",
    "q2": "def adapter_forward(h, W_down, b_down, W_up, b_up):\n    return torch.relu(h @ W_down.T + b_down) @ W_up.T + b_up",
    "q3": "def ia3_scale_ffn(x, W, b, l):\n    return (x @ W.T + b) * l",
}

pytestmark = needs_bwrap


def test_questions_come_from_the_master_notebook():
    assert [(q.name, q.points, q.answer) for q in questions_of(MASTER)] == [
        ("q1", 1.0, "bottleneck_params"), ("q2", 2.0, "adapter_forward"), ("q3", 2.0, "ia3_scale_ffn")]


def test_right_blank_wrong_and_corrupt_submissions(tmp_path):
    scores = grade(tmp_path, MASTER, {
        "right": submission(MASTER, RIGHT), "blank": submission(MASTER, {}),
        **{f"wrong_{q}": submission(MASTER, RIGHT | {q: answer}) for q, answer in WRONG.items()},
        "corrupt": '{"cells": [ this is not json',
    })
    assert scores["right"] == FULL
    assert scores["blank"] == dict.fromkeys(FULL, 0.0)
    assert scores["corrupt"] == dict.fromkeys(FULL, 0.0)
    for q in WRONG:
        assert scores[f"wrong_{q}"] == FULL | {q: 0.0}
    feedback = tmp_path / "out" / "feedback"
    assert "the two weight matrices only" in (feedback / "wrong_q1.md").read_text()
    assert "residual (skip) connection" in (feedback / "wrong_q2.md").read_text()
    assert "scaled the layer's output" in (feedback / "wrong_q3.md").read_text()
    assert "could not be read as a notebook" in (feedback / "corrupt.md").read_text()
