"""Build the graded assignments: one student notebook and one autograder zip per chapter.

    python tools/assignments.py [--out _build/assignments] [--no-run-tests] [CHAPTER ...]

For each chapter notebook (an otter-grader master notebook) this runs ``otter assign`` and leaves

    <out>/<chapter>/student/<chapter>.ipynb       hand this out (solutions and hidden tests removed)
    <out>/<chapter>/autograder/<chapter>.ipynb    the solutions, with every test
    <out>/<chapter>/<chapter>-autograder.zip      upload to Gradescope, or grade locally with otter run

``otter assign`` grades the solutions with every test and fails if one does not pass (unless
``--no-run-tests``). Grading runs only the set-up cell and the exercises: the chapter's experiments
are tagged ``otter_ignore``, so a submission grades in seconds, not minutes.

The autograder's ``requirements.txt`` installs peft_edu from the repository named in ``_config.yml``
(its one place), so Gradescope's image has the checks the tests call.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MARKER = "# ASSIGNMENT CONFIG"


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
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter names (default: every notebook in notebooks/)")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "assignments")
    parser.add_argument("--no-run-tests", action="store_true", help="skip grading the solutions with every test")
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
        print(f"{chapter.stem}: student notebook {target / 'student' / chapter.name}, "
              f"autograder {target / (chapter.stem + '-autograder.zip')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
