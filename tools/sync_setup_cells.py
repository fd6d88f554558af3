"""Write the same set-up cell at the top of every chapter notebook.

The cell installs the course on Colab (and does nothing elsewhere), so it needs the repository
URL; that URL lives in one place, `_config.yml` (`repository.url`), and this script copies it in.

    python tools/sync_setup_cells.py          # rewrite the cells
    python tools/sync_setup_cells.py --check  # exit 1 if a notebook's cell is out of date (tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def setup_cell_source() -> str:
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    return TEMPLATE.format(marker=MARKER, url=url)


def notebooks() -> list[Path]:
    return sorted(p for p in (ROOT / "notebooks").glob("*.ipynb"))


def sync(check: bool) -> int:
    source, stale = setup_cell_source(), []
    for path in notebooks():
        nb = json.loads(path.read_text())
        cell = next((c for c in nb["cells"] if c["cell_type"] == "code"), None)
        if cell is None or not "".join(cell["source"]).startswith(MARKER):
            print(f"{path.relative_to(ROOT)}: its first code cell must be the set-up cell (starting {MARKER!r})")
            stale.append(path)
            continue
        if "".join(cell["source"]) != source or cell["metadata"].get("tags") != ["hide-input"]:
            stale.append(path)
            if not check:
                cell["source"] = source.splitlines(keepends=True)
                cell["metadata"]["tags"] = ["hide-input"]  # the book shows its output (the device), not the install code
                path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")  # nbformat's layout
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
