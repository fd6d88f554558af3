"""Grade a folder of submitted notebooks: run each one in a sandbox, judge its answers outside it.

    python -m peft_edu.grading notebooks/lora.ipynb SUBMISSIONS/ --out grading/
    (or: make grade CHAPTER=lora SUBMISSIONS=SUBMISSIONS/)

writes ``grading/gradebook.csv`` (student, question, points, max_points) and one
``grading/feedback/<student>.md`` per submission. The questions, their points and the check each
one uses are read from the chapter's otter master notebook.

Why not grade inside the submission, as ``otter run`` does? There the tests run in the same Python
process as the submission, which can therefore rewrite them, patch the checks or forge the results
file before they are read, and reach anything the grader can. Here the work is split:

1. **run** (untrusted, in a bubblewrap sandbox): the submission's code cells are executed (the
   chapter's experiments, tagged ``otter_ignore``, are skipped), then each exercise's *probe* calls
   the learner's function or class on inputs drawn by the grader and saves what came back, as
   safetensors and JSON (data only, never pickle). The sandbox has no network, a read-only view of
   the machine (its only writable folder is its own scratch folder, which is also its HOME and
   TMPDIR), no access to the submissions folder or the gradebook, no
   capabilities, a per-cell and a per-notebook time limit, a memory limit and a cap on the output
   it keeps;
2. **judge** (trusted, in this process): each exercise's *judge* compares those values with the
   reference computed here. The hidden case of every question uses a seed drawn afresh for each
   submission, so its inputs cannot be known, or fitted, in advance.

What this does not guarantee: the sandbox can read what the machine's users can read (the course,
including the published solutions); an answer that calls the course's own reference code gets the
points; and code that finds the probe's inputs at call time computes on them like any answer.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .checks import EXERCISES, CheckFailed

CELL_TIMEOUT_S = 60          # one cell, or one probe
NOTEBOOK_TIMEOUT_S = 600     # the whole submission
MEMORY_LIMIT = "12G"         # address space of the sandboxed process
LOG_LIMIT_BYTES = 200_000    # what is kept of what a submission prints
OTTER_CELL = re.compile(r"^\s*(grader\s*=\s*otter\.Notebook|grader\.check|import otter)", re.M)


@dataclass(frozen=True)
class Question:
    name: str          # otter's question name, e.g. "q2"
    points: float
    check: str         # the check its public test calls, e.g. "check_lora_forward"
    answer: str        # the name the learner defines, e.g. "lora_forward"


def questions_of(master: Path) -> list[Question]:
    """The graded questions of an otter master notebook, with the check each public test calls."""
    questions, current = [], None
    for cell in json.loads(Path(master).read_text())["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "raw" and text.startswith("# BEGIN QUESTION"):
            current = yaml.safe_load(text.split("\n", 1)[1])
        elif cell["cell_type"] == "code" and current and not text.startswith("# HIDDEN"):
            call = re.search(r"^\s*(check_\w+)\((\w+)\)", text, re.M)
            if call:
                if call.group(1) not in EXERCISES:
                    raise ValueError(f"{master}: question {current['name']} calls {call.group(1)}, which peft_edu.checks does not define.")
                questions.append(Question(current["name"], float(current["points"]), call.group(1), call.group(2)))
                current = None
    if not questions:
        raise ValueError(f"{master} has no graded question (raw '# BEGIN QUESTION' cells with a check_* test).")
    return questions


# --- data across the sandbox boundary: safetensors for tensors, JSON for the rest ---------------
def save_data(data: dict, directory: Path, stem: str) -> None:
    tensors = {}

    def encode(value):
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        return value

    (directory / f"{stem}.json").write_text(json.dumps(encode(data)))
    save_file(tensors, str(directory / f"{stem}.safetensors"))


def load_data(directory: Path, stem: str) -> dict:
    tensors = load_file(str(directory / f"{stem}.safetensors"))

    def decode(value):
        if isinstance(value, dict):
            return tensors[value["__tensor__"]] if set(value) == {"__tensor__"} else {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(json.loads((directory / f"{stem}.json").read_text()))


# --- inside the sandbox -------------------------------------------------------------------------
class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that the learner's `except Exception` cannot swallow it."""


class _CappedLog:
    """A text stream that keeps the first ``limit`` bytes and counts the rest."""

    def __init__(self, path: Path, limit: int):
        self.file, self.left, self.dropped = open(path, "w", encoding="utf-8", errors="replace"), limit, 0

    def write(self, text: str) -> int:
        kept = text[: max(self.left, 0)]
        self.file.write(kept)
        self.left -= len(kept)
        self.dropped += len(text) - len(kept)
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return False


