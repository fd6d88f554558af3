"""Open every page of the built book in headless Chromium, after MathJax has run, and report what a reader would see.

    python tools/check_book_pages.py _build/html --screenshots _build/screenshots     (what `make book-browser` runs)

The pages are served from a local http server on a free port; every request to another host is blocked,
so a page is checked as a reader without a network sees it. Each page is reported for

    raw TeX    TeX left in the prose ($$, $x_1$, \\frac, \\begin{...}, \\(...\\)) outside code and rendered math
    math       a formula MathJax did not typeset or typeset as an error, or MathJax that did not load at all
    output     a cell output on stderr, a traceback, or a warning / log line in an output
               (UserWarning: ..., WARNING, INFO:name:..., AdapterHub's "adapters available but none are
               activated", profiler USDT lines, Trainer's raw log dicts)
    image      an image that did not load (naturalWidth 0)
    link       a link to a page or anchor of the book that does not exist
    Eq. Eq.    the prose's "Eq." followed by a reference that adds "Eq." again
    dash       a word in the prose that starts with an en or em dash ("–jobs"): a command-line option whose "--"
               Sphinx's smart quotes turned into a dash, so a reader who copies it gets a command that fails
    console    a JavaScript error (console.error, an uncaught exception, a resource that failed to load)
    missing    a file the page loads (script, stylesheet, font) that the book does not have
    network    a resource the page loads from the network (the book must render offline)
    browser    a page that did not load or check in time (PAGE_TIMEOUT_MS)

Code (``pre``, ``code``, highlighted cells and their outputs) may show TeX and "$" on purpose and is not searched
for raw TeX. Prose may show "$" for money: "$5 and $10" as text has no TeX between the two "$" and passes; written
unescaped in MyST the pair becomes the formula "5 and 10", reported under math (write \\$5 and \\$10). A cell may print
an error message on purpose (``ValueError: ...`` on stdout); only stderr, tracebacks, warnings and log lines are
reported. Every problem of every page is reported, with the page, its section and the offending text; the exit status
is 1 if there is any. A full-page screenshot of each page is saved under --screenshots (``notebooks/lora.html`` ->
``notebooks/lora.png``).
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from playwright.sync_api import Error as BrowserError
from playwright.sync_api import sync_playwright

CHROMIUM_HELP = ("run `make setup` (it installs the Debian package chromium when it can, or says what to install), "
                 "or pass --chromium /path/to/chromium")
PAGE_TIMEOUT_MS = 60_000  # one page's load and MathJax typesetting; generous because the 2 CI cores are shared

# (pattern, what it is): searched in each block of prose (a paragraph, list item, heading, table cell, ...).
RAW_TEX = re.compile("|".join([
    r"\$\$",                                    # a display formula the Markdown parser did not take as math
    r"\$[^$\n]*?[\\^_{}][^$\n]*?\$",             # $...$ with TeX inside; "$5 and $10" has none
    r"\\[A-Za-z]{2,}",                          # a TeX command: \frac, \begin, \mathbf
    r"\\[()\[\]]",                              # MathJax's own delimiters \( \) \[ \], left as text
    r"[_^]\{",                                  # a sub- or superscript: W_{0}, x^{2}
]))
# MathJax marks a TeX error with merror, and shows an undefined command (its "noundefined" extension) in red.
TEX_ERROR = re.compile(r'data-mjx-error="([^"]*)"|<mtext mathcolor="red">(\\[^<]*)</mtext>')
# A formula that is really prose: "costs $5 and $10" makes "5 and 10" a formula. English glue words, not inside
# \text{...} or a command's name, show it (none of the book's formulas has one).
TEX_WORDS = re.compile(r"\\(?:text\w*|math\w*|operatorname|mbox)\s*\{[^{}]*\}|\\[A-Za-z]+")
PROSE_IN_MATH = re.compile(r"(?:^|\s)(?:and|or|the|of|for|to|is|are|per|with|from|than|costs?|each)\s")
EQ_EQ = re.compile(r"\bEqs?\.\s*Eq\.")
DASHED_OPTION = re.compile(r"(?:^|[\s(])[\u2013\u2014][A-Za-z]")   # "–jobs"; not "2–5", "question–answer", " – "
OUTPUT_NOISE = [
    (re.compile(r"Traceback \(most recent call last\)"), "a traceback"),
    (re.compile(r"\b\w*Warning: "), "a warning"),  # "path:12: UserWarning: ...", "Warning: ..."
    (re.compile(r"\bWARNING\b"), "a warning"),
    (re.compile(r"^(?:DEBUG|INFO|ERROR|CRITICAL):\S", re.M), "a log line"),  # logging's default format
    (re.compile(r"adapters available but none are activated"), "AdapterHub log noise"),
    (re.compile(r"^USDT:", re.M), "profiler log noise"),
    (re.compile(r"^\{'(?:loss|eval_loss|train_runtime)'", re.M), "a raw Trainer log dict"),
]
REDIRECT = re.compile(r"""<meta\s+http-equiv=["']?refresh["']?\s+content=["']?\d+;\s*url=([^"'>\s]+)""", re.I)

# Runs in the page once it has loaded: waits for MathJax and the images, then returns what the checks look at.
COLLECT_JS = r"""
async (timeoutMs) => {
  const section = (el) => {
    const heading = el.closest('section')?.querySelector('h1, h2, h3, h4, h5, h6');
    return heading ? heading.textContent.replace(/[#¶]/g, '').replace(/\s+/g, ' ').trim() : '';
  };
  const timeout = (ms) => new Promise((resolve) => setTimeout(() => resolve('timeout'), ms));

  const mathjaxScript = [...document.scripts].find((s) => /mathjax/i.test(s.src));
  let mathjax = mathjaxScript ? 'not loaded' : 'absent';
  if (mathjaxScript && window.MathJax?.startup?.promise) {
    mathjax = await Promise.race([MathJax.startup.promise.then(() => 'typeset', () => 'failed'), timeout(timeoutMs)]);
  }
  const formulaElements = [...document.querySelectorAll('.math')];
  const formulas = mathjax !== 'typeset' ? [] : [...MathJax.startup.document.math].map((item) => ({
    tex: item.math, mathml: MathJax.startup.toMML(item.root), section: section(item.typesetRoot)}));
  const untypeset = mathjax !== 'typeset' ? [] : formulaElements.filter((el) => !el.querySelector('mjx-container'))
    .map((el) => ({tex: el.textContent.trim(), section: section(el)}));

  // Prose: the text of each block outside code and math, so that "$" in a code cell is never searched.
  const SKIP = 'pre, code, kbd, samp, script, style, noscript, template, textarea, .highlight, .math, mjx-container';
  const BLOCK = 'p, li, dt, dd, td, th, h1, h2, h3, h4, h5, h6, figcaption, caption, blockquote, '
              + 'div, section, article, aside, nav, header, footer, main, body';
  const blocks = new Map();
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(SKIP)) continue;
    const block = parent.closest(BLOCK);
    blocks.set(block, (blocks.get(block) || '') + node.data);
  }
  const prose = [...blocks].map(([el, text]) => ({text: text.replace(/\s+/g, ' ').trim(), section: section(el)}))
    .filter((block) => block.text);

  const outputs = [...document.querySelectorAll('.cell_output .output')].map((el) => ({
    classes: el.className, text: el.innerText, section: section(el)}));

  const images = [...document.images];
  images.forEach((img) => { img.loading = 'eager'; });
  await Promise.race([Promise.all(images.map((img) => img.decode().catch(() => null))), timeout(timeoutMs)]);
  const brokenImages = images.filter((img) => img.naturalWidth === 0)
    .map((img) => ({src: img.getAttribute('src') || '', alt: img.alt, section: section(img)}));

  const links = [...document.querySelectorAll('a[href]')].map((a) => ({
    href: a.getAttribute('href'), url: a.href, text: a.textContent.replace(/\s+/g, ' ').trim(), section: section(a)}));
  const ids = [...document.querySelectorAll('[id], a[name]')].map((el) => el.id || el.getAttribute('name'));

  await document.fonts.ready;  // the screenshot shows MathJax's glyphs, not the fallback font
  return {mathjax, mathjaxSrc: mathjaxScript?.src || '', formulaCount: formulaElements.length, formulas, untypeset,
          prose, outputs, brokenImages, links, ids};
}
"""


@dataclass(frozen=True)
class Problem:
    page: str      # relative to the book's root: notebooks/lora.html
    kind: str      # raw TeX, math, output, image, link, Eq. Eq., dash, console, missing, network, browser
    text: str      # what is wrong and the offending text
    section: str = ""


@dataclass
class _Visit:
    """What the browser saw on one page; the links are checked once every page has been visited."""
    page: str
    links: list
    ids: set


def book_pages(root: Path) -> list[Path]:
    """Every HTML page of the built book; ``_static``, ``_sources``, ``_images`` (names starting "_") hold none."""
    return sorted(p for p in root.rglob("*.html") if not any(part.startswith("_") for part in p.relative_to(root).parts))


def find_chromium(chromium: str | None = None) -> str:
    path = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"Chromium not found{f' at {chromium}' if chromium else ''}: the browser check of the "
                                f"built book needs it; {CHROMIUM_HELP}")
    return path


