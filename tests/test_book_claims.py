"""The book's claims mechanism works: a glued number reaches the HTML, and a false claim fails the strict build.

A tiny two-page Jupyter Book is written to a temporary folder (its own ``_config.yml`` and ``_toc.yml``, a
markdown root page and one small notebook that glues a number into its prose and checks one claim about it
in a hidden cell, tagged as the chapters tag theirs) and built with the course's strict command,
``jupyter-book build -W -n --keep-going``. It does not read the course's chapters or config.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from peft_edu.claims import ClaimFailed, claim, glue

ROOT = Path(__file__).resolve().parents[1]
STATEMENT = "the accuracy is above one half"


def test_claim_is_silent_when_it_holds():
    assert claim(0.8 > 0.5, STATEMENT, accuracy=0.8) is None


def test_claim_names_the_statement_and_the_evidence_when_false():
    with pytest.raises(AssertionError) as caught:   # ClaimFailed is an AssertionError: nbval and the build fail
        claim(0.25 > 0.5, STATEMENT, accuracy=0.25, threshold=0.5)
    assert isinstance(caught.value, ClaimFailed)
    assert STATEMENT in str(caught.value) and "accuracy=0.25" in str(caught.value) and "threshold=0.5" in str(caught.value)


def test_claim_needs_a_statement():
    with pytest.raises(TypeError):
        claim(True, "")


def test_glue_returns_the_formatted_text():
    assert glue("test_number", 13 / 16, ".4f") == "0.8125"


def jupyter_book() -> str:
    script = Path(sys.executable).parent / "jupyter-book"
    found = str(script) if script.exists() else shutil.which("jupyter-book")
    if not found:
        pytest.skip("jupyter-book is not installed")
    return found


def write_book(folder: Path, accuracy: str) -> None:
    (folder / "_config.yml").write_text(
        "title: Claims test\nauthor: test\nonly_build_toc_files: true\n"
        "execute:\n  execute_notebooks: cache\n  allow_errors: false\n  timeout: 300\n")
    (folder / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: page\n")
    (folder / "intro.md").write_text("# Intro\n\nA tiny book that tests the claims mechanism.\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A page\n\nWe compute an accuracy."),
        nbformat.v4.new_code_cell(f"from peft_edu.claims import claim, glue\n\naccuracy = {accuracy}\n"
                                  "_ = glue('accuracy', accuracy, '.4f')"),
        nbformat.v4.new_markdown_cell("The accuracy is {glue:text}`accuracy`, above one half."),
        nbformat.v4.new_code_cell(f"claim(accuracy > 0.5, {STATEMENT!r}, accuracy=accuracy)",
                                  metadata={"tags": ["remove-cell", "otter_ignore"]}),
    ]
    nbformat.write(nb, folder / "page.ipynb")


def build(folder: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([jupyter_book(), "build", str(folder), "-W", "-n", "--keep-going", "--path-output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_true_claim_builds_and_the_glued_number_is_in_the_page(tmp_path):
    book, out = tmp_path / "book", tmp_path / "out"
    book.mkdir()
    write_book(book, "13 / 16")
    result = build(book, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = (out / "_build" / "html" / "page.html").read_text()
    text = re.sub(r"<[^>]+>", "", html)
    assert "The accuracy is 0.8125, above one half." in text
    assert "claim(" not in html   # the hidden cell is removed from the page (it still ran)


def test_a_false_claim_fails_the_strict_build_and_names_the_statement(tmp_path):
    book, out = tmp_path / "book", tmp_path / "out"
    book.mkdir()
    write_book(book, "3 / 16")
    result = build(book, out)
    assert result.returncode != 0, "the strict build passed although the claim is false"
    output = result.stdout + result.stderr
    # myst-nb reports the failed execution and saves the traceback in reports/<page>.err.log
    reports = {Path(p) for p in re.findall(r"traceback saved in: (\S+\.err\.log)", output)}
    reports |= set((out / "_build" / "html" / "reports").glob("*.err.log"))
    logged = "".join(p.read_text() for p in reports if p.exists())
    assert STATEMENT in output + logged and "accuracy=0.1875" in output + logged, output[-3000:]
