"""Grade a folder of submitted notebooks: run each one in a sandbox, judge its answers outside it.

    python -m peft_edu.grading notebooks/lora.ipynb SUBMISSIONS/ --out grading/
    (or: make grade CHAPTER=lora SUBMISSIONS=SUBMISSIONS/; as root)

writes ``grading/gradebook.csv`` (student, question, points, max_points), one row per submission and question,
written and synced as each submission is graded, and one ``grading/feedback/<student>.md`` per submission
(``<student>`` is the file's path in the folder, percent-encoded: ``a/b.ipynb`` gives ``a%2Fb.md``). The
questions, their points and the check each one uses are read from the chapter's otter master notebook.

Why not grade inside the submission, as ``otter run`` does? There the tests run in the same Python
process as the submission, which can therefore rewrite them, patch the checks or forge the results
file before they are read, and reach anything the grader can. Here the work is split:

1. **run** (untrusted, in the sandbox of ``peft_edu.sandbox``): the grader reads the submission (a regular
   file of at most 20 MiB, never a link), checks that it is a notebook and hands its code cells to the
   sandbox (the chapter's experiments, tagged ``otter_ignore``, are skipped). There they are executed, then
   each exercise's *probe* calls the learner's function or class on inputs drawn by the grader and sends
   back what came back, as one message of JSON and safetensors (data only, never pickle) on a pipe. The
   sandbox runs as the user nobody, sees a read-only whitelist of the machine (not the master notebooks, the
   autograder zips, other submissions or the gradebook), has no network, a clean environment, and limits
   the kernel enforces on its memory, processes, disk, time and output;
2. **judge** (trusted, in this process): the message is validated, then each exercise's *judge* compares
   its values with the reference computed here. The hidden case of every question uses a seed drawn afresh
   for each submission, so its inputs cannot be known, or fitted, in advance.

What this does not guarantee: the sandbox can read the course package ``peft_edu`` (with its reference
code and checks) and the Python environment; an answer that calls the course's own reference code gets the
points; and code that finds the probe's inputs at call time computes on them like any answer.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import secrets
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import yaml

from . import sandbox
from .checks import EXERCISES, CheckFailed
from .sandbox import Limits

CELL_TIMEOUT_S = 60          # one cell, or one probe
NOTEBOOK_TIMEOUT_S = 600     # the whole submission
MEMORY_LIMIT = Limits.memory      # the whole sandbox (and each process's address space)
PROCESS_LIMIT = Limits.processes  # tasks in the sandbox at once
DISK_LIMIT = Limits.disk          # its writable /tmp
LOG_LIMIT_BYTES = Limits.log_bytes  # what is kept of what a submission prints
SUBMISSION_LIMIT_BYTES = 20 * 2**20  # the grader parses it: bounded
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


def code_cells(raw: bytes) -> list[list]:
    """The code cells the sandbox runs, ``[[index, source], ...]``; ``ValueError`` if ``raw`` is not a notebook."""
    notebook = json.loads(raw.decode("utf-8"))
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        raise ValueError("it has no list of cells")
    cells = []
    for index, cell in enumerate(notebook["cells"]):
        if not isinstance(cell, dict):
            raise ValueError(f"cell {index} is not a cell")
        source = cell.get("source", "")
        if isinstance(source, list) and all(isinstance(line, str) for line in source):
            source = "".join(source)
        metadata = cell.get("metadata")
        tags = metadata.get("tags") if isinstance(metadata, dict) else None
        if not isinstance(source, str) or not isinstance(tags, (list, type(None))):
            raise ValueError(f"cell {index} is malformed")
        if cell.get("cell_type") == "code" and "otter_ignore" not in (tags or []) and not OTTER_CELL.search(source):
            cells.append([index, source])
    return cells


# --- inside the sandbox -------------------------------------------------------------------------
class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that the learner's `except Exception` cannot swallow it."""


class _CappedLog:
    """A text stream onto a file descriptor, unbuffered (a notebook killed at its time limit loses nothing it
    printed), that passes on the first ``limit`` characters and counts the rest."""

    def __init__(self, fd: int, limit: int):
        self.fd, self.left, self.dropped = fd, limit, 0

    def write(self, text: str) -> int:
        text = str(text)
        kept = text[: max(self.left, 0)]
        self.left -= len(kept)
        self.dropped += len(text) - len(kept)
        self.send(kept)
        return len(text)

    def send(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "replace"))
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:  # the learner closed or replaced the descriptor: their output is lost, not the grading
            pass

    def flush(self) -> None:
        pass

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


