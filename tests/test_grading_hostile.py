"""Hostile submissions (issue 11): each scores what its one real answer earns, and the machine is intact afterwards.

Every hostile notebook answers q1 (1 point) right and attacks in a cell of its own. One ``grade_folder`` run
grades most of them together, with small limits, and the test then checks the host: no process of the user
nobody or in a grading cgroup is left, no cgroup, no mount, no file of nobody's in the machine's /tmp, the
repository or the cache, and the submissions are byte-identical. A second run does the same without
cgroups (the per-process fallback) on a notebook that even swallows the notebook's time limit.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import resource
import shutil
import stat
import sys
from pathlib import Path

import nbformat
import pytest
from grading_helpers import needs_sandbox, submission

from peft_edu import grading, sandbox
from peft_edu.grading import grade_folder
from peft_edu.sandbox import Limits

ROOT = Path(__file__).resolve().parents[1]
MASTER = ROOT / "notebooks" / "lora.ipynb"
Q1 = "def lora_param_count(d_in, d_out, r):\n    return r * (d_in + d_out)"
EARNS = {"q1": 1.0, "q2": 0.0, "q3": 0.0, "q4": 0.0, "q5": 0.0}  # the one real answer
NOTHING = dict.fromkeys(EARNS, 0.0)
LIMITS = Limits(memory="1200M", processes=64, disk="32M", shm="8M", log_bytes=50_000, message_bytes=4 * 2**20)
OTHER_MARKER = "other-student-" + "7f3a9c"  # in another submission's source, never printed


def hostile(*cells: str, answers: dict | None = None) -> str:
    return nbformat.writes(submission(MASTER, answers or {"q1": Q1}, before=list(cells)))


PLANT = """
import os
# what the old grader read from the sandbox's folder: links to other files, a FIFO, a huge file
os.makedirs("observations", exist_ok=True)
for target, name in [("/etc/shadow", "log.txt"), ({other!r}, "observations/q1-public.json"),
                     ("/proc/self/environ", "observations/q1-public.safetensors")]:
    os.symlink(target, name)
os.mkfifo("observations/q1-hidden.json")
with open("observations/q1-hidden.safetensors", "wb") as f:
    f.truncate(1 << 40)
print("planted", sorted(os.listdir("observations")))
"""
# The attacks that take time switch off their cell's alarm first (a hostile cell may): then the kernel's limits, not
# the 4 s per cell, are what stops them, however loaded the machine; the notebook's own time limit still holds.
NO_ALARM = "import signal; signal.setitimer(signal.ITIMER_REAL, 0)\n"
FORK_BOMB = NO_ALARM + """
import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(3600)
            os._exit(0)
        children += 1
except OSError as error:
    print("fork refused after", children, "children:", type(error).__name__)
"""
MEMORY_HOG = NO_ALARM + """
import subprocess, sys
try:
    whole = bytearray(3 << 30)
except MemoryError:
    print("one process: MemoryError")
# three children of 600 MiB each, each below every per-process limit, 1.8 GiB together; one after the other, so
# that the largest process, the one the kernel stops at the limit, is always a child, never the notebook
HOG = "import sys, time; x = bytearray(600 << 20); print('ready', flush=True); time.sleep(30)"
hogs = []
for _ in range(3):
    hogs.append(subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True))
    hogs[-1].stdout.readline()
for hog in hogs:
    hog.kill()
print("children ended with", [hog.wait() for hog in hogs])
"""
DISK_FILLER = """
import os
for folder in ["/tmp", "/dev/shm"]:
    written = 0
    try:
        with open(folder + "/fill", "wb") as f:
            while True:
                f.write(b"x" * (1 << 20))
                written += 1
                f.flush()
    except OSError as error:
        print(folder, "full after", written, "MiB:", type(error).__name__)
with open("/tmp/sparse", "wb") as f:
    f.truncate(1 << 40)
print("sparse", os.stat("/tmp/sparse").st_size)
for target in ["/", "/usr", "/etc", {venv!r}, {package!r}, {cache!r}, "/root", "/var/tmp", "/proc/sys/kernel/hostname"]:
    try:
        with open(os.path.join(target, "planted-by-a-submission"), "w") as f:
            f.write("x")
        print("WROTE", target)
    except OSError as error:
        print("blocked", target, type(error).__name__)
