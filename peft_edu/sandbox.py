"""The grading sandbox: run untrusted Python under bubblewrap, with limits the kernel enforces, and take back data.

``run_python(boot, payload, limits, timeout_s)`` runs ``python -I -B -c boot IN_FD OUT_FD`` (the grader's own
interpreter) in a fresh sandbox and returns an ``Outcome``. Nothing comes back through the file system:

- **in**: ``payload`` (one message, see ``pack``) on a sealed memfd the sandbox can read but not change or grow;
- **out**: one message on a pipe, read here up to ``limits.message_bytes`` (more closes the pipe), then checked
  by ``unpack`` (magic, lengths, JSON, safetensors; never pickle) before anything uses it;
- **log**: stdout and stderr share one pipe; only its last ``limits.log_bytes`` bytes are kept.

Both pipes are read with ``select`` against the notebook's deadline; the grader never opens a path the sandbox
could have created or replaced. The sandbox itself (this module needs root):

- bubblewrap **without a user namespace** (new mount, pid, ipc, net, uts and cgroup namespaces), so that its
  mounts can reach what the grader can; then ``setpriv`` drops to **uid/gid 65534 (nobody)** with no groups, no
  capabilities (bounding set emptied) and no_new_privs. As nobody, not as root seen through a user namespace,
  the submission cannot read root's files, even those it can see;
- the file system is a **whitelist of read-only binds**: /usr (and the /bin, /lib... links or folders), a few
  files of /etc, the Python environment (venv and base interpreter), the ``peft_edu`` package and the models and
  data cache. The only writable places are ``/tmp`` (also HOME and the working folder) and ``/dev/shm``, two
  tmpfs of a fixed size that live and die in the sandbox's own mount namespace. ``--clearenv``: the environment
  is the few variables of ``_environment``;
- a **fresh cgroup** (v2, or v1's memory and pids hierarchies) that the first process enters before it execs
  bubblewrap: memory (and swap) for the sandbox as a whole, and a cap on its tasks. It is emptied (SIGKILL) and
  removed after each run. Where no cgroup can be made, the limits fall back to per process (RLIMIT_AS) and per
  user (RLIMIT_NPROC for uid 65534), and ``Outcome.limits`` says so;
- every process also has RLIMIT_AS, no core files, and dies with the grader (``--pdeathsig``, bwrap's
  ``--die-with-parent``, and the pid namespace: when its first process dies, the kernel kills the rest).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import re
import secrets
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

SANDBOX_UID = 65534  # nobody: owns nothing on the host
CGROUP_PREFIX = "peft_edu-grade-"


@dataclass(frozen=True)
class Limits:
    memory: str = "12G"              # the sandbox as a whole (cgroup; memory+swap), and each process's address space
    processes: int = 256             # tasks (processes and threads) at once
    disk: str = "1G"                 # /tmp, its only writable folder (a tmpfs); /dev/shm gets `shm` more
    shm: str = "64M"
    log_bytes: int = 200_000         # the end of what it prints that is kept
    message_bytes: int = 64 * 2**20  # its results
    cgroups: bool = True             # False: per-process limits only (what happens where no cgroup is writable)


def to_bytes(size: str | int) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    size = str(size)
    return int(float(size[:-1]) * units[size[-1].upper()]) if size[-1:].upper() in units else int(size)


# --- the only format that crosses the boundary: JSON + safetensors, length-prefixed ---------------------------
MAGIC = b"PEFTEDU1"
_HEADER = struct.Struct(">8sQQ")  # magic, JSON length, safetensors length
RESULT_JSON_BYTES = 4 * 2**20     # the JSON of the results (parsed, it takes some 20 times as much memory here)


class BadMessage(ValueError):
    """What came back is not a well-formed message."""


def pack(data) -> bytes:
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
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot send a {type(value).__name__}")

    body = json.dumps(encode(data)).encode()
    blob = _st_save(tensors) if tensors else b""
    return _HEADER.pack(MAGIC, len(body), len(blob)) + body + blob


def json_size(message: bytes) -> int:
    return _HEADER.unpack_from(message)[1]


def unpack(message: bytes, limit: int, json_limit: int | None = RESULT_JSON_BYTES) -> dict:
    """The dict that ``pack`` encoded; ``BadMessage`` for anything else (truncated, oversized, malformed).

    ``json_limit`` bounds what is parsed into Python objects: the JSON, and the safetensors header (a quarter).
    """
    if len(message) > limit:
        raise BadMessage(f"larger than {limit} bytes")
    if len(message) < _HEADER.size:
        raise BadMessage("truncated")
    magic, n_json, n_blob = _HEADER.unpack_from(message)
    if magic != MAGIC:
        raise BadMessage("not a results message")
    if _HEADER.size + n_json + n_blob > len(message):
        raise BadMessage("truncated")
    start = _HEADER.size + n_json
    if json_limit is not None and (n_json > json_limit or (
            n_blob and int.from_bytes(message[start:start + 8].ljust(8, b"\xff"), "little") > json_limit // 4)):
        raise BadMessage(f"its data part is larger than {json_limit // 2**20} MiB")
    try:
        data = json.loads(message[_HEADER.size:start])
        tensors = _st_load(bytes(message[start:start + n_blob])) if n_blob else {}

        def decode(value):
            if isinstance(value, dict):
                if set(value) == {"__tensor__"}:
                    return tensors[value["__tensor__"]]
                return {k: decode(v) for k, v in value.items()}
            if isinstance(value, list):
                return [decode(v) for v in value]
            return value

        data = decode(data)
    except Exception as error:  # JSON, safetensors, a missing tensor, nesting too deep: all the sender's fault
        raise BadMessage(f"malformed ({type(error).__name__})") from None
    if not isinstance(data, dict):
        raise BadMessage("not an object")
    return data


# --- what the grader reads from the submissions folder: a bounded regular file, never a link ----------------
def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; ``ValueError`` saying why not."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise ValueError(f"it is {kind}")
    if info.st_size > limit:
        raise ValueError(f"it is larger than {limit // 2**20} MiB")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("it is not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"it is larger than {limit // 2**20} MiB")
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- cgroups ------------------------------------------------------------------------------------------------
def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(root in its hierarchy, mount point, file system type, super options) of each mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3:
            unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)  # noqa: E731
            found.append((unescape(fields[3]), unescape(fields[4]), tail[0], set(tail[2].split(","))))
    return found


def _own_cgroups() -> dict[str, str]:
    """Controllers ("memory", "pids,cpu", "" for v2) -> this process's cgroup in that hierarchy."""
    return dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())


