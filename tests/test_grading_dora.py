"""Sandboxed grading (`make grade CHAPTER=dora`) of the DoRA chapter: right, blank, wrong, corrupt.

Submissions are built from the chapter's master notebook as in ``tests/test_grading.py``: solutions replaced
by answers, test cells by ``grader.check`` calls.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nbformat
import pytest

from peft_edu.grading import grade_folder, questions_of

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

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="grading needs bubblewrap (make setup installs it: apt-get install bubblewrap)")


def submission(answers: dict[str, str]) -> nbformat.NotebookNode:
    """A student's notebook: the master's cells with `answers` in place of the solutions."""
    master = nbformat.read(MASTER, as_version=4)
    cells, question, in_solution, in_tests = [], None, False, False
    for cell in master.cells:
        if cell.cell_type == "raw":
            text = cell.source
            if text.startswith("# BEGIN QUESTION"):
                question = text.split("name:")[1].split()[0]
            in_solution = {"# BEGIN SOLUTION": True, "# END SOLUTION": False}.get(text.strip(), in_solution)
            if text.strip() == "# BEGIN TESTS":
                in_tests = True
            if text.strip() == "# END TESTS":
                in_tests = False
                cells.append(nbformat.v4.new_code_cell(f'grader.check("{question}")'))
            continue
        if in_tests:
            continue
        if in_solution:
            cell = nbformat.v4.new_code_cell(answers.get(question, "..."))
        cells.append(cell)
    cells.insert(0, nbformat.v4.new_code_cell('import otter\ngrader = otter.Notebook("dora.ipynb")'))
    return nbformat.v4.new_notebook(cells=cells, metadata=master.metadata)


def test_questions_come_from_the_master_notebook():
    assert [(q.name, q.points, q.answer) for q in questions_of(MASTER)] == [
        ("q1", 1.0, "weight_norm"), ("q2", 2.0, "dora_weight"), ("q3", 2.0, "dora_forward")]


def test_right_blank_wrong_and_corrupt_submissions(tmp_path):
    folder = tmp_path / "submissions"
    folder.mkdir()
    notebooks = {"right": submission(RIGHT), "blank": submission({}),
                 **{f"wrong_{q}": submission(RIGHT | {q: answer}) for q, answer in WRONG.items()}}
    for name, nb in notebooks.items():
        (folder / f"{name}.ipynb").write_text(nbformat.writes(nb))
    (folder / "corrupt.ipynb").write_text('{"cells": [ this is not json')
    grade_folder(MASTER, folder, tmp_path / "out")
    scores: dict[str, dict[str, float]] = {}
    with open(tmp_path / "out" / "gradebook.csv") as f:
        for row in csv.DictReader(f):
            scores.setdefault(row["student"], {})[row["question"]] = float(row["points"])
            assert float(row["max_points"]) == FULL[row["question"]]
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