def _quote(text: str, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _around(text: str, match: re.Match, width: int = 60) -> str:
    start, end = max(0, match.start() - width), min(len(text), match.end() + width)
    return ("…" if start else "") + text[start:end] + ("…" if end < len(text) else "")


def page_problems(page: str, facts: dict) -> list[Problem]:
    """The problems in what COLLECT_JS returned for one page (all but links, which need every page's anchors)."""
    found = []
    if facts["mathjax"] != "typeset" and facts["formulaCount"]:
        source = facts["mathjaxSrc"]
        how = {"absent": "the page loads no MathJax", "not loaded": f"MathJax did not load from {source}",
               "failed": f"MathJax from {source} failed",
               "timeout": f"MathJax from {source} did not finish"}[facts["mathjax"]]
        found.append(Problem(page, "math", f"{how}: its {facts['formulaCount']} formulas show as raw TeX"))
    found += [Problem(page, "math", f"not typeset: {_quote(f['tex'])}", f["section"]) for f in facts["untypeset"]]
    for formula in facts["formulas"]:
        error = TEX_ERROR.search(formula["mathml"])
        if error:
            found.append(Problem(page, "math", f"TeX error {html.unescape(error.group(1) or error.group(2))!r} in "
                                               f"{_quote(formula['tex'])}", formula["section"]))
        elif PROSE_IN_MATH.search(TEX_WORDS.sub("§", formula["tex"])):
            found.append(Problem(page, "math", f"prose typeset as a formula (two \"$\" for money? write \\$): "
                                               f"{_quote(formula['tex'])}", formula["section"]))
    for block in facts["prose"]:
        match = RAW_TEX.search(block["text"])
        if match:
            found.append(Problem(page, "raw TeX", f"{match.group()!r} in {_quote(_around(block['text'], match))}",
                                 block["section"]))
        found += [Problem(page, "Eq. Eq.", _quote(_around(block["text"], m, 40)), block["section"])
                  for m in EQ_EQ.finditer(block["text"])]
        match = DASHED_OPTION.search(block["text"])
        if match:
            found.append(Problem(page, "dash", f"an option's \"--\" became a dash: {_quote(_around(block['text'], match, 40))}"
                                               " (write the command as code, or print it in a cell's output)",
                                 block["section"]))
    for output in facts["outputs"]:
        classes = output["classes"].split()
        if "stderr" in classes:
            found.append(Problem(page, "output", f"stderr: {_quote(output['text'])}", output["section"]))
        elif "traceback" in classes or "error" in classes:
            found.append(Problem(page, "output", f"traceback: {_quote(output['text'])}", output["section"]))
        else:
            for pattern, what in OUTPUT_NOISE:
                match = pattern.search(output["text"])
                if match:
                    line = output["text"][output["text"].rfind("\n", 0, match.start()) + 1:].split("\n", 1)[0]
                    found.append(Problem(page, "output", f"{what}: {_quote(line)}", output["section"]))
                    break
    found += [Problem(page, "image", f"does not load: src={_quote(i['src'], 100)} alt={_quote(i['alt'], 60)}",
                      i["section"]) for i in facts["brokenImages"]]
    return found


def link_problems(visits: list[_Visit], root: Path, origin: str) -> list[Problem]:
    """Links into the book must reach an existing file and, with "#anchor", an element with that id on its page."""
    ids = {visit.page: visit.ids for visit in visits}
    found = []
    for visit in visits:
        for link in visit.links:
            url = urlsplit(link["url"])
            if f"{url.scheme}://{url.netloc}" != origin:
                continue  # another site, mailto:, javascript:: not part of the book
            target = unquote(url.path).lstrip("/")
            if target == "" or target.endswith("/"):
                target += "index.html"
            where = f"{link['href']!r} ({_quote(link['text'], 60)})"
            if not (root / target).is_file():
                found.append(Problem(visit.page, "link", f"{where}: the book has no {target}", link["section"]))
            elif url.fragment and target in ids and unquote(url.fragment) not in ids[target]:
                found.append(Problem(visit.page, "link", f"{where}: {target} has no anchor #{unquote(url.fragment)}",
                                     link["section"]))
    return found


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name; one line per request is noise
        pass


def check_pages(root: Path, screenshots: Path | None = None, chromium: str | None = None) -> list[Problem]:
    """Every problem on every page of the built book at ``root``; screenshots under ``screenshots`` if given."""
    root = Path(root).resolve()
    pages = book_pages(root)
    if not pages:
        raise FileNotFoundError(f"no HTML pages under {root}: build the book first (make book or make book-strict)")
    executable = find_chromium(chromium)
    if screenshots:  # a picture of a page the book no longer has would mislead
        for stale in Path(screenshots).rglob("*.png"):
            stale.unlink()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    problems, visits = [], []
    try:
        with sync_playwright() as playwright:
            # chromium_sandbox=False launches Chromium with --no-sandbox: its sandbox refuses to start as root (CI and
            # the course's containers run as root) and needs user namespaces that containers rarely allow. It guards
            # against hostile web pages; here it opens only the book we built, served locally, with the network blocked.
            # --disable-dev-shm-usage: a container's /dev/shm is often 64 MB, too small for a full-page screenshot.
            browser = playwright.chromium.launch(executable_path=executable, chromium_sandbox=False,
                                                 args=["--disable-dev-shm-usage"])
            for path in pages:
                page = path.relative_to(root).as_posix()
                redirect = REDIRECT.search(path.read_text(errors="replace")[:2000])
                if redirect:  # index.html sends the reader to the first chapter: check where it points, not a blank page
                    target = {"href": redirect.group(1), "url": urljoin(f"{origin}/{page}", redirect.group(1)),
                              "text": "redirect", "section": ""}
                    visits.append(_Visit(page, [target], set()))
                    continue
                page_found, facts = _visit(browser, origin, page, screenshots)
                problems += page_found
                if facts:
                    visits.append(_Visit(page, facts["links"], set(facts["ids"])))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return problems + link_problems(visits, root, origin)


def _visit(browser, origin: str, page: str, screenshots: Path | None) -> tuple[list[Problem], dict | None]:
    """Load one page with the network blocked; its problems, and what COLLECT_JS saw (None if it did not load).

    Each page gets a fresh browser context, as a first-time reader has: no page's storage (the theme keeps the
    light/dark mode there) changes what the next page shows, whatever the order.
    """
    found: list[Problem] = []
    reported_urls: set[str] = set()  # resources already reported, so the console's "Failed to load" is not repeated

    def block_the_network(route):
        if route.request.url.startswith(origin + "/"):
            route.continue_()
            return
        reported_urls.add(route.request.url)
        found.append(Problem(page, "network", f"loads {route.request.url} (the book must render offline)"))
        route.abort()

    def on_response(response):
        if response.status < 400:
            return
        reported_urls.add(response.url)
        if response.request.resource_type not in ("document", "image"):  # those are reported as a page or an image
            found.append(Problem(page, "missing", f"{response.url[len(origin):]} (HTTP {response.status})"))

    def on_console(message):
        failed_resource = message.text.startswith("Failed to load resource") and message.location.get("url")
        if message.type == "error" and not (failed_resource and failed_resource in reported_urls):
            found.append(Problem(page, "console", f"{_quote(message.text)} at {message.location.get('url', '')}"
                                                  f":{message.location.get('lineNumber', '')}"))

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.route("**/*", block_the_network)
    tab.on("response", on_response)
    tab.on("console", on_console)
    tab.on("pageerror", lambda error: found.append(Problem(page, "console", f"uncaught {_quote(str(error))}")))
    try:
        response = tab.goto(f"{origin}/{page}", wait_until="load", timeout=PAGE_TIMEOUT_MS)
        if response is None or response.status >= 400:
            status = response.status if response else "?"
            return found + [Problem(page, "missing", f"the page itself (HTTP {status})")], None
        facts = tab.evaluate(COLLECT_JS, PAGE_TIMEOUT_MS)
        if screenshots:
            shot = Path(screenshots) / Path(page).with_suffix(".png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(shot), full_page=True)
        tab.wait_for_timeout(50)  # console messages of the last scripts arrive asynchronously
        return found + page_problems(page, facts), facts
    except BrowserError as error:  # a page that hangs or crashes the tab is a problem of that page; go on with the rest
        return found + [Problem(page, "browser", f"the page could not be checked: {_quote(str(error), 300)}")], None
    finally:
        context.close()


def format_report(problems: list[Problem], pages: int, seconds: float, screenshots: Path | None) -> str:
    shots = f"; screenshots in {screenshots}" if screenshots else ""
    if not problems:
        return f"browser check: {pages} pages, no problems ({seconds:.0f} s{shots})"
    lines = [f"browser check: {len(problems)} problems on {len({p.page for p in problems})} of {pages} pages "
             f"({seconds:.0f} s{shots})"]
    for page in sorted({p.page for p in problems}):
        lines.append(page)
        lines += [f"  {p.kind:8} {f'[{p.section}] ' if p.section else ''}{p.text}" for p in problems if p.page == page]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("html", type=Path, help="the built book, e.g. _build/html")
    parser.add_argument("--screenshots", type=Path, help="save a full-page screenshot of each page here")
    parser.add_argument("--chromium", help="the Chromium executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        problems = check_pages(args.html, args.screenshots, args.chromium)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(problems, len(book_pages(args.html.resolve())), time.perf_counter() - start, args.screenshots))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
