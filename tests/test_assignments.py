"""`make assignments` end to end: otter assign builds the student and autograder versions of every
chapter, and otter run grades the solutions to full marks, the blank stub to zero and wrong answers
to partial marks. (Sandboxed grading of hostile submissions is a separate, later piece.)"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("assignments")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "assignments.py"), "--out", str(out),
                             "--exercises", str(out / "exercises")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def otter_grade(zip_path: Path, notebook: Path, out: Path) -> dict[str, float]:
    out.mkdir()
    result = subprocess.run([sys.executable, "-m", "otter", "run", "-a", str(zip_path), "-o", str(out), str(notebook)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = json.loads((out / "results.json").read_text())["tests"]
    return {t["name"]: t["score"] for t in tests if "score" in t}


def solution_lines_of(source: str) -> list[str]:
    """The code of a solution: lines marked ``# SOLUTION`` and lines between ``# BEGIN SOLUTION`` and
    ``# END SOLUTION`` (without comments; blank lines and lines too short to be telling left out)."""
    lines, inside = [], False
    for line in source.splitlines():
        if "BEGIN SOLUTION" in line or "END SOLUTION" in line:
            inside = "BEGIN SOLUTION" in line
            continue
        code = line.split("#")[0].strip()
        if (inside or line.rstrip().endswith("# SOLUTION")) and len(code) > 12:
            lines.append(code)
    return lines


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_student_version_has_no_solutions_or_hidden_tests(built, chapter):
    student = nbformat.read(built / chapter / "student" / f"{chapter}.ipynb", as_version=4)
    master = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    text = "\n".join(c.source for c in student.cells)
    assert "# SOLUTION" not in text and "BEGIN SOLUTION" not in text and "# HIDDEN" not in text
    solution_lines = [line for c in master.cells if c.cell_type == "code" and "SOLUTION" in c.source
                      for line in solution_lines_of(c.source)]
    assert solution_lines and not any(line in text for line in solution_lines)
    assert "grader.check(" in text
    # On Colab the set-up cell installs otter-grader: otter's init cell must come after it, and before any check.
    sources = [c.source for c in student.cells if c.cell_type == "code"]
    setup = next(i for i, s in enumerate(sources) if s.startswith("# Set-up (the same in every chapter)"))
    init = next(i for i, s in enumerate(sources) if "import otter" in s)
    first_check = next(i for i, s in enumerate(sources) if "grader.check(" in s)
    assert setup + 1 == init < first_check


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_autograder_zip_has_every_test_and_installs_peft_edu(built, chapter):
    with zipfile.ZipFile(built / chapter / f"{chapter}-autograder.zip") as archive:
        names = archive.namelist()
        assert any(n.startswith("tests/") for n in names)
        assert "peft_edu @ git+" in archive.read("environment.yml").decode()  # Gradescope's image installs it
        tests = [archive.read(n).decode() for n in names if n.startswith("tests/")]
    assert tests and all("hidden=True" in t and "hidden=False" in t for t in tests)


def test_lora_solutions_score_full_marks_and_the_stub_zero(built, tmp_path):
    zip_path = built / "lora" / "lora-autograder.zip"
    solved = otter_grade(zip_path, built / "lora" / "autograder" / "lora.ipynb", tmp_path / "solved")
    blank = otter_grade(zip_path, built / "lora" / "student" / "lora.ipynb", tmp_path / "blank")
    assert solved == {"q1": 1.0, "q2": 2.0, "q3": 1.0, "q4": 2.0, "q5": 2.0}
    assert blank == {"q1": 0, "q2": 0, "q3": 0, "q4": 0, "q5": 0}


def test_lora_wrong_answers_lose_their_points(built, tmp_path):
    """A submission with the right count, α instead of α/r in the forward, and the right merge."""
    student = nbformat.read(built / "lora" / "student" / "lora.ipynb", as_version=4)
    answers = {
        "def lora_param_count": "def lora_param_count(d_in, d_out, r):\n    return r * (d_in + d_out)",
        "def lora_forward": "def lora_forward(x, W0, A, B, alpha, r):\n    return x @ W0.T + alpha * (x @ A.T @ B.T)",
        "def merge_weight": "def merge_weight(W0, A, B, alpha, r):\n    return W0 + (alpha / r) * (B @ A)",
    }
    for cell in student.cells:
        for start, answer in answers.items():
            if cell.cell_type == "code" and cell.source.startswith(start):
                cell.source = answer
    submission = tmp_path / "lora.ipynb"
    nbformat.write(student, submission)
    scores = otter_grade(built / "lora" / "lora-autograder.zip", submission, tmp_path / "graded")
    assert scores == {"q1": 1.0, "q2": 0, "q3": 1.0, "q4": 0, "q5": 0}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_committed_self_study_version_is_up_to_date(built, chapter):
    """exercises/<chapter>.ipynb (what the chapter's Colab link opens) is what tools/assignments.py makes now."""
    fresh = nbformat.read(built / "exercises" / f"{chapter}.ipynb", as_version=4)
    committed = nbformat.read(ROOT / "exercises" / f"{chapter}.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in fresh.cells], \
        "run `make assignments` (or python tools/assignments.py) and commit exercises/"
    text = "\n".join(c.source for c in fresh.cells)
    assert "grader." not in text and "# HIDDEN" not in text and "# SOLUTION" not in text
    assert text.count("# Check your answer (run me)") == len(
        [c for c in nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4).cells
         if c.cell_type == "raw" and c.source.startswith("# BEGIN QUESTION")])