def _inside(mount_point: str, mount_root: str, path: str) -> Path:
    rel = os.path.relpath(path, mount_root) if (path + "/").startswith(mount_root.rstrip("/") + "/") else "."
    return Path(mount_point) / rel


class Cgroup:
    """A fresh cgroup for one sandbox: cgroup v2 with memory and pids, or v1's memory and pids hierarchies."""

    def __init__(self, version: int, dirs: dict[str, Path]):
        self.version, self.dirs = version, dirs  # controller ("memory", "pids", or "" for v2) -> its folder

    @classmethod
    def create(cls, limits: Limits) -> Cgroup | None:
        memory, tasks = str(to_bytes(limits.memory)), str(limits.processes)
        name = f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        own = _own_cgroups()
        for root, point, fstype, _ in _mounts():
            if fstype != "cgroup2" or "" not in own:
                continue
            for parent in (_inside(point, root, own[""]), Path(point)):
                try:
                    if not {"memory", "pids"} <= set((parent / "cgroup.controllers").read_text().split()):
                        continue
                    if not {"memory", "pids"} <= set((parent / "cgroup.subtree_control").read_text().split()):
                        (parent / "cgroup.subtree_control").write_text("+memory +pids")
                    _remove_stale(parent)
                    (parent / name).mkdir()
                except OSError:
                    continue
                group = cls(2, {"": parent / name})
                if group._write("", "memory.max", memory) and group._write("", "pids.max", tasks) and group._joinable():
                    group._write("", "memory.swap.max", "0")
                    return group
                group.remove()
        dirs = {}
        for controller in ("memory", "pids"):
            for root, point, fstype, options in _mounts():
                path = next((p for c, p in own.items() if controller in c.split(",")), None)
                if fstype == "cgroup" and controller in options and path is not None:
                    parent = _inside(point, root, path)
                    try:
                        _remove_stale(parent)
                        (parent / name).mkdir()
                        dirs[controller] = parent / name
                    except OSError:
                        pass
                    break
        group = cls(1, dirs)
        ok = ((not dirs.get("memory") or group._write("memory", "memory.limit_in_bytes", memory))
              and (not dirs.get("pids") or group._write("pids", "pids.max", tasks)))
        if not ok or not dirs or not group._joinable():
            group.remove()
            return None
        if dirs.get("memory"):
            group._write("memory", "memory.memsw.limit_in_bytes", memory)  # absent without swap accounting
        return group

    def _joinable(self) -> bool:
        """Whether a process can enter it (it may not, in a container): tried with a process that exits at once."""
        try:
            return subprocess.run(["/bin/sh", "-c", 'for f; do echo $$ > "$f" || exit 1; done', "sh", *self.procs],
                                  stderr=subprocess.DEVNULL, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _write(self, controller: str, file: str, value: str) -> bool:
        try:
            (self.dirs[controller] / file).write_text(value)
            return True
        except OSError:
            return False

    def _read(self, controller: str, file: str) -> str:
        try:
            return (self.dirs[controller] / file).read_text() if controller in self.dirs else ""
        except OSError:
            return ""

    @property
    def procs(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    @property
    def controls(self) -> set[str]:
        return {"memory", "pids"} if self.version == 2 else set(self.dirs)

    def describe(self) -> str:
        return f"cgroup v{self.version}" if self.version == 2 else "cgroup v1"

    def pids(self) -> set[int]:
        return {int(p) for d in self.dirs.values() for p in self._read_dir(d).split()}

    @staticmethod
    def _read_dir(folder: Path) -> str:
        try:
            return (folder / "cgroup.procs").read_text()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL every process in it, until it is empty (at most a few seconds)."""
        if self.version == 2:
            self._write("", "cgroup.kill", "1")
        for _ in range(100):
            alive = self.pids()
            if not alive:
                return
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def usage(self) -> dict:
        def number(text: str, key: str | None = None) -> int:
            if key is not None:
                found = re.search(rf"^{key} (\d+)", text, re.M)
                return int(found.group(1)) if found else 0
            return int(text) if text.strip().isdigit() else 0

        if self.version == 2:
            return {"peak_memory": number(self._read("", "memory.peak")),
                    "oom_kills": number(self._read("", "memory.events"), "oom_kill"),
                    "refused_tasks": number(self._read("", "pids.events"), "max"),
                    "peak_tasks": number(self._read("", "pids.peak"))}
        return {"peak_memory": number(self._read("memory", "memory.max_usage_in_bytes")),
                "oom_kills": number(self._read("memory", "memory.oom_control"), "oom_kill"),
                "refused_tasks": number(self._read("pids", "pids.events"), "max"),
                "peak_tasks": number(self._read("pids", "pids.peak"))}

    def remove(self) -> None:
        for folder in self.dirs.values():
            for _ in range(100):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def _remove_stale(parent: Path) -> None:
    """Empty cgroups left by a grader that was killed (their name holds its pid, no longer alive)."""
    for folder in parent.glob(f"{CGROUP_PREFIX}*"):
        try:
            os.kill(int(folder.name[len(CGROUP_PREFIX):].split("-")[0]), 0)
        except ProcessLookupError:
            try:
                folder.rmdir()
            except OSError:
                pass
        except (ValueError, OSError):
            pass


# --- the command --------------------------------------------------------------------------------------------
def check_available() -> None:
    """Raise ``RuntimeError`` saying what is missing for the sandbox (root, bubblewrap, util-linux)."""
    if os.geteuid() != 0:
        raise RuntimeError("Grading needs root (sudo make grade ...): the sandbox runs submissions as the user nobody, "
                           "in a cgroup of their own, which only root can set up.")
    for tool in ("bwrap", "setpriv", "prlimit"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"Grading needs `{tool}` for its sandbox: apt-get install bubblewrap util-linux.")


def cache_dir() -> Path:
    """The models and data cache (``peft_edu.assets.cache_dir``, without importing ``datasets`` here)."""
    return Path(os.environ.get("PEFT_EDU_CACHE") or "~/.cache/peft_edu").expanduser()


def _environment() -> dict[str, str]:
    threads = os.environ.get("OMP_NUM_THREADS", "")
    threads = threads if threads.isdigit() and 0 < int(threads) <= 64 else str(min(4, os.cpu_count() or 1))
    try:
        user = pwd.getpwuid(SANDBOX_UID).pw_name
    except KeyError:
        user = "nobody"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "USER": user, "LOGNAME": user,
           "LANG": "C.UTF-8", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PEFT_EDU_PROGRESS": "0", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if cache_dir().is_dir():
        env["PEFT_EDU_CACHE"] = os.path.abspath(cache_dir())
    return env


def _binds(hidden: list[Path], disk: str) -> list[str]:
    """bwrap's file system: the whitelist, each read-only, with its parent folders traversable by nobody."""
    args = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--dev", "/dev", "--proc", "/proc", "--perms", "0755", "--dir", "/etc"]
    for name in ("passwd", "group", "nsswitch.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime"):
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    # /tmp before the binds: the course may itself live under the machine's /tmp (a CI clone)
    args += ["--perms", "1777", "--size", str(to_bytes(disk)), "--tmpfs", "/tmp"]
    package = Path(__file__).resolve().parent
    wanted = {Path(os.path.abspath(p)) for p in (sys.prefix, sys.base_prefix, package, cache_dir()) if os.path.isdir(p)}
    system = [Path(t) for t in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")]
    keep = sorted((p for p in wanted if not any(p != q and p.is_relative_to(q) for q in [*wanted, *system])),
                  key=lambda p: len(p.parts))
    made = {Path("/"), Path("/tmp"), Path("/etc")}
    for path in keep:
        for parent in reversed(path.parents):
            if parent not in made:
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        args += ["--ro-bind", str(path), str(path)]
    for folder in hidden:  # belt and braces: nothing the sandbox must not see may lie under a bound folder
        folder = Path(os.path.abspath(folder))
        if folder.exists() and any(folder.is_relative_to(p) for p in [*keep, *system]):
            args += ["--tmpfs", str(folder)]
    return args


def command(python_args: list[str], limits: Limits, cgroup: Cgroup | None, hidden: list[Path]) -> list[str]:
    """The argv that runs ``python python_args`` in the sandbox (see the module's docstring)."""
    join = []
    if cgroup is not None:  # the first process enters the cgroup, then execs the rest: nothing runs outside it
        join = ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"',
                "sh", *cgroup.procs, "--"]
    rlimits = [f"--as={to_bytes(limits.memory)}", "--core=0"]
    if cgroup is None or "pids" not in cgroup.controls:
        rlimits.append(f"--nproc={limits.processes}")  # per user: counts every process of uid 65534
    binds = _binds(hidden, limits.disk)
    setenv = [arg for key, value in _environment().items() for arg in ("--setenv", key, value)]
    return [*join, shutil.which("setpriv"), "--pdeathsig", "KILL", "--",
            shutil.which("bwrap"), "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv", *setenv, *binds,
            "--perms", "1777", "--size", str(to_bytes(limits.shm)), "--tmpfs", "/dev/shm", "--chdir", "/tmp", "--",
            shutil.which("prlimit"), *rlimits, "--",
            shutil.which("setpriv"), f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            sys.executable, "-I", "-B", *python_args]


# --- running it ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    returncode: int | None = None
    timed_out: bool = False
    log: bytes = b""                 # the end of what it printed
    log_head: bytes = b""            # and its first 4 kB
    log_total: int = 0               # bytes it printed in all
    message: bytes | None = None     # what it sent back (at most limits.message_bytes)
    message_overflow: bool = False
    seconds: float = 0.0
    limits: str = ""                 # how the limits were enforced, in words
    usage: dict = field(default_factory=dict)


def human(size: str | int) -> str:
    """``"12G"`` as ``"12 GiB"``."""
    value, units = to_bytes(size), (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
    exact = next((f"{value // scale} {unit}" for unit, scale in units if value >= scale and value % scale == 0), None)
    return exact or next((f"{value / scale:.4g} {unit}" for unit, scale in units if value >= scale), f"{value} B")


def _describe(limits: Limits, cgroup: Cgroup | None, timeout_s: float) -> str:
    memory, tasks = f"memory {human(limits.memory)}", f"{limits.processes} processes"
    if cgroup is None:
        how = f"{memory} per process (no writable cgroup: address space only), {tasks} of the user nobody (RLIMIT_NPROC)"
    else:
        how = (f"{memory} for the whole notebook" if "memory" in cgroup.controls else f"{memory} per process") + ", " \
            + (f"{tasks}" if "pids" in cgroup.controls else f"{tasks} of the user nobody") + f" ({cgroup.describe()})"
    return f"{how}, /tmp {human(limits.disk)}, {timeout_s:g} s per notebook"


def _sealed(payload: bytes) -> int:
    fd = os.memfd_create("peft_edu-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def run_python(boot: str, payload: bytes, limits: Limits, timeout_s: float, hidden: list[Path] = ()) -> Outcome:
    """Run ``python -I -B -c boot IN_FD OUT_FD`` in the sandbox; ``payload`` is readable from IN_FD."""
    check_available()
    in_fd = _sealed(payload)
    (log_r, log_w), (out_r, out_w) = os.pipe(), os.pipe()
    opened = {in_fd, log_r, log_w, out_r, out_w}  # closed as soon as they are no longer needed, each once
    outcome, proc, cgroup, start = Outcome(), None, None, time.monotonic()
    try:
        cgroup = Cgroup.create(limits) if limits.cgroups else None
        outcome.limits = _describe(limits, cgroup, timeout_s)
        argv = command(["-c", boot, str(in_fd), str(out_w)], limits, cgroup, list(hidden))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_w, stderr=log_w, pass_fds=(in_fd, out_w),
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True)
        for fd in (in_fd, log_w, out_w):
            os.close(fd), opened.discard(fd)
        _collect(proc, {log_r: "log", out_r: "out"}, opened, limits, start + timeout_s, outcome, cgroup)
    finally:
        for fd in opened:
            os.close(fd)
        if proc is not None and proc.poll() is None:
            proc.kill()
        if cgroup is not None:
            cgroup.kill()
        if proc is not None:
            proc.wait()
            outcome.returncode = proc.returncode
        if cgroup is not None:
            outcome.usage = cgroup.usage()
            cgroup.remove()
    outcome.seconds = time.monotonic() - start
    return outcome


def _collect(proc, fds: dict[int, str], opened: set[int], limits: Limits, deadline: float, outcome: Outcome,
             cgroup: Cgroup | None) -> None:
    """Read the log and the message until both pipes close, the sandbox ends, or the deadline; kill at the deadline."""
    log, message = bytearray(), bytearray()
    selector = selectors.DefaultSelector()
    for fd in fds:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)

    def done(fd: int) -> None:
        selector.unregister(fd)
        os.close(fd), opened.discard(fd)  # for the message pipe: a writer still at it gets EPIPE
    ended = None
    while selector.get_map():
        now = time.monotonic()
        if ended is None and proc.poll() is not None:
            ended = now  # its pid namespace is gone: the pipes close at once, unless something odd holds them
        if now > deadline and not outcome.timed_out:
            outcome.timed_out = True
            proc.kill()
            if cgroup is not None:
                cgroup.kill()
            ended = ended or now
        if ended is not None and now > ended + 3:
            break
        for key, _ in selector.select(timeout=0.2):
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError as error:
                if error.errno != errno.EINTR:
                    done(key.fd)
                continue
            if not chunk:
                done(key.fd)
            elif fds[key.fd] == "log":
                if outcome.log_total < 4096:
                    outcome.log_head += chunk[:4096 - outcome.log_total]
                outcome.log_total += len(chunk)
                log += chunk
                if len(log) > 2 * limits.log_bytes:
                    del log[:-limits.log_bytes]
            elif len(message) + len(chunk) > limits.message_bytes:
                outcome.message_overflow = True
                done(key.fd)
            else:
                message += chunk
    selector.close()
    outcome.log = bytes(log[-limits.log_bytes:])
    outcome.message = bytes(message) if message and not outcome.message_overflow else None
