"""The browser check of the built book (tools/check_book_pages.py) finds each kind of problem and passes a good page.

Small pages written here, with the markup Jupyter Book gives a chapter (``.math`` spans, ``.cell_output .output``
areas) and the MathJax the book serves (from sphinx-mathjax-offline), are checked in one headless Chromium: one good
page full of what is legitimate (TeX in code and in a cell's printed output, "$" for money, a deliberate error message
printed by a cell, links to anchors), and one page per defect. They need the Debian package chromium: `make setup`.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_book_pages  # noqa: E402 - a script in tools/, not a package

SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 4 3"><rect width="4" height="3" fill="teal"/></svg>'


def page(body: str, head: str = "") -> str:
    """A page as Sphinx lays it out, with MathJax configured and loaded the way the book's pages load it."""
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title>
<script>window.MathJax = {{"options": {{"processHtmlClass": "tex2jax_process|mathjax_process|math|output_area"}}}}</script>
<script defer="defer" src="_static/mathjax/tex-chtml.js"></script>{head}</head>
<body><main><section class="tex2jax_ignore mathjax_ignore" id="top"><h1>Title</h1>{body}</section></main></body></html>"""


def output(kind: str, text: str) -> str:
    """A code cell's output area, as myst-nb writes it (kind: stream, stderr, traceback)."""
    return (f'<div class="cell_output docutils container"><div class="output {kind} highlight-myst-ansi notranslate">'
            f'<div class="highlight"><pre><span></span>{text}</pre></div></div></div>')


