"""Shared by the exercise-check tests: read an otter master notebook's questions, make otter's student
stub, run notebook cells, and insist that a check fails helpfully.

The stub comes from otter-grader's own ``replace_solutions``, so the tests see exactly what students get.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

with warnings.catch_warnings():  # otter's imports trip a traitlets DeprecationWarning that is not ours
    warnings.simplefilter("ignore", DeprecationWarning)
    from otter.assign.solutions import replace_solutions
    from otter.utils import get_source

from peft_edu.checks import CheckFailed


@dataclass
class Question:
    name: str
    solution: list[str] = field(default_factory=list)       # code cells between BEGIN/END SOLUTION
    public_tests: list[str] = field(default_factory=list)   # code cells between BEGIN/END TESTS
    hidden_tests: list[str] = field(default_factory=list)   # ... that start with "# HIDDEN"

    @property
    def hidden_seeds(self) -> list[int]:
        return [int(seed) for test in self.hidden_tests for seed in re.findall(r"\bseed\s*=\s*(\d+)", test)]


def read_questions(path: Path) -> dict[str, Question]:
    """The questions of an otter master notebook, with their solution and test cells."""
    nb = nbformat.read(path, as_version=4)
    questions: dict[str, Question] = {}
    question, block = None, None
    for cell in nb.cells:
        first = cell.source.lstrip().split("\n", 1)[0].strip() if cell.source.strip() else ""
        if cell.cell_type == "raw" and first.startswith("# BEGIN QUESTION"):
            config = yaml.safe_load(cell.source.split("\n", 1)[1])
            question = questions[config["name"]] = Question(config["name"])
        elif cell.cell_type == "raw" and first == "# END QUESTION":
            question = None
        elif cell.cell_type == "raw" and first in ("# BEGIN SOLUTION", "# BEGIN TESTS"):
            block = first.split()[-1]
        elif cell.cell_type == "raw" and first in ("# END SOLUTION", "# END TESTS"):
            block = None
        elif question is not None and cell.cell_type == "code" and block == "SOLUTION":
            question.solution.append(cell.source)
        elif question is not None and cell.cell_type == "code" and block == "TESTS":
            (question.hidden_tests if first == "# HIDDEN" else question.public_tests).append(cell.source)
    return questions


def student_stub(source: str) -> str:
    """What otter assign puts in the student notebook for a solution cell (otter's own code)."""
    return "\n".join(replace_solutions(get_source(nbformat.v4.new_code_cell(source)), "python"))


def run_cells(sources: list[str]) -> dict:
    """Run cells in a fresh namespace that, like the notebook's set-up cell, provides ``torch``."""
    namespace = {"torch": torch, "__name__": "__notebook__"}
    for source in sources:
        exec(compile(source, "<notebook cell>", "exec"), namespace)
    return namespace


def rejected(check, answer, seed: int) -> str:
    """Run the check, insist that it fails with CheckFailed, and return its message."""
    with pytest.raises(CheckFailed) as info:
        check(answer, seed=seed)
    return str(info.value)


def assert_helpful(message: str) -> None:
    assert message.strip() and "Traceback" not in message and not message.startswith("'NoneType'"), message