os.remove("/tmp/fill")
"""
HUGE_STDERR = """
import os, sys
for _ in range(256):
    os.write(2, b"e" * (1 << 20))
for _ in range(1000):
    print("o" * 10_000)
"""
SECRETS = """
import glob, json, os
def peek(path):
    try:
        if os.path.isdir(path):
            return "dir " + " ".join(sorted(os.listdir(path))[:8])
        with open(path, "rb") as f:
            return "read " + f.read(60).decode("utf-8", "replace")
    except Exception as error:
        return type(error).__name__
status = open("/proc/self/status").read()
found = {{
    "uid": os.getuid(), "euid": os.geteuid(), "groups": os.getgroups(),
    "caps": re.findall(r"Cap(?:Eff|Prm|Bnd):\\s*(\\w+)", status), "nnp": re.findall(r"NoNewPrivs:\\s*(\\d)", status),
    "env": sorted(os.environ), "root": sorted(os.listdir("/")),
    "files": {{p: peek(p) for p in [{public!r}, {secret!r}, {master!r}, {other!r}, {build!r}, {git!r}, {exercises!r},
                                    {notebooks!r}, {out!r}, {tests!r}, "/etc/shadow", "/root", "/home", "/proc/1/environ",
                                    "/proc/1/root/etc/shadow"]}},
    "environs": [peek(p) for p in glob.glob("/proc/[0-9]*/environ")],
}}
print("FOUND=" + json.dumps(found))
"""
FLOOD_RESULTS = """
import os, sys
try:
    for _ in range(100):  # 100 MiB on the results pipe (its descriptor is the runner's last argument)
        os.write(int(sys.argv[-1]), b"x" * (1 << 20))
except OSError as error:
    print("results pipe closed:", type(error).__name__)
"""
LOOPS = "while True:\n    pass"
LOOPING_FORWARD = "def lora_forward(x, W0, A, B, alpha, r):\n    while True:\n        pass"
STUBBORN = """
import os, signal, threading, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _ in range(3):
    if os.fork() == 0:
        os.setsid()
        while True:
            time.sleep(1)
threading.Thread(target=lambda: time.sleep(3600)).start()
while True:
    try:
        time.sleep(0.1)
    except BaseException:
        pass
"""
FALLBACK = """
import resource
print("RLIMIT_AS", resource.getrlimit(resource.RLIMIT_AS), "RLIMIT_NPROC", resource.getrlimit(resource.RLIMIT_NPROC))
"""

NOT_NOTEBOOKS = {  # name -> raw bytes: graded 0, each with a row and a feedback naming why
    "list": b"[]", "cells_not_cells": b'{"cells": [1]}', "source_not_text": b'{"cells": [{"cell_type": "code", "source": 5}]}',
    "null": b"null", "deep": b"[" * 200_000, "empty": b"", "binary": hashlib.sha512(b"garbage").digest() * 64,
    "latin1": '{"cells": [{"cell_type": "code", "source": "print(\'caf\xe9\')"}]}'.encode("latin-1"),
}


# --- the host, before and after ------------------------------------------------------------------
def _processes() -> dict[int, str]:
    """pid -> why it matters: each process in a cgroup of this grader's, or of uid 65534 in this process's cgroups.

    (Other graders may run on the same machine at the same time: their sandboxes are in other cgroups.)
    """
    own, found = Path("/proc/self/cgroup").read_text(), {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid = re.search(r"^Uid:\s+\d+\s+(\d+)", status.read_text(), re.M).group(1)
            groups = (status.parent / "cgroup").read_text()
        except (OSError, AttributeError):
            continue
        if f"{sandbox.CGROUP_PREFIX}{os.getpid()}-" in groups or (uid == str(sandbox.SANDBOX_UID) and groups == own):
            found[int(status.parent.name)] = f"uid {uid} {groups.strip()}"
    return found


def _cgroups() -> list[str]:
    """This grader's cgroups (their names hold its pid)."""
    mine = f"{sandbox.CGROUP_PREFIX}{os.getpid()}-"
    return [str(p) for depth in range(1, 6) for p in Path("/sys/fs/cgroup").glob("/".join(["*"] * depth))
            if p.name.startswith(mine)]