def run_submission(in_fd: int, out_fd: int) -> None:
    """Execute the cells of the plan read from ``in_fd`` and probe the answers (the sandboxed half).

    The plan, its cells and the requests are one message (``sandbox.pack``) on ``in_fd``; the observations go
    back as one message on ``out_fd``. Then the process ends at once (``os._exit``): no thread of the learner's
    can hold it up.
    """
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    raw, offset = bytearray(), 0
    while chunk := os.pread(in_fd, 1 << 20, offset):
        raw += chunk
        offset += len(chunk)
    os.close(in_fd)
    data = sandbox.unpack(bytes(raw), len(raw), json_limit=None)
    plan, requests = data["plan"], data["requests"]
    log = _CappedLog(1, plan["log_limit"])
    sys.stdout = sys.stderr = log
    note = lambda text: log.send(text + "\n")  # noqa: E731 - the runner's own lines, past the learner's cap
    note(f"--- sandbox ready (uid {os.getuid()})")
    config = Config()
    config.HistoryManager.enabled = False  # no sqlite file: a full /tmp costs the learner nothing but their files
    shell = InteractiveShell.instance(colors="NoColor", config=config)
    for index, source in plan["cells"]:
        note(f"--- cell {index}")
        try:
            _with_alarm(plan["cell_timeout"], shell.run_cell, source, False, True)
        except _Timeout as stop:  # the alarm rang outside the learner's code; carry on
            note(f"cell {index} {stop}")
    namespace, results, errors = shell.user_ns, {}, {}
    share = sandbox.RESULT_JSON_BYTES // (len(plan["cases"]) + 1)
    for case in plan["cases"]:
        try:
            observed = _with_alarm(plan["cell_timeout"], EXERCISES[case["check"]].probe,
                                   namespace.get(case["answer"]), requests[case["id"]])
            if sandbox.json_size(sandbox.pack(observed)) > share:  # what cannot be sent is not sent (nor a huge int)
                raise ValueError("the answer's values are too large to send back")
            results[case["id"]] = observed
        except BaseException as error:  # the probe itself was stopped (a learner's loop, or a crash)
            errors[case["id"]] = f"{type(error).__name__}: {error}"[:300]
            note(f"probe {case['id']}: {errors[case['id']]}")
    try:
        message = memoryview(sandbox.pack({"observations": results, "errors": errors}))
        while message:
            message = message[os.write(out_fd, message):]
        os.close(out_fd)
    except BaseException as error:
        note(f"the results could not be sent: {type(error).__name__}: {error}")
    log.send(f"--- done ({log.dropped} characters of output were not kept)\n")
    os._exit(0)


BOOT = "import sys; sys.path.insert(0, {!r}); from peft_edu.grading import main; main(['--run-submission', *sys.argv[1:]])"


# --- outside: the judge, the feedback, the gradebook --------------------------------------------
def _printable(text: str) -> str:
    """``text`` without control characters (a log or a file name cannot drive the reader's terminal)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]", "\ufffd", text)


def grade_one(path: Path, questions: list[Question], timeout_s: int = NOTEBOOK_TIMEOUT_S,
              cell_timeout_s: int = CELL_TIMEOUT_S, limits: Limits | None = None,
              hidden: list[Path] = ()) -> tuple[dict, str]:
    """Grade one submission: ({question: points}, feedback in Markdown)."""
    limits = limits or Limits()
    scores = {q.name: 0.0 for q in questions}
    try:
        cells = code_cells(sandbox.read_regular_file(path, SUBMISSION_LIMIT_BYTES))
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = _printable(str(error))[:300]
        print(f"{_printable(str(path))}: not a readable notebook ({reason}); graded 0", flush=True)
        return scores, f"**This file could not be read as a notebook** ({reason}); no question could be graded.\n"
    cases, requests = [], {}
    for q in questions:
        for label, seed in (("public", 0), ("hidden", secrets.randbelow(2**31))):
            case_id = f"{q.name}-{label}"
            requests[case_id] = EXERCISES[q.check].request(seed)
            cases.append({"id": case_id, "check": q.check, "answer": q.answer})
    plan = {"cells": cells, "cases": cases, "cell_timeout": cell_timeout_s, "log_limit": limits.log_bytes}
    boot = BOOT.format(str(Path(__file__).resolve().parents[1]))
    run = sandbox.run_python(boot, sandbox.pack({"plan": plan, "requests": requests}), limits, timeout_s, hidden)
    observations, errors, problem = {}, {}, None
    if run.message_overflow:
        problem = f"its results were larger than {limits.message_bytes // 2**20} MiB"
    elif run.message is not None:
        try:
            message = sandbox.unpack(run.message, limits.message_bytes)
            observations, errors = message["observations"], message.get("errors", {})
            if not isinstance(observations, dict) or not isinstance(errors, dict):
                raise sandbox.BadMessage("no observations")
        except (sandbox.BadMessage, KeyError) as error:
            observations, errors, problem = {}, {}, f"its results could not be read ({error})"
    lines = []
    for q in questions:
        for label in ("public", "hidden"):
            case_id, worth = f"{q.name}-{label}", q.points / 2
            observed = observations.get(case_id)
            try:
                if observed is None:
                    raise LookupError
                EXERCISES[q.check].judge(requests[case_id], observed)
            except LookupError:
                stopped = errors.get(case_id)
                verdict = problem or (f"checking your answer was stopped ({_printable(stopped)[:300]})"
                                      if isinstance(stopped, str) else
                                      "no answer was recorded: the notebook stopped (time limit, memory limit or "
                                      "crash) before this exercise could be checked")
            except CheckFailed as failure:  # its message may quote the learner's text (a repr, an error)
                verdict = _printable(str(failure))[:1000]
            except Exception as error:  # malformed observations: the submission's fault, never ours to crash on
                verdict = f"the answer could not be checked ({type(error).__name__})"
            else:
                scores[q.name] += worth
                verdict = "passed"
            lines.append(f"- **{q.name}**, {label} test ({worth:g} point{'' if worth == 1 else 's'}): {verdict}")
    lines.append("")
    usage = run.usage
    if run.timed_out:
        lines.append(f"The notebook was stopped at its time limit of {timeout_s:g} s.")
    elif run.returncode:
        lines.append(f"The run ended with exit status {run.returncode}.")
    if usage.get("oom_kills"):
        lines.append(f"The memory limit ({sandbox.human(limits.memory)}) was reached: the kernel stopped "
                     f"{usage['oom_kills']} process(es).")
    if usage.get("refused_tasks"):
        lines.append(f"The process limit ({limits.processes}) refused {usage['refused_tasks']} new process(es) or thread(s).")
    text = _printable(run.log.decode("utf-8", "replace"))
    if run.message is None and b"--- sandbox ready" not in run.log_head and not run.timed_out:
        print(f"WARNING: the sandbox could not start Python for {_printable(str(path))}: a problem of this machine "
              f"(see its feedback), not of the notebook.", file=sys.stderr, flush=True)
        lines.append("**The sandbox could not start** (a problem of the grading machine, not of this notebook).")
    peak = f", peak memory {usage['peak_memory'] / 2**20:.0f} MiB" if usage.get("peak_memory") else ""
    lines.append(f"Limits: {run.limits}, {cell_timeout_s:g} s per cell; this run took {run.seconds:.0f} s{peak}.")
    tail = text[-3000:]
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", tail)), default=0))
    dropped = run.log_total - len(run.log)
    note = f" ({dropped} earlier bytes not kept)" if dropped > 0 else ""
    feedback = "\n".join(lines) + f"\n\n<details><summary>What the notebook printed (end){note}</summary>\n\n{fence}\n" \
        + tail + f"\n{fence}\n</details>\n"
    return scores, feedback


def submissions_in(folder: Path) -> list[Path]:
    """Every entry named ``*.ipynb`` under ``folder`` that is not a folder (links and odd files too: they get a row)."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name != ".ipynb_checkpoints":
                    found += submissions_in(Path(entry.path))
            elif entry.name.endswith(".ipynb"):
                found.append(Path(entry.path))
    return sorted(found)