def _with_alarm(seconds: float, fn, *args):
    def ring(*_):
        raise _Timeout(f"stopped after {seconds:g} s")

    signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_submission(inputs: Path, outputs: Path) -> None:
    """Execute ``inputs/submission.ipynb`` and probe its answers (the sandboxed half).

    ``inputs`` (the plan, the notebook, the requests) is read-only in the sandbox; ``outputs`` gets
    the log and, at the very end, the observations.
    """
    from IPython.core.interactiveshell import InteractiveShell

    plan = json.loads((inputs / "plan.json").read_text())
    log = _CappedLog(outputs / "log.txt", LOG_LIMIT_BYTES)
    sys.stdout = sys.stderr = log
    shell = InteractiveShell.instance(colors="NoColor")
    notebook = json.loads((inputs / "submission.ipynb").read_text())
    for index, cell in enumerate(notebook["cells"]):
        source = "".join(cell.get("source", ""))
        if (cell.get("cell_type") != "code" or "otter_ignore" in cell.get("metadata", {}).get("tags", [])
                or OTTER_CELL.search(source)):
            continue
        print(f"--- cell {index}")
        try:
            _with_alarm(plan["cell_timeout"], shell.run_cell, source, False, True)
        except _Timeout as stop:  # the alarm rang outside the learner's code; carry on
            print(f"cell {index} {stop}")
    namespace, results = shell.user_ns, {}
    for case in plan["cases"]:
        exercise = EXERCISES[case["check"]]
        request = load_data(inputs / "requests", case["id"])
        try:
            results[case["id"]] = _with_alarm(plan["cell_timeout"], exercise.probe, namespace.get(case["answer"]), request)
        except BaseException as error:  # the probe itself was stopped (a learner's loop, or a crash)
            print(f"probe {case['id']}: {type(error).__name__}: {error}")
    # Written only now, after the learner's last call, into a folder made afresh: nothing the
    # submission planted there earlier survives.
    shutil.rmtree(outputs / "observations", ignore_errors=True)
    (outputs / "observations").mkdir()
    for case_id, observed in results.items():
        save_data(observed, outputs / "observations", case_id)
    print(f"--- done ({log.dropped} characters of output were not kept)")
    log.flush()