PAGES = {
    # Everything here is legitimate and must pass.
    "good.html": page(
        r'<p>For a layer <span class="math notranslate nohighlight">\(h = W_0 x\)</span>, LoRA adds'
        r' <span class="math notranslate nohighlight">\(\frac{\alpha}{r} B A x\)</span>:</p>'
        r'<div class="math notranslate nohighlight" id="equation-lora">\[h = W_0 x + \frac{\alpha}{r} B A x\]</div>'
        r'<p>Eq. <a href="#equation-lora">(1)</a> costs a GPU hour at $2 and a day of it at $48.</p>'
        r'<p>The flag <code>$r_{\text{max}}$</code> is code, and so is <code class="literal">\begin{align}</code>.</p>'
        r'<div class="cell_input"><div class="highlight"><pre>print(r"$$\frac{a}{b}$$")</pre></div></div>'
        + output("stream", r"$$\frac{a}{b}$$ \begin{align} x_{1} \end{align}")
        + output("stream", "ValueError: target_modules entry 'valeu' matches no module (what the cell shows on purpose)")
        + '<img src="figure.svg" alt="a figure">'
        + '<section id="second"><h2>Second</h2><p>See <a href="linked.html#part">the other page</a>, '
          '<a href="https://example.org/paper">a paper</a> and <a href="mailto:a@b.c">us</a>.</p></section>'),
    "linked.html": page('<section id="part"><h2>Part</h2><p>Back to <a href="good.html#second">good</a>.</p></section>'),
    "index.html": '<meta http-equiv="Refresh" content="0; url=good.html" />',
    # One defect per page.
    "raw_tex.html": page(r"<p>The update is $\frac{\alpha}{r} BA$, then</p><p>$$</p>"
                         r"<ul><li><p>+ s^2 \lVert x \rVert</p></li></ul>"),  # a formula broken into a list item
    "stderr.html": page(output("stderr", "There are adapters available but none are activated for the forward pass.")
                        + output("traceback", "Traceback (most recent call last):\n  ZeroDivisionError")),
    "noise.html": page(output("stream", "/home/me/peft_edu/x.py:3: UserWarning: position_ids is ignored")
                       + output("stream", "epoch 1/2\n{'loss': 0.6973, 'grad_norm': 0.29, 'epoch': 0.25}")
                       + output("stream", "USDT:2026-12-01 22:30:02 SyncActivityProfilerHandler.cpp:52] profiler_start")
                       + output("stream", "INFO:adapters.model_mixin:adding an adapter")),
    "broken_image.html": page('<img src="missing.png" alt="the lost plot"><img src="data:image/png;base64,AAAA" alt="bad">'),
    "broken_link.html": page('<p><a href="nowhere.html">gone</a>, <a href="good.html#no-such-anchor">no anchor</a>, '
                             '<a href="#not-here">not here</a>, <a href="index.html">the start</a>.</p>'),
    "eq_eq.html": page('<p>By Eq. <a href="#top">Eq. (3)</a> the update is small.</p>'),
    "dash.html": page('<p>Recorded by <span class="pasted-text">python x.py \u2013jobs 2 \u2013out y</span>.</p>'
                      '<p>Ranges (2\u20135), pairs (question\u2013answer) and a spaced dash \u2013 like this \u2013 are prose.</p>'),
    "console_error.html": page('<script>console.error("boom from the page")</script><script>notAFunction()</script>'),
    "network.html": page('<p>offline?</p>', head='<script src="https://cdn.example.org/lib.js"></script>'),
    "bad_math.html": page(r'<p><span class="math notranslate nohighlight">\(\undefinedcommand x\)</span> and a price'
                          r' <span class="math notranslate nohighlight">\(5 and 10\)</span> from "$5 and $10".</p>'),
    "no_mathjax.html": page(r'<p><span class="math notranslate nohighlight">\(x^2\)</span></p>').replace(
        "_static/mathjax/tex-chtml.js", "_static/mathjax/not-there.js"),
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """The book above, checked once in one browser: (problems by page, the screenshot folder)."""
    try:
        check_book_pages.find_chromium()
        missing = None
    except FileNotFoundError as error:
        missing = str(error)
    if missing:  # fail, not skip: `make test` must not pass on a machine that cannot run the browser check
        pytest.fail(missing, pytrace=False)
    book = tmp_path_factory.mktemp("book")
    for name, html in PAGES.items():
        (book / name).write_text(html)
    (book / "figure.svg").write_text(SVG)
    mathjax = Path(importlib.import_module("sphinx-mathjax-offline").__file__).parent / "static" / "mathjax"
    (book / "_static").mkdir()
    (book / "_static" / "mathjax").symlink_to(mathjax)  # MathJax as the built book serves it
    shots = tmp_path_factory.mktemp("screenshots")
    problems = check_book_pages.check_pages(book, shots)
    by_page = {name: [p for p in problems if p.page == name] for name in PAGES}
    return by_page, shots, problems


def texts(problems, kind):
    return [p.text for p in problems if p.kind == kind]


def test_good_pages_pass(checked):
    by_page, _, _ = checked
    assert by_page["good.html"] == [] and by_page["linked.html"] == [] and by_page["index.html"] == []


def test_every_page_has_a_full_page_screenshot(checked):
    _, shots, _ = checked
    assert (shots / "good.png").stat().st_size > 1000
    assert {p.stem for p in shots.glob("*.png")} == {Path(name).stem for name in PAGES} - {"index"}  # a redirect


def test_raw_tex_in_prose(checked):
    found = texts(checked[0]["raw_tex.html"], "raw TeX")
    assert len(found) == 3, found  # each paragraph / list item with TeX, not only the first
    assert "\\frac" in found[0] and "'$$'" in found[1] and "s^2" in found[2]


def test_errors_and_warnings_in_outputs(checked):
    by_page = checked[0]
    assert [t.split(":")[0] for t in texts(by_page["stderr.html"], "output")] == ["stderr", "traceback"]
    assert "adapters available" in texts(by_page["stderr.html"], "output")[0]
    noise = texts(by_page["noise.html"], "output")
    assert [t.split(":")[0] for t in noise] == ["a warning", "a raw Trainer log dict", "profiler log noise", "a log line"]
    assert "UserWarning" in noise[0] and "'loss'" in noise[1]


def test_broken_images(checked):
    found = texts(checked[0]["broken_image.html"], "image")
    assert len(found) == 2 and "missing.png" in found[0] and "lost plot" in found[0]
    assert texts(checked[0]["broken_image.html"], "console") == []  # the failed load is the image's problem, once


def test_broken_internal_links(checked):
    found = texts(checked[0]["broken_link.html"], "link")
    assert len(found) == 3, found  # index.html exists: only the three broken ones
    assert "the book has no nowhere.html" in found[0]
    assert "good.html has no anchor #no-such-anchor" in found[1] and "has no anchor #not-here" in found[2]


def test_eq_eq(checked):
    assert texts(checked[0]["eq_eq.html"], "Eq. Eq.") == ["'By Eq. Eq. (3) the update is small.'"]  # once, in its paragraph


def test_an_option_whose_dashes_became_an_en_dash(checked):
    assert texts(checked[0]["dash.html"], "dash") == [
        "an option's \"--\" became a dash: 'Recorded by python x.py \u2013jobs 2 \u2013out y.' (write the command as code, "
        "or print it in a cell's output)"]   # once per paragraph; the second paragraph's dashes are prose


def test_javascript_console_errors(checked):
    found = texts(checked[0]["console_error.html"], "console")
    assert len(found) == 2 and "boom from the page" in found[0] and "notAFunction" in found[1]


def test_resources_from_the_network_are_blocked_and_reported(checked):
    problems = checked[0]["network.html"]
    assert [(p.kind, p.text) for p in problems] == [
        ("network", "loads https://cdn.example.org/lib.js (the book must render offline)")]


def test_tex_errors_and_prose_typeset_as_math(checked):
    found = texts(checked[0]["bad_math.html"], "math")
    assert len(found) == 2 and "undefinedcommand" in found[0] and "prose typeset as a formula" in found[1]


def test_mathjax_that_does_not_load(checked):
    problems = checked[0]["no_mathjax.html"]
    assert {p.kind for p in problems} == {"missing", "math"}
    assert re.search(r"MathJax did not load .*not-there\.js: its 1 formulas show as raw TeX", texts(problems, "math")[0])


def test_the_report_names_every_page_and_problem(checked):
    problems = checked[2]
    report = check_book_pages.format_report(problems, len(PAGES), 1.0, None)
    assert report.splitlines()[0].startswith(f"browser check: {len(problems)} problems on 11 of {len(PAGES)} pages")
    assert all(p.text in report for p in problems)


def test_a_missing_chromium_says_to_run_make_setup(tmp_path):
    (tmp_path / "a.html").write_text(page("<p>x</p>"))
    with pytest.raises(FileNotFoundError, match="make setup"):
        check_book_pages.check_pages(tmp_path, chromium=str(tmp_path / "no-chromium"))
