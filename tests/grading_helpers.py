"""Shared by the grading tests: build a student's submission from a chapter's master notebook, grade a folder.

A submission is the master's cells with answers in place of the solutions and a ``grader.check`` cell in
place of each question's tests, as otter's student version has them.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nbformat
import pytest

from peft_edu import sandbox
from peft_edu.grading import grade_folder, questions_of


def _missing() -> str | None:
    try:
        sandbox.check_available()
    except RuntimeError as missing:
        return str(missing)
    return None


# The sandbox needs root (it runs submissions as nobody, in a cgroup of their own), bubblewrap and util-linux.
needs_sandbox = pytest.mark.skipif(_missing() is not None, reason=f"grading's sandbox cannot run here: {_missing()}")
needs_bwrap = needs_sandbox  # its former name


def submission(master_path: Path, answers: dict[str, str], before: list[str] = (), after: list[str] = ()) -> nbformat.NotebookNode:
    """The student's notebook with ``answers`` (question name -> code); ``before`` cells go right after the set-up."""
    master = nbformat.read(master_path, as_version=4)
    cells, question, in_solution, in_tests = [], None, False, False
    for cell in master.cells:
        if cell.cell_type == "raw":
            text = cell.source.strip()
            if text.startswith("# BEGIN QUESTION"):
                question = text.split("name:")[1].split()[0]
            in_solution = {"# BEGIN SOLUTION": True, "# END SOLUTION": False}.get(text, in_solution)
            in_tests = {"# BEGIN TESTS": True, "# END TESTS": False}.get(text, in_tests)
            if text == "# END TESTS":
                cells.append(nbformat.v4.new_code_cell(f'grader.check("{question}")'))
            continue
        if in_tests:
            continue
        cells.append(nbformat.v4.new_code_cell(answers.get(question, "...")) if in_solution else cell)
    setup = next(i for i, c in enumerate(cells) if c.cell_type == "code")
    cells[setup + 1:setup + 1] = [nbformat.v4.new_code_cell(s) for s in before]
    cells += [nbformat.v4.new_code_cell(s) for s in after]
    cells.insert(0, nbformat.v4.new_code_cell(f'import otter\ngrader = otter.Notebook("{master_path.name}")'))
    return nbformat.v4.new_notebook(cells=cells, metadata=master.metadata)


def grade(tmp_path: Path, master_path: Path, notebooks: dict[str, nbformat.NotebookNode | str],
          **limits) -> dict[str, dict[str, float]]:
    """Grade ``notebooks`` (name -> notebook, or raw file text) into ``tmp_path/out``; the scores per student.

    Also asserts that grading left every submission file untouched and that max points are the master's.
    """
    folder = tmp_path / "submissions"
    folder.mkdir(parents=True)
    for name, nb in notebooks.items():
        (folder / f"{name}.ipynb").write_text(nb if isinstance(nb, str) else nbformat.writes(nb))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    grade_folder(master_path, folder, tmp_path / "out", **limits)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert after == before, "grading modified a submission"
    most = {q.name: q.points for q in questions_of(master_path)}
    scores: dict[str, dict[str, float]] = {}
    with open(tmp_path / "out" / "gradebook.csv") as f:
        for row in csv.DictReader(f):
            scores.setdefault(row["student"], {})[row["question"]] = float(row["points"])
            assert float(row["max_points"]) == most[row["question"]]
    return scores