def feedback_name(student: str) -> str:
    """A file name for ``student`` (a relative path) that no other student's can collide with."""
    name = quote(os.fsencode(student), safe="")
    if len(name) > 200:
        name = f"{name[:150]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return f"{name}.md"


def _sync(file) -> None:
    file.flush()
    os.fsync(file.fileno())


def grade_folder(master: Path, submissions: Path, out: Path, timeout_s: int = NOTEBOOK_TIMEOUT_S,
                 cell_timeout_s: int = CELL_TIMEOUT_S, limits: Limits | None = None) -> list[dict]:
    """Grade every ``*.ipynb`` under ``submissions``; write the gradebook (row by row) and feedback into ``out``."""
    questions = questions_of(master)
    most = sum(q.points for q in questions)
    sandbox.check_available()
    submissions, out = Path(submissions), Path(out)
    paths = submissions_in(submissions)
    if not paths:
        raise FileNotFoundError(f"No .ipynb file under {submissions}.")
    repository = Path(__file__).resolve().parents[1]
    hidden = [submissions, out, Path(master).resolve().parent,
              *(repository / name for name in ("notebooks", "_build", "grading", "exercises", ".git", "tests"))]
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "gradebook.csv", "w", newline="", encoding="utf-8", errors="backslashreplace") as book:
        writer = csv.DictWriter(book, fieldnames=["student", "question", "points", "max_points"])
        writer.writeheader()
        _sync(book)
        for path in paths:
            student = path.relative_to(submissions).as_posix()[:-len(".ipynb")]
            try:
                scores, feedback = grade_one(path, questions, timeout_s, cell_timeout_s, limits, hidden)
            except Exception as error:  # the grader's own fault: say so, and still give the submission its row
                traceback.print_exc()
                scores = {q.name: 0.0 for q in questions}
                feedback = (f"**The grader failed on this submission** ({type(error).__name__}: {error}); it got no "
                            "points. Tell the instructor: it must be graded again.\n")
            total = sum(scores.values())
            target = out / "feedback" / feedback_name(student)
            partial = target.with_name(f".{target.name}.partial")
            with open(partial, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"# {_printable(student)}: {total:g} / {most:g} points\n\n{feedback}")
                _sync(f)
            os.replace(partial, target)
            new = [{"student": student, "question": q.name, "points": scores[q.name], "max_points": q.points}
                   for q in questions]
            writer.writerows(new)
            _sync(book)
            rows += new
            print(f"{_printable(student)}: {total:g} / {most:g}", flush=True)
    return rows

def main(argv: list[str]) -> int:
    if argv[:1] == ["--run-submission"]:
        run_submission(int(argv[1]), int(argv[2]))
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
