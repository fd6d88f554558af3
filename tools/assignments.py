"""Build the graded assignments: one student notebook and one autograder zip per chapter.

    python tools/assignments.py [--out _build/assignments] [--no-run-tests] [CHAPTER ...]

For each chapter notebook (an otter-grader master notebook) this runs ``otter assign`` and leaves

    <out>/<chapter>/student/<chapter>.ipynb       hand this out (solutions and hidden tests removed)
    <out>/<chapter>/autograder/<chapter>.ipynb    the solutions, with every test
    <out>/<chapter>/<chapter>-autograder.zip      upload to Gradescope, or grade locally with otter run

and refreshes ``exercises/<chapter>.ipynb``, the self-study student version that each chapter page
links to for Colab: the student notebook with each ``grader.check`` replaced by the public check
itself, so it needs no otter set-up (the hidden tests stay out).

``otter assign`` grades the solutions with every test and fails if one does not pass (unless
``--no-run-tests``). Grading runs only the set-up cell and the exercises: the chapter's experiments
are tagged ``otter_ignore``, so a submission grades in seconds, not minutes.

The autograder's ``requirements.txt`` installs peft_edu from the repository named in ``_config.yml``
(its one place), so Gradescope's image has the checks the tests call.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import yaml
from sync_setup_cells import LINK_MARKER  # this folder is on sys.path when the script runs

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MARKER = "# ASSIGNMENT CONFIG"
INIT_MARKER = "# Initialize Otter"  # the first line of the cell otter assign adds
SETUP_MARKER = "# Set-up (the same in every chapter)"


def grading_requirements() -> str:
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    return f"peft_edu @ git+{url}\n"


def build(chapter: Path, out: Path, run_tests: bool) -> Path:
    """Run otter assign on one master notebook; return the chapter's output folder."""
    target = out / chapter.stem
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "requirements.txt").write_text(grading_requirements())
        master = nbformat.read(chapter, as_version=4)
        config_cell = next(c for c in master.cells if c.cell_type == "raw" and c.source.startswith(CONFIG_MARKER))
        config = yaml.safe_load(config_cell.source.removeprefix(CONFIG_MARKER)) or {}
        config["requirements"] = "requirements.txt"
        config.setdefault("python_version", "3.11")  # the version the course's pinned set is verified on
        config_cell.source = CONFIG_MARKER + "\n" + yaml.safe_dump(config, sort_keys=False)
        nbformat.write(master, work / chapter.name)
        command = [sys.executable, "-m", "otter", "assign", chapter.name, str(target.resolve())]
        if not run_tests:
            command.insert(4, "--no-run-tests")
        result = subprocess.run(command, cwd=work, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"otter assign failed for {chapter.name}:\n{result.stdout}\n{result.stderr}")
    zips = sorted((target / "autograder").glob("*.zip"))
    if len(zips) != 1:
        raise SystemExit(f"expected one autograder zip in {target / 'autograder'}, found {[z.name for z in zips]}")
    zips[0].rename(target / f"{chapter.stem}-autograder.zip")  # a stable name instead of otter's timestamp
    init_otter_after_setup(target / "student" / chapter.name)
    return target


def init_otter_after_setup(student_notebook: Path) -> None:
    """Move otter's ``import otter`` cell, which otter assign puts first, to just after the set-up cell: on Colab
    the set-up cell is what installs otter-grader, so a student running the notebook top to bottom needs it first."""
    student = nbformat.read(student_notebook, as_version=4)
    init = next(c for c in student.cells if c.cell_type == "code" and c.source.startswith(INIT_MARKER))
    student.cells.remove(init)
    setup = next(i for i, c in enumerate(student.cells) if c.cell_type == "code" and c.source.startswith(SETUP_MARKER))
    student.cells.insert(setup + 1, init)
    nbformat.write(student, student_notebook)


def publish_exercises(chapter: Path, student_notebook: Path, exercises_dir: Path) -> Path:
    """Write the self-study version: otter's student notebook, with the public checks inline."""
    master = nbformat.read(chapter, as_version=4)
    public_tests, question = {}, None
    for cell in master.cells:
        if cell.cell_type == "raw" and cell.source.startswith("# BEGIN QUESTION"):
            question = yaml.safe_load(cell.source.split("\n", 1)[1])["name"]
        elif cell.cell_type == "code" and question and cell.source.startswith("def test_") and question not in public_tests:
            public_tests[question] = cell.source
    student = nbformat.read(student_notebook, as_version=4)
    cells = []
    for cell in student.cells:
        if cell.cell_type == "code" and cell.source.startswith(INIT_MARKER):
            continue
        if cell.cell_type == "markdown" and cell.source.startswith(LINK_MARKER):
            continue  # the link to this very notebook
        check = re.fullmatch(r'grader\.check\("(\w+)"\)', cell.source.strip()) if cell.cell_type == "code" else None
        if check:
            cell = nbformat.v4.new_code_cell("# Check your answer (run me)\n" + public_tests[check.group(1)])
            cell.id = f"check-{check.group(1)}"  # stable, so that rebuilding changes nothing
        if "otter_answer_cell" in cell.metadata.get("tags", []):
            cell.metadata["tags"] = ["otter_answer_cell"]  # the book folds solutions; a learner's answer stays open
        cells.append(cell)
    student.cells = cells
    student.metadata.pop("otter", None)
    exercises_dir.mkdir(exist_ok=True)
    target = exercises_dir / chapter.name
    nbformat.write(student, target)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter names (default: every notebook in notebooks/)")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "assignments")
    parser.add_argument("--no-run-tests", action="store_true", help="skip grading the solutions with every test")
    parser.add_argument("--exercises", type=Path, default=ROOT / "exercises", help="where the self-study versions go")
    args = parser.parse_args(argv)
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.chapters:
        known = {p.stem: p for p in notebooks}
        unknown = [c for c in args.chapters if c not in known]
        if unknown:
            parser.error(f"unknown chapter(s) {unknown}; chapters are {sorted(known)}")
        notebooks = [known[c] for c in args.chapters]
    for chapter in notebooks:
        target = build(chapter, args.out, run_tests=not args.no_run_tests)
        exercises = publish_exercises(chapter, target / "student" / chapter.name, args.exercises)
        print(f"{chapter.stem}: student notebook {target / 'student' / chapter.name}, "
              f"autograder {target / (chapter.stem + '-autograder.zip')}, self-study version {exercises}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
