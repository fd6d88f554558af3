"""Execute chapter notebooks into the book's execution cache, so that ``jupyter-book build`` renders them unchanged.

    python tools/execute_notebooks.py notebooks/lora.ipynb [notebooks/dora.ipynb ...]

The build (``execute_notebooks: cache`` in _config.yml) runs a notebook only when the cache holds no run of its
current code. It runs them one after another; this script runs one notebook per call, so ``make -j`` can run several
side by side (``make test`` runs the chapters beside the unit tests, one thread each: on 2 cores that finishes
sooner than one notebook at a time on two threads, which small models use poorly). Each run is what the build
would do itself (jupyter-cache's executor, the notebook's folder as working directory, _config.yml's timeout and
allow_errors), and the build then finds it in the cache.

A notebook whose run fails is not cached: the script prints the failing cell's traceback and exits with status 1,
and the strict build would run it again and fail on it too.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
import yaml
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from jupyter_cache.executors.utils import single_nb_execution

ROOT = Path(__file__).resolve().parents[1]
# Where jupyter-book 1.x keeps the cache when _config.yml names none: next to the HTML output, in _build.
CACHE = ROOT / "_build" / ".jupyter_cache"
SLOWEST_CELLS_SHOWN = 3


def execution_settings() -> dict:
    execute = yaml.safe_load((ROOT / "_config.yml").read_text())["execute"]
    if execute.get("execute_notebooks") != "cache" or execute.get("cache") or execute.get("run_in_temp"):
        raise SystemExit("tools/execute_notebooks.py fills the cache that `execute_notebooks: cache` reads, in "
                         "_build/.jupyter_cache, with each notebook run in its own folder; _config.yml now "
                         f"says otherwise ({execute}): change this script to match it")
    return {"timeout": execute["timeout"], "allow_errors": execute["allow_errors"]}


def cell_seconds(cell) -> float:
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    return (datetime.fromisoformat(end.replace("Z", "+00:00"))
            - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def execute(path: Path, settings: dict) -> bool:
    cache = get_cache(str(CACHE))
    notebook = nbformat.read(path, as_version=4)
    try:
        cache.match_cache_notebook(notebook)
        print(f"{path}: this code already ran; the build uses its cached outputs")
        return True
    except KeyError:
        pass
    started = time.monotonic()
    result = single_nb_execution(notebook, cwd=str(path.resolve().parent), record_timing=True, **settings)
    seconds = time.monotonic() - started
    if result.err is not None:
        print(f"{path}: FAILED after {seconds:.0f} s\n{result.exc_string}", file=sys.stderr)
        return False
    # The per-cell timings nbclient recorded are for the summary below only. They go before caching: the cache
    # hashes cell metadata, and the build, which reads the notebook as committed, would not find a run with them.
    slowest = sorted(((cell_seconds(cell), i) for i, cell in enumerate(result.nb.cells)), reverse=True)
    for cell in result.nb.cells:
        cell.get("metadata", {}).pop("execution", None)
    bundle = CacheBundleIn(result.nb, str(path.resolve()), data={"execution_seconds": result.time})
    cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)
    shown = ", ".join(f"cell {i} {s:.0f} s" for s, i in slowest[:SLOWEST_CELLS_SHOWN])
    print(f"{path}: executed in {seconds:.0f} s and cached (slowest: {shown})")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.notebooks if not p.is_file() or p.suffix != ".ipynb"]
    if missing:
        parser.error(f"not a notebook file (.ipynb): {', '.join(missing)}")
    settings = execution_settings()
    ok = [execute(path, settings) for path in args.notebooks]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