def _owned_by_nobody(*folders: Path) -> list[str]:
    """Entries owned by uid 65534 under ``folders`` (only the top level of the machine's /tmp, shared with others)."""
    found = []
    for folder in folders:
        for parent, dirs, files in os.walk(folder):
            dirs[:] = [] if Path(parent) == Path("/tmp") else [d for d in dirs if d not in (".venv", ".git", "_build")]
            for name in dirs + files:
                try:
                    if os.lstat(os.path.join(parent, name)).st_uid == sandbox.SANDBOX_UID:
                        found.append(os.path.join(parent, name))
                except OSError:
                    pass
    return found


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` as (type, size, content hash or link target), without following or opening odd files."""
    found = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_size < 2**26:
                with open(path, "rb") as f:
                    detail = hashlib.sha256(f.read()).hexdigest()
            else:
                detail = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
            found[os.path.relpath(path, folder)] = (stat.S_IFMT(info.st_mode), info.st_size, detail)
    return found


class Host:
    """What must be the same after grading as before it."""

    def __init__(self, *watched: Path):
        self.watched = watched
        self.processes, self.cgroups = _processes(), _cgroups()
        self.mounts = set(Path("/proc/self/mountinfo").read_text().splitlines())
        self.files = _owned_by_nobody(*watched)

    def assert_intact(self) -> None:
        left = {pid: why for pid, why in _processes().items() if pid not in self.processes}
        assert not left, f"processes left behind: {left}"
        assert _cgroups() == self.cgroups, "a grading cgroup was left behind"
        assert set(Path("/proc/self/mountinfo").read_text().splitlines()) == self.mounts, "mounts changed"
        assert _owned_by_nobody(*self.watched) == self.files, "the sandbox left files on the host"


def _gradebook(out: Path) -> dict[str, dict[str, float]]:
    scores = {}
    with open(out / "gradebook.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            scores.setdefault(row["student"], {})[row["question"]] = float(row["points"])
    return scores


pytestmark = needs_sandbox


@pytest.fixture(scope="module")
def mass_run(tmp_path_factory):
    """One grading run over every hostile submission: (scores, feedback per student, the folders, grader's RSS growth)."""
    tmp = tmp_path_factory.mktemp("hostile")
    folder, out, cache = tmp / "submissions", tmp / "out", tmp / "cache"
    for d in (folder / "a", cache):
        d.mkdir(parents=True)
    (cache / "public.txt").write_text("PUBLIC-" + "a11ce5")
    (cache / "secret.txt").write_text("SECRET-FILE-" + "b0b5ec")
    os.chmod(cache / "secret.txt", 0o600)
    other = folder / "other.ipynb"
    paths = {"public": str(cache / "public.txt"), "secret": str(cache / "secret.txt"), "master": str(MASTER),
             "other": str(other), "build": str(ROOT / "_build"), "git": str(ROOT / ".git" / "HEAD"),
             "exercises": str(ROOT / "exercises"), "notebooks": str(ROOT / "notebooks"), "out": str(out),
             "tests": str(ROOT / "tests" / "test_grading.py")}
    notebooks = {
        "other": hostile(f"# {OTHER_MARKER}"),
        "plant": hostile(PLANT.format(other=str(other))),
        "fork_bomb": hostile(FORK_BOMB),
        "memory_hog": hostile(MEMORY_HOG),
        "disk_filler": hostile(DISK_FILLER.format(venv=sys.prefix, package=str(ROOT / "peft_edu"), cache=str(cache))),
        "huge_stderr": hostile(HUGE_STDERR),
        "secrets": hostile("import re\n" + SECRETS.format(**paths)),
        "loops": hostile(LOOPS, answers={"q1": Q1, "q2": LOOPING_FORWARD}),
        "flood_results": hostile(FLOOD_RESULTS),
    }
    for name, text in notebooks.items():
        (folder / f"{name}.ipynb").write_text(text)
    for name, raw in NOT_NOTEBOOKS.items():
        (folder / f"{name}.ipynb").write_bytes(raw)
    (folder / "a" / "b.ipynb").write_text(hostile())                 # a/b and a__b must not share a feedback file
    (folder / "a__b.ipynb").write_text(nbformat.writes(submission(MASTER, {})))
    (folder / os.fsdecode(b"caf\xe9.ipynb")).write_bytes(b"[]")      # a name that is not UTF-8
    with open(folder / "huge.ipynb", "wb") as f:                      # 2 GiB, sparse
        f.truncate(2 << 30)
    os.mkfifo(folder / "fifo.ipynb")
    os.mknod(folder / "device.ipynb", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.symlink(MASTER, folder / "link_to_master.ipynb")              # following it would grade the solutions
    before = _snapshot(folder)
    host = Host(Path("/tmp"), tmp, ROOT, sandbox.cache_dir())
    saved = {k: os.environ.get(k) for k in ("PEFT_EDU_CACHE", "PEFT_EDU_GRADER_SECRET")}
    os.environ.update(PEFT_EDU_CACHE=str(cache), PEFT_EDU_GRADER_SECRET="ENV-SECRET-" + "c0ffee")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        grade_folder(MASTER, folder, out, timeout_s=90, cell_timeout_s=4, limits=LIMITS)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
    host.assert_intact()
    assert _snapshot(folder) == before, "grading changed a submission"
    feedback = {p.name: p.read_text(encoding="utf-8") for p in (out / "feedback").iterdir()}
    yield _gradebook(out), feedback, out, grown
    shutil.rmtree(tmp)  # the FIFO, the device node and the sparse file with it


def test_every_submission_gets_a_row_and_its_own_feedback(mass_run):
    scores, feedback, out, _ = mass_run
    expected = {"other", "plant", "fork_bomb", "memory_hog", "disk_filler", "huge_stderr", "secrets", "loops", "flood_results",
                *NOT_NOTEBOOKS, "a/b", "a__b", "caf\\udce9", "huge", "fifo", "device", "link_to_master"}
    assert set(scores) == expected
    assert all(set(s) == set(EARNS) for s in scores.values())
    assert scores["a/b"] == EARNS and scores["a__b"] == NOTHING
    assert feedback["a%2Fb.md"].startswith("# a/b: 1 / 8") and feedback["a__b.md"].startswith("# a__b: 0 / 8")
    assert "caf%E9.md" in feedback
    assert not [name for name in os.listdir(out / "feedback") if name.startswith(".")]  # no partial file left


def test_files_that_are_not_notebooks_get_zero_and_say_why(mass_run):
    scores, feedback, _, _ = mass_run
    for name in [*NOT_NOTEBOOKS, "huge", "fifo", "device", "link_to_master"]:
        assert scores[name] == NOTHING, name
        assert "could not be read as a notebook" in feedback[f"{name}.md"], name
    assert "symbolic link" in feedback["link_to_master.md"]
    assert "larger than" in feedback["huge.md"]
    assert "not a regular file" in feedback["fifo.md"] and "not a regular file" in feedback["device.md"]


@pytest.mark.parametrize("name", ["plant", "fork_bomb", "memory_hog", "disk_filler", "huge_stderr", "secrets", "loops"])
def test_each_attack_scores_what_its_real_answer_earns(mass_run, name):
    scores, feedback, _, _ = mass_run
    assert scores[name] == EARNS, feedback[f"{name}.md"]
    assert "could not start" not in feedback[f"{name}.md"]
    assert len(feedback[f"{name}.md"]) < 8_000


def test_a_flood_on_the_results_pipe_is_cut_off_and_costs_only_its_sender(mass_run):
    scores, feedback, _, _ = mass_run
    assert scores["flood_results"] == NOTHING  # it spoiled its own results: nothing to judge
    assert "results pipe closed: BrokenPipeError" in feedback["flood_results.md"]
    assert "its results were larger than 4 MiB" in feedback["flood_results.md"]


def test_planted_links_fifos_and_huge_files_are_never_read(mass_run):
    _, feedback, _, _ = mass_run
    text = feedback["plant.md"]
    assert "planted" in text and "root:" not in text and OTHER_MARKER not in text


def test_the_kernel_enforces_the_limits_on_the_sandbox_as_a_whole(mass_run):
    _, feedback, _, grown = mass_run
    assert "fork refused after" in feedback["fork_bomb.md"] and "The process limit (64) refused" in feedback["fork_bomb.md"]
    hog = feedback["memory_hog.md"]
    assert "one process: MemoryError" in hog and "The memory limit (1200 MiB) was reached" in hog
    peak = int(re.search(r"peak memory (\d+) MiB", hog).group(1))
    assert peak <= 1200
    disk = feedback["disk_filler.md"]
    assert 24 <= int(re.search(r"/tmp full after (\d+) MiB", disk).group(1)) <= 32
    assert 4 <= int(re.search(r"/dev/shm full after (\d+) MiB", disk).group(1)) <= 8
    assert "sparse 1099511627776" in disk and "WROTE" not in disk
    assert "(cgroup v" in disk
    assert grown < 150 * 2**20, f"the grader grew by {grown / 2**20:.0f} MiB reading 266 MB of output and 100 MiB of results"
    assert "earlier bytes not kept" in feedback["huge_stderr.md"]
    assert "--- cell" in feedback["huge_stderr.md"][-1000:]  # the grader's own lines are not drowned


def test_the_sandbox_sees_neither_secrets_nor_solutions(mass_run):
    _, feedback, out, _ = mass_run
    everything = "".join(feedback.values()) + (out / "gradebook.csv").read_text()
    for secret in ["SECRET-FILE-b0b5ec", "ENV-SECRET-c0ffee", OTHER_MARKER, "BEGIN SOLUTION", "root:$", "root:*", "root:!"]:
        assert secret not in everything
    found = json.loads(re.search(r"^FOUND=(.*)$", feedback["secrets.md"], re.M).group(1))
    assert (found["uid"], found["euid"], found["groups"], found["nnp"]) == (65534, 65534, [], ["1"])
    assert set(found["caps"]) == {"0000000000000000"}
    assert "PEFT_EDU_GRADER_SECRET" not in found["env"] and len(found["env"]) < 20
    files = found["files"]
    public, secret = (v for k, v in files.items() if k.endswith(("public.txt", "secret.txt")))
    assert public == "read PUBLIC-a11ce5"            # the folder is there, and readable...
    assert secret == "PermissionError"              # ...but root's mode-600 file in it is not
    for name, seen in files.items():
        if not name.endswith("public.txt") and name != "/proc/1/environ":
            assert seen in ("FileNotFoundError", "PermissionError") or seen.startswith("dir "), (name, seen)
    assert files["/etc/shadow"] == "FileNotFoundError" and files["/proc/1/environ"] == "PermissionError"
    allowed = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"} | {
        Path(p).parts[1] for p in (sys.prefix, sys.base_prefix, str(ROOT))}
    assert set(found["root"]) <= allowed, found["root"]


def test_loops_in_a_cell_and_in_an_answer_cost_only_themselves(mass_run):
    _, feedback, _, _ = mass_run
    loops = feedback["loops.md"]
    assert "_Timeout: stopped after 4 s" in loops  # the cell's loop
    assert "q2**, hidden test (1 point): checking your answer was stopped (_Timeout: stopped after 4 s)" in loops


def test_without_cgroups_the_limits_are_per_process_and_a_stubborn_notebook_is_still_stopped(tmp_path):
    folder, out = tmp_path / "submissions", tmp_path / "out"
    folder.mkdir()
    (folder / "stubborn.ipynb").write_text(hostile(STUBBORN))
    (folder / "fallback.ipynb").write_text(hostile(FALLBACK))
    before, host = _snapshot(folder), Host(Path("/tmp"), tmp_path, ROOT)
    grade_folder(MASTER, folder, out, timeout_s=20, cell_timeout_s=3, limits=Limits(cgroups=False, processes=64))
    host.assert_intact()
    assert _snapshot(folder) == before
    scores = _gradebook(out)
    assert scores == {"stubborn": NOTHING, "fallback": EARNS}
    stubborn, fallback = ((out / "feedback" / f"{n}.md").read_text() for n in ("stubborn", "fallback"))
    assert "time limit of 20 s" in stubborn
    assert "no writable cgroup" in fallback and "RLIMIT_NPROC (64, 64)" in fallback


# --- the parts that need no sandbox ---------------------------------------------------------------
def test_messages_from_the_sandbox_are_validated(tmp_path):
    import torch
    good = sandbox.pack({"observations": {"q1-public": {"value": torch.ones(2), "n": [1, 2.5, None, "x"]}}})
    assert torch.equal(sandbox.unpack(good, 2**20)["observations"]["q1-public"]["value"], torch.ones(2))
    header = sandbox._HEADER
    bad = [b"", good[:-1], b"XXXXXXXX" + good[8:], good[:8] + (2**62).to_bytes(8, "big") + good[16:],
           header.pack(sandbox.MAGIC, 2, 0) + b"[]", header.pack(sandbox.MAGIC, 4, 0) + b"null",
           header.pack(sandbox.MAGIC, 23, 0) + b'{"a": {"__tensor__": 1}}',
           header.pack(sandbox.MAGIC, 2, 5) + b"{}" + b"\xff" * 5, header.pack(sandbox.MAGIC, 400_000, 0) + b"[" * 400_000]
    for message in bad:
        with pytest.raises(sandbox.BadMessage):
            sandbox.unpack(message, 2**20)
    with pytest.raises(sandbox.BadMessage, match="larger"):
        sandbox.unpack(good, 10)
    with pytest.raises(sandbox.BadMessage, match="data part"):  # bounded before it is parsed
        sandbox.unpack(sandbox.pack({"observations": {"x": "a" * 1000}}), 2**20, json_limit=500)
    with pytest.raises(sandbox.BadMessage, match="data part"):  # the safetensors header too
        sandbox.unpack(sandbox.pack({"t": torch.ones(1), "u": torch.ones(1), "v": torch.ones(1)}), 2**20, json_limit=400)


def test_submissions_are_read_only_as_bounded_regular_files(tmp_path):
    (tmp_path / "ok").write_bytes(b"12345")
    assert sandbox.read_regular_file(tmp_path / "ok", 5) == b"12345"
    with pytest.raises(ValueError, match="larger"):
        sandbox.read_regular_file(tmp_path / "ok", 4)
    os.symlink(tmp_path / "ok", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="symbolic link"):
        sandbox.read_regular_file(tmp_path / "link", 100)
    with pytest.raises(ValueError, match="not a regular file"):
        sandbox.read_regular_file(tmp_path / "fifo", 100)  # and does not block


def test_feedback_names_cannot_collide():
    names = ["a/b", "a__b", "a%2Fb", "a b", "é", os.fsdecode(b"\xe9"), "x" * 300, "x" * 301]
    files = [grading.feedback_name(n) for n in names]
    assert len(set(files)) == len(files) and all("/" not in f and len(f) < 255 for f in files)


def test_a_grader_crash_keeps_every_row_graded_before_it(tmp_path, monkeypatch):
    folder = tmp_path / "submissions"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.ipynb").write_text("{}")
    calls = []

    def fake(path, questions, *args):
        calls.append(path.name)
        if path.name == "b.ipynb":
            raise RuntimeError("a bug of the grader")
        if path.name == "c.ipynb":
            raise KeyboardInterrupt  # the grader itself dies
        return {q.name: q.points for q in questions}, "fine\n"

    monkeypatch.setattr(grading, "grade_one", fake)
    with pytest.raises(KeyboardInterrupt):
        grade_folder(MASTER, folder, tmp_path / "out")
    scores = _gradebook(tmp_path / "out")
    assert scores == {"a": {"q1": 1.0, "q2": 2.0, "q3": 1.0, "q4": 2.0, "q5": 2.0}, "b": NOTHING}
    assert "The grader failed on this submission" in (tmp_path / "out" / "feedback" / "b.md").read_text()


def test_a_cgroup_v2_gets_memory_swap_and_task_limits(tmp_path, monkeypatch):
    """This machine may have cgroup v1 only: the v2 path on a fake cgroup file system (a folder of files)."""
    fake = tmp_path / "cgroup"
    (fake / "grader.scope").mkdir(parents=True)
    (fake / "cgroup.controllers").write_text("cpu memory pids\n")
    (fake / "cgroup.subtree_control").write_text("memory pids\n")
    (fake / "grader.scope" / "cgroup.controllers").write_text("")  # a leaf with processes: nothing to delegate
    monkeypatch.setattr(sandbox, "_mounts", lambda: [("/", str(fake), "cgroup2", set())])
    monkeypatch.setattr(sandbox, "_own_cgroups", lambda: {"": "/grader.scope"})
    monkeypatch.setattr(sandbox.Cgroup, "_joinable", lambda self: True)
    group = sandbox.Cgroup.create(Limits(memory="2G", processes=32))
    (folder,) = group.dirs.values()
    assert folder.parent == fake and folder.name.startswith(sandbox.CGROUP_PREFIX)
    assert [(folder / f).read_text() for f in ("memory.max", "memory.swap.max", "pids.max")] == [str(2 << 30), "0", "32"]
    assert group.procs == [str(folder / "cgroup.procs")] and group.controls == {"memory", "pids"}
