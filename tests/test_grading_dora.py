"""Sandboxed grading (`make grade CHAPTER=dora`) of the DoRA chapter: right, blank, wrong, corrupt.

Submissions are built from the chapter's master notebook by ``tests/grading_helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

from grading_helpers import grade, needs_bwrap, submission

from peft_edu.grading import questions_of

ROOT = Path(__file__).resolve().parents[1]
MASTER = ROOT / "notebooks" / "dora.ipynb"
FULL = {"q1": 1.0, "q2": 2.0, "q3": 2.0}

RIGHT = {
    "q1": "def weight_norm(W):\n    return (W * W).sum(dim=1).sqrt()",
    "q2": ("def dora_weight(W0, A, B, m, alpha, r):\n    V = W0 + alpha / r * B @ A\n"
           "    return (m / V.norm(dim=1)).unsqueeze(1) * V"),
    "q3": ("def dora_forward(x, W0, A, B, m, alpha, r):\n    V = W0 + alpha / r * B @ A\n"
           "    g = m / V.norm(dim=1).detach()\n    return (x @ V.T) * g"),
}
WRONG = {
    "q1": "def weight_norm(W):\n    return W.norm(dim=0)",
    "q2": ("def dora_weight(W0, A, B, m, alpha, r):\n    V = W0 + B @ A\n"
           "    return (m / V.norm(dim=1)).unsqueeze(1) * V"),
    "q3": ("def dora_forward(x, W0, A, B, m, alpha, r):\n    V = W0 + alpha / r * B @ A\n"
           "    return (x @ V.T) * (m / V.norm(dim=1))"),
}

pytestmark = needs_bwrap


def test_questions_come_from_the_master_notebook():
    assert [(q.name, q.points, q.answer) for q in questions_of(MASTER)] == [
        ("q1", 1.0, "weight_norm"), ("q2", 2.0, "dora_weight"), ("q3", 2.0, "dora_forward")]


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
    assert "wrong axis" in (feedback / "wrong_q1.md").read_text()
    assert "missing its scaling alpha / r" in (feedback / "wrong_q2.md").read_text()
    assert "gradient flows through ‖V‖" in (feedback / "wrong_q3.md").read_text()
    assert "could not be read as a notebook" in (feedback / "corrupt.md").read_text()
