"""tools/execute_notebooks.py fills the cache the build reads: the build must find the run, and a failure must not be
cached (else the strict build would render a chapter whose claim no longer holds)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_cache import get_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import execute_notebooks  # noqa: E402


def notebook(tmp_path, name, *sources):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A page")]
                                  + [nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(execute_notebooks, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def test_the_build_finds_the_run_with_its_outputs(tmp_path, cache_dir, capsys):
    path = notebook(tmp_path, "page.ipynb", "import os\nprint(os.getcwd())", "print(6 * 7)")
    assert execute_notebooks.main([str(path)]) == 0
    # What the build does: read the notebook as committed and look it up (no timings, no outputs in it).
    record = get_cache(str(cache_dir)).match_cache_notebook(nbformat.read(path, as_version=4))
    cells = get_cache(str(cache_dir)).get_cache_bundle(record.pk).nb.cells   # the cache keeps the code cells
    assert cells[0].outputs[0]["text"].strip() == str(tmp_path), "the notebook runs in its own folder, as in the build"
    assert cells[1].outputs[0]["text"] == "42\n"
    assert all("execution" not in cell.metadata for cell in cells)
    assert execute_notebooks.main([str(path)]) == 0
    assert "already ran" in capsys.readouterr().out


def test_a_failing_notebook_is_reported_and_not_cached(tmp_path, cache_dir, capsys):
    path = notebook(tmp_path, "broken.ipynb", "x = 1", "assert x == 2, 'the claim no longer holds'")
    assert execute_notebooks.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "broken.ipynb: FAILED" in err and "the claim no longer holds" in err
    with pytest.raises(KeyError):
        get_cache(str(cache_dir)).match_cache_notebook(nbformat.read(path, as_version=4))


def test_only_notebook_files_are_accepted(tmp_path, cache_dir, capsys):
    (tmp_path / "page.md").write_text("# not a notebook\n")
    with pytest.raises(SystemExit):
        execute_notebooks.main([str(tmp_path / "page.md"), str(tmp_path / "missing.ipynb")])
    err = capsys.readouterr().err
    assert "page.md" in err and "missing.ipynb" in err and ".ipynb" in err
