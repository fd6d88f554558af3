"""The book's math renders without a network: MathJax is served from the built book, not from a CDN.

A one-page book with the course's own Sphinx settings (``_config.yml``'s ``sphinx`` section) and one equation is
built with the strict command; its page must load MathJax from ``_static/mathjax/`` and the file must be there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_math_is_served_from_the_built_book(tmp_path):
    script = Path(sys.executable).parent / "jupyter-book"
    jupyter_book = str(script) if script.exists() else shutil.which("jupyter-book")
    if not jupyter_book:
        pytest.skip("jupyter-book is not installed")
    course = yaml.safe_load((ROOT / "_config.yml").read_text())
    book = tmp_path / "book"
    book.mkdir()
    for name, folder in course["sphinx"].get("local_extensions", {}).items():  # relative to the course's root
        course["sphinx"]["local_extensions"][name] = str(ROOT / folder)
    course["sphinx"]["config"].pop("templates_path", None)  # the course's templates need its repository settings
    (book / "_config.yml").write_text(yaml.safe_dump({
        "title": "Offline math", "only_build_toc_files": True, "parse": course["parse"],
        "sphinx": course["sphinx"], "execute": {"execute_notebooks": "off"}}))
    (book / "_toc.yml").write_text("format: jb-book\nroot: index\n")
    (book / "index.md").write_text("# Math\n\n$$\nh = W_0 x + \\frac{\\alpha}{r} B A x\n$$ (lora)\n\nEq. {eq}`lora`.\n")
    out = tmp_path / "out"
    result = subprocess.run([jupyter_book, "build", str(book), "--path-output", str(out), "-W", "-n", "--keep-going"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = (out / "_build" / "html" / "index.html").read_text()
    sources = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', html, flags=re.I)
    assert sources and all(s.startswith("_static/mathjax/") for s in sources), sources
    assert all((out / "_build" / "html" / s).is_file() for s in sources)
    text = re.sub(r"<[^>]+>", "", html)  # the reference is a link: compare the text a reader sees
    assert "Eq. (1)." in text and "Eq. Eq." not in text