# --- outside: the sandbox, the judge, the gradebook ---------------------------------------------
def sandbox_command(inputs: Path, outputs: Path, hidden: list[Path], timeout_s: int) -> list[str]:
    """bubblewrap: read-only machine, ``hidden`` folders masked, only ``outputs`` writable (and used as
    HOME and TMPDIR), no network, no capabilities, an unprivileged user.

    The machine's /tmp stays visible (read-only): the course itself may live there, as in a CI clone.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("Grading needs bubblewrap for its sandbox: install it with `apt-get install bubblewrap`.")
    masks = [arg for folder in hidden for arg in ("--tmpfs", str(folder.resolve()))]
    return ["timeout", "--kill-after=5", str(timeout_s), "prlimit", f"--as={_bytes(MEMORY_LIMIT)}", "--",
            bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *masks,
            "--ro-bind", str(inputs), str(inputs), "--bind", str(outputs), str(outputs), "--chdir", str(outputs),
            "--unshare-all", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
            "--die-with-parent", "--new-session",
            "--setenv", "HOME", str(outputs), "--setenv", "TMPDIR", str(outputs),
            "--setenv", "MPLBACKEND", "Agg", "--setenv", "HF_HUB_OFFLINE", "1",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            sys.executable, "-m", "peft_edu.grading", "--run-submission", str(inputs), str(outputs)]


def _bytes(size: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(size[:-1]) * units[size[-1]]) if size[-1] in units else int(size)


def grade_one(path: Path, questions: list[Question], hidden: list[Path], timeout_s: int = NOTEBOOK_TIMEOUT_S,
              cell_timeout_s: int = CELL_TIMEOUT_S) -> tuple[dict, str]:
    """Grade one submission: ({question: points}, feedback in Markdown)."""
    scores = {q.name: 0.0 for q in questions}
    try:
        notebook = json.loads(path.read_text())
        if not isinstance(notebook.get("cells"), list):
            raise ValueError("it has no list of cells")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        print(f"{path}: not a readable notebook ({error}); graded 0", flush=True)
        return scores, f"**This file could not be read as a notebook** ({error}); no question could be graded.\n"
    workdir = Path(tempfile.mkdtemp(prefix="peft_edu-grade-"))
    inputs, outputs = workdir / "in", workdir / "out"
    try:
        for folder in (inputs, inputs / "requests", outputs):
            folder.mkdir()
            os.chmod(folder, 0o755)
        os.chmod(workdir, 0o755)
        os.chmod(outputs, 0o777)  # the sandbox runs as an unprivileged user and may write only here
        (inputs / "submission.ipynb").write_text(json.dumps(notebook))
        cases, requests = [], {}
        for q in questions:
            for label, seed in (("public", 0), ("hidden", secrets.randbelow(2**31))):
                case_id = f"{q.name}-{label}"
                requests[case_id] = EXERCISES[q.check].request(seed)
                save_data(requests[case_id], inputs / "requests", case_id)
                cases.append({"id": case_id, "check": q.check, "answer": q.answer})
        (inputs / "plan.json").write_text(json.dumps({"cases": cases, "cell_timeout": cell_timeout_s}))
        run = subprocess.run(sandbox_command(inputs, outputs, hidden, timeout_s), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines = []
        for q in questions:
            for label in ("public", "hidden"):
                case_id = f"{q.name}-{label}"
                worth = q.points / 2
                try:
                    observed = load_data(outputs / "observations", case_id)
                    EXERCISES[q.check].judge(requests[case_id], observed)
                except FileNotFoundError:
                    verdict = ("no answer was recorded: the notebook stopped (time limit, memory limit or crash) "
                               "before this exercise could be checked")
                except CheckFailed as failure:
                    verdict = str(failure)
                except Exception as error:  # malformed observations: the submission's fault, never ours to crash on
                    verdict = f"the answer could not be checked ({type(error).__name__})"
                else:
                    scores[q.name] += worth
                    verdict = "passed"
                lines.append(f"- **{q.name}**, {label} test ({worth:g} point{'' if worth == 1 else 's'}): {verdict}")
        if run.returncode != 0:
            lines.append(f"\nThe run ended with exit status {run.returncode}"
                         + (" (the time limit of the notebook)" if run.returncode in (124, 137) else "") + ".")
        log = (outputs / "log.txt").read_text(errors="replace") if (outputs / "log.txt").exists() else ""
        feedback = "\n".join(lines) + "\n\n<details><summary>What the notebook printed (end)</summary>\n\n```\n" \
            + log[-3000:] + "\n```\n</details>\n"
        return scores, feedback
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def grade_folder(master: Path, submissions: Path, out: Path, timeout_s: int = NOTEBOOK_TIMEOUT_S,
                 cell_timeout_s: int = CELL_TIMEOUT_S) -> list[dict]:
    """Grade every ``*.ipynb`` under ``submissions``; write the gradebook and feedback into ``out``."""
    questions = questions_of(master)
    paths = sorted(p for p in Path(submissions).rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if not paths:
        raise FileNotFoundError(f"No .ipynb file under {submissions}.")
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    rows = []
    for path in paths:
        student = path.relative_to(submissions).with_suffix("").as_posix()
        scores, feedback = grade_one(path, questions, [Path(submissions), out], timeout_s, cell_timeout_s)
        total, most = sum(scores.values()), sum(q.points for q in questions)
        feedback_path = out / "feedback" / f"{student.replace('/', '__')}.md"
        feedback_path.write_text(f"# {student}: {total:g} / {most:g} points\n\n{feedback}")
        rows += [{"student": student, "question": q.name, "points": scores[q.name], "max_points": q.points}
                 for q in questions]
        print(f"{student}: {total:g} / {most:g}", flush=True)
    with open(out / "gradebook.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["student", "question", "points", "max_points"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["--run-submission"]:
        run_submission(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m peft_edu.grading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("master", type=Path, help="the chapter's master notebook, e.g. notebooks/lora.ipynb")
    parser.add_argument("submissions", type=Path, help="a folder of submitted .ipynb files (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("grading"), help="where gradebook.csv and feedback/ go")
    parser.add_argument("--timeout", type=int, default=NOTEBOOK_TIMEOUT_S, help="seconds per notebook")
    parser.add_argument("--cell-timeout", type=int, default=CELL_TIMEOUT_S, help="seconds per cell or answer check")
    args = parser.parse_args(argv)
    rows = grade_folder(args.master, args.submissions, args.out, args.timeout, args.cell_timeout)
    print(f"{len({r['student'] for r in rows})} submissions graded: {args.out / 'gradebook.csv'}, {args.out / 'feedback'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
