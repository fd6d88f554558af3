"""Write the same set-up cell, and a link to the chapter's exercises, at the top of every chapter.

The set-up cell installs the course on Colab (and does nothing elsewhere), so it needs the
repository URL; the link opens the chapter's self-study version (``exercises/``, made by
``tools/assignments.py``) on Colab. That URL lives in one place, `_config.yml` (`repository`), and
this script copies it in. The link is the markdown cell just before the set-up cell.

    python tools/sync_setup_cells.py          # rewrite the cells
    python tools/sync_setup_cells.py --check  # exit 1 if a notebook's cells are out of date (tests run this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
MARKER = "# Set-up (the same in every chapter)"

TEMPLATE = '''{marker}. On Colab it installs the course: the pinned libraries, the
# models and data packages, and peft_edu itself (Colab's own torch is kept). Elsewhere `make book` /
# `make test` have installed everything already, and this cell only picks the device.
import os, subprocess, sys

if "google.colab" in sys.modules and not os.path.isdir("/content/peft-from-scratch"):
    REPOSITORY = "{url}"
    subprocess.run(["git", "clone", "--quiet", "--depth=1", REPOSITORY, "/content/peft-from-scratch"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r",
                    "/content/peft-from-scratch/requirements-colab.txt", "/content/peft-from-scratch"], check=True)
    subprocess.run([sys.executable, "-m", "peft_edu.assets", "install"], check=True)

import torch
import peft_edu
from peft_edu.training import full_run, pick_device

device = pick_device()
FULL_RUN = full_run()  # long training on a GPU, short demo runs on a CPU (PEFT_EDU_FULL_RUN=0/1 overrides)
print(f"device: {{device}}, full run: {{FULL_RUN}}")'''


LINK_MARKER = "> **Doing the exercises?**"
LINK_TEMPLATE = (LINK_MARKER + " Open the [student version of this chapter on Colab]({colab}): the same notebook "
                 "with the solutions taken out and a check after each exercise.")


def repository() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]


def setup_cell_source() -> str:
    return TEMPLATE.format(marker=MARKER, url=repository()["url"])


def link_cell_source(chapter: str) -> str:
    repo = repository()
    path = repo["url"].removeprefix("https://github.com/")
    return LINK_TEMPLATE.format(colab=f"https://colab.research.google.com/github/{path}/blob/{repo['branch']}/exercises/{chapter}.ipynb")


def notebooks() -> list[Path]:
    return sorted(p for p in (ROOT / "notebooks").glob("*.ipynb"))


def sync(check: bool) -> int:
    stale = []
    for path in notebooks():
        nb = nbformat.read(path, as_version=4)
        index = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)
        if index is None or not nb.cells[index].source.startswith(MARKER):
            print(f"{path.relative_to(ROOT)}: its first code cell must be the set-up cell (starting {MARKER!r})")
            stale.append(path)
            continue
        setup, link = nb.cells[index], nb.cells[index - 1] if index else None
        has_link = link is not None and link.cell_type == "markdown" and link.source.startswith(LINK_MARKER)
        if setup.source == setup_cell_source() and setup.metadata.get("tags") == ["hide-input"] \
                and has_link and link.source == link_cell_source(path.stem):
            continue
        stale.append(path)
        if check:
            continue
        setup.source = setup_cell_source()
        setup.metadata["tags"] = ["hide-input"]  # the book shows its output (the device), not the install code
        if has_link:
            link.source = link_cell_source(path.stem)
        else:
            nb.cells.insert(index, nbformat.v4.new_markdown_cell(link_cell_source(path.stem)))
        nbformat.write(nb, path)
        print(f"updated {path.relative_to(ROOT)}")
    if check and stale:
        print("Out of date: " + ", ".join(str(p.relative_to(ROOT)) for p in stale)
              + ". Run: python tools/sync_setup_cells.py")
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report notebooks whose set-up cell is out of date")
    sys.exit(sync(parser.parse_args().check))
