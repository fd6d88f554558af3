"""What a chapter's exercise-check cases hold (``tests/test_checks.py``); the cases are in ``cases_<chapter>.py``.

A chapter names its otter master notebook (``notebooks/<chapter>.ipynb``, whose name is also the key of
``peft_edu.checks.CHAPTERS``), maps each question to the name the student defines and the check behind its
tests, says what the blank stub must no longer contain and how the check's feedback on it reads, and lists
plausible wrong answers, each with a pattern its feedback must match: the mistake's own message where the
check claims to recognise it, the generic message (or the crash's exception type) where it does not.

The reference solutions and the student stubs are not copied here: a chapter reads them from its notebook,
and the stub is produced by otter-grader's own ``replace_solutions`` (see ``notebook_helpers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path


from notebook_helpers import Question, read_questions, run_cells, student_stub

from peft_edu import checks

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass
class Chapter:
    name: str                                   # the notebook's stem and the key of peft_edu.checks.CHAPTERS
    questions: dict[str, tuple[str, checks.Exercise]]  # question -> (the name the student defines, its check)
    stub_must_not_contain: tuple[str, ...]     # solution fragments the blank stub must have lost
    stub_feedback: str                          # what the check says about the blank stub (a regex)
    wrong: dict[str, list[tuple[str, object, str]]]  # question -> [(name, wrong answer, feedback pattern)]
    crashes: list[tuple[str, str, object, str]] = field(default_factory=list)  # extra (question, name, answer, pattern)
    fitted_by_hand: tuple[str, ...] = ()        # questions whose fitted-answer test is the chapter's own

    @cached_property
    def notebook(self) -> dict[str, Question]:
        return read_questions(NOTEBOOKS / f"{self.name}.ipynb")

    def check(self, q: str) -> checks.Exercise:
        return self.questions[q][1]

    def reference(self, q: str):
        return run_cells(self.notebook[q].solution)[self.questions[q][0]]

    def stub(self, q: str):
        return run_cells([student_stub(s) for s in self.notebook[q].solution])[self.questions[q][0]]

    def seeds(self, q: str) -> list[int]:
        """The public test's seed (0) and the hidden tests' seeds, as the notebook has them."""
        return [0] + self.notebook[q].hidden_seeds
