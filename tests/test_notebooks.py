"""The chapter notebooks are well-formed course material: set-up cell, no stale outputs, graded exercises."""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def cells(path):
    return json.loads(path.read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


def toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        for chapter in part["chapters"]:
            files += [chapter["file"]] + [section["file"] for section in chapter.get("sections", [])]
    return files


def test_there_are_chapters():
    assert NOTEBOOKS, "notebooks/ has no chapter"


def test_setup_cells_match_the_repository_url_in_config():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "sync_setup_cells.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_the_book(path):
    assert f"notebooks/{path.stem}" in toc_files()


def test_make_runs_every_chapter_of_the_book_once():
    """`make test` executes the chapters it lists (CHAPTERS in the Makefile) beside the unit tests, into the cache the
    strict build renders from; a chapter missing there would still run, but alone in the build, after the rest."""
    listed = re.search(r"^CHAPTERS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    in_book = [f.removeprefix("notebooks/") for f in toc_files() if f.startswith("notebooks/")]
    assert len(listed) == len(set(listed)), f"the Makefile's CHAPTERS names a chapter twice: {listed}"
    assert sorted(listed) == sorted(in_book), (
        f"the Makefile's CHAPTERS ({listed}) and the notebooks of _toc.yml ({in_book}) differ: list each chapter "
        "once, longest-running first")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_stored_outputs(path):
    """The book executes every notebook; stored outputs would be stale numbers nobody reran."""
    stale = [i for i, c in enumerate(cells(path)) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    assert not stale, f"cells {stale} of {path.name} have outputs: clear them (Kernel → Restart & Clear Output)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_an_otter_master_with_graded_questions(path):
    cs = cells(path)
    raws = [(i, source(c)) for i, c in enumerate(cs) if c["cell_type"] == "raw"]
    assert any(s.startswith("# ASSIGNMENT CONFIG") for _, s in raws)
    config = yaml.safe_load(next(s for _, s in raws if s.startswith("# ASSIGNMENT CONFIG")).split("\n", 1)[1])
    assert config["tests"]["ok_format"] is False  # exception-based tests: the checks' messages reach the learner
    starts = [i for i, s in raws if s.startswith("# BEGIN QUESTION")]
    ends = [i for i, s in raws if s.startswith("# END QUESTION")]
    assert len(starts) >= 3 and len(starts) == len(ends)
    names = []
    for start, end in zip(starts, ends):
        question = yaml.safe_load(source(cs[start]).split("\n", 1)[1])
        names.append(question["name"])
        assert question["points"] > 0
        inside = cs[start + 1:end]
        solutions = [c for c in inside if c["cell_type"] == "code" and "SOLUTION" in source(c)]
        tests = [c for c in inside if c["cell_type"] == "code" and re.search(r"^def test_", source(c), re.M)]
        hidden = [c for c in tests if source(c).startswith("# HIDDEN")]
        assert solutions, f"question {question['name']} has no solution cell"
        assert all(c["metadata"].get("tags") == ["hide-input"] for c in solutions), "solutions are folded in the book"
        assert len(tests) >= 2 and hidden, f"question {question['name']} needs a public and a hidden test"
        assert all("remove-cell" in c["metadata"].get("tags", []) for c in tests), "tests never show in the book"
        assert all("peft_edu.checks" in source(c) for c in tests), "tests call the checks in peft_edu.checks"
        assert any(c["cell_type"] == "markdown" for c in inside), f"question {question['name']} has no prompt"
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_cites_papers_by_arxiv_id(path):
    text = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")
    assert "## References" in text
    assert re.search(r"arXiv \[\d{4}\.\d{5}\]", text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_grading_runs_only_the_setup_and_the_exercises(path):
    """Experiments are tagged otter_ignore: a submission grades in seconds and its score never depends on them."""
    inside, untagged = False, []
    for i, c in enumerate(cells(path)):
        text = source(c)
        if c["cell_type"] == "raw":
            inside = {"# BEGIN QUESTION": True, "# END QUESTION": False}.get(text.split("\n")[0], inside)
        elif c["cell_type"] == "code" and not inside and not text.startswith("# Set-up (the same in every chapter)"):
            if "otter_ignore" not in c["metadata"].get("tags", []):
                untagged.append(i)
    assert not untagged, f"cells {untagged} of {path.name} run during grading: tag them otter_ignore"


HIDDEN = {"remove-cell", "remove-input"}  # tags whose code the book does not show


def _module_level_names(tree: ast.Module) -> set[str]:
    """Names a cell binds for the cells after it (not a function's locals or parameters)."""
    bound = set()

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            return  # their bodies bind locals
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return  # their own scope too
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return bound


def _code(cell) -> ast.Module:
    # IPython's magics and shell escapes are not Python
    return ast.parse("\n".join(line for line in source(cell).splitlines() if not line.lstrip().startswith(("%", "!"))))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shown_code_uses_no_name_that_only_a_hidden_cell_defines(path):
    """A reader who runs the code the book shows (or unfolds) must not meet a NameError, or a value a hidden cell
    silently replaced: every name a shown cell reads comes from a shown cell (or from Python itself)."""
    shown, hidden_only, problems = set(dir(builtins)) | {"display", "get_ipython"}, set(), []
    for i, cell in enumerate(cells(path)):
        if cell["cell_type"] != "code":
            continue
        tree = _code(cell)
        bound = _module_level_names(tree)
        if HIDDEN & set(cell["metadata"].get("tags", [])):
            hidden_only |= bound
            shown -= bound
            continue
        everything_bound = bound | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} \
            | {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
        read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        if missing := sorted((read - everything_bound - shown) & hidden_only):
            problems.append(f"cell {i} reads {missing}")
        shown |= bound
        hidden_only -= bound
    assert not problems, f"{path.name}: shown code reads names that only hidden cells define: {problems}"


def _prompts(path) -> list[str]:
    """Each graded question's markdown (between its BEGIN QUESTION and END QUESTION cells), in order."""
    prompts, inside = [], None
    for cell in cells(path):
        text = source(cell)
        if cell["cell_type"] == "raw" and text.startswith("# BEGIN QUESTION"):
            inside = []
        elif cell["cell_type"] == "raw" and text.startswith("# END QUESTION"):
            prompts.append("\n".join(inside or []))
            inside = None
        elif inside is not None and cell["cell_type"] == "markdown":
            inside.append(text)
    return prompts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_an_exercise_whose_check_judges_the_dtype_says_which(path):
    """A check that rejects an answer in another dtype must be announced by its prompt: the public test runs one
    dtype and the hidden ones others, so an answer with `.float()` would pass here and lose its points in grading."""
    from peft_edu.checks import EXERCISES
    from peft_edu.grading import questions_of

    silent = []
    for question, prompt in zip(questions_of(path), _prompts(path), strict=True):
        judge = EXERCISES[question.check].judge
        module, code = inspect.getmodule(judge), inspect.getsource(judge)
        helpers = (getattr(module, name, None) for name in set(re.findall(r"\b(_\w+)\(", code)))
        code += "".join(inspect.getsource(helper) for helper in helpers if inspect.isfunction(helper))
        if ".dtype" in code and not re.search(r"dtype|float32|float64|torch\.bool", prompt):
            silent.append(f"{question.name} ({question.check})")
    assert not silent, f"{path.name}: these checks judge the answer's dtype, but the prompt never says which: {silent}"
