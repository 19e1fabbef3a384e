"""Run model-written Python against tests in a separate, contained process (rlfleet never ``eval``s model output).

:meth:`Sandbox.run` starts a small launcher (this module's :data:`LAUNCHER`, rlfleet's own code, in a fresh
``python -I -S``) with an empty environment, in a new session. The launcher contains the program, then execs an
isolated interpreter (``-I -S -B``, environment ``PATH`` only) on a runner that executes the solution and then the
tests. How each limit is enforced:

- **User**: as root, the launcher drops to ``uid`` (nobody, 65534) before anything else; otherwise it keeps the
  caller's uid. ``no_new_privs`` is set, so set-uid programs gain nothing.
- **Namespaces**: it then unshares a user namespace (mapping only its own uid) with new mount, PID, IPC and (unless
  ``network="allow"``) network namespaces. The network namespace has only a loopback device, which is down: no
  connection to anything, the host's loopback included. Abstract Unix sockets are per network namespace too.
- **Files**: every mount is remounted read-only in the new mount namespace, and the working directory (an empty
  ``mkdtemp`` directory, removed afterwards) becomes a private tmpfs of ``max_disk_bytes``; ``/proc`` is remounted
  for the new PID namespace, so other processes (their command lines) are not visible.
- **Processes**: ``RLIMIT_NPROC``, set after the user namespace exists, counts the processes of the sandbox's own
  user namespace (Linux >= 5.14 counts per namespace), so concurrent sandboxes do not share the quota; root would be
  exempt, hence the uid drop. The program is PID 1's only child tree: when PID 1 exits, the kernel kills the rest.
- **CPU / memory / files**: ``RLIMIT_CPU`` (soft = hard: SIGKILL, since PID 1 ignores SIGXCPU; the launcher
  reads the dead process's CPU time to tell it from other kills), ``RLIMIT_AS``, ``RLIMIT_FSIZE``,
  ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``.
- **Wall time and output**: the caller reads stdout+stderr up to ``max_output_bytes`` until ``timeout_s``; past
  either it kills the session's process group (the launcher and PID 1, and so the whole PID namespace).

A pass needs exit status 0 *and* a per-run nonce that the runner prints after the tests, so a program that exits 0
early (``sys.exit(0)``, ``os._exit(0)``) fails. Not contained: a program that deliberately reads the nonce from its
own interpreter's memory, or returns objects whose ``__eq__`` is always true, can fake a pass (the tests run in its
process); there is no seccomp filter, so the kernel's whole system-call surface is reachable; files readable by
everyone stay readable (read-only). Needs Linux user namespaces; where they are refused, :meth:`Sandbox.check`
raises :class:`SandboxUnavailable`.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

STATUSES = ("ok", "failed", "timeout", "memory", "killed", "output_limit", "error")
NOBODY = 65534
SETUP_FAILED, CPU_EXCEEDED, MEMORY_EXIT = 125, 124, 3  # launcher and runner exit statuses


class SandboxUnavailable(RuntimeError):
    """The platform refuses what the sandbox needs (user or network namespaces, an interpreter it can run)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits; every one is enforced by the kernel or by the caller's read loop (see the module docstring)."""

    timeout_s: float = 10.0  # wall clock, from start to the last byte of output
    cpu_s: int = 5  # CPU seconds of each process
    memory_bytes: int = 512 * 2**20  # address space of each process
    max_processes: int = 32  # processes and threads in the sandbox
    max_file_bytes: int = 2**20  # largest file it may write
    max_disk_bytes: int = 8 * 2**20  # size of its working directory (a tmpfs)
    max_open_files: int = 64
    max_output_bytes: int = 64 * 2**10  # stdout + stderr; more kills it
    excerpt_chars: int = 2000  # kept of the output's end, in the result

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name}: must be > 0, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # one of STATUSES; "error" = the sandbox itself could not run the program
    seconds: float
    output: str  # the end of stdout + stderr


# The launcher: rlfleet's own code, run as `python -I -S -c LAUNCHER` with the run's spec (JSON) on stdin. It never
# executes the program itself: it contains it, then execs a fresh interpreter on the runner.
LAUNCHER = r'''
import ctypes, json, os, re, resource, signal, sys  # all imports first: after the uid drop, rlfleet's prefix may be unreadable
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEEP = {2: 2, 4: 4, 8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # statvfs flag -> mount flag (locked ones must stay)
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
step = "reading the spec"

def call(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

def mount_points():
    with open("/proc/self/mountinfo") as f:
        return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]

try:
    spec = json.loads(sys.stdin.buffer.read())
    if os.geteuid() == 0:
        step = "dropping root"
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
        call(libc.prctl(4, 1, 0, 0, 0), "PR_SET_DUMPABLE")  # a uid change clears it; /proc/self/*_map needs it
    uid, gid = os.getuid(), os.getgid()
    call(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    step = "unshare (user, mount, PID, IPC" + (")" if spec["allow_network"] else ", network)")
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (0 if spec["allow_network"] else CLONE_NEWNET)
    call(libc.unshare(flags), "unshare")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"{uid} {uid} 1")
    write("/proc/self/gid_map", f"{gid} {gid} 1")
    step = "mounts"
    call(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    for point in mount_points():
        try:
            keep = sum(m for s, m in KEEP.items() if os.statvfs(point).f_flag & s)
            call(libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None), point)
        except OSError:
            if point == "/":
                raise
    work = spec["workdir"].encode()
    options = f"size={spec['max_disk_bytes']},nr_inodes=1024,mode=0700,uid={uid},gid={gid}".encode()
    call(libc.mount(b"tmpfs", work, b"tmpfs", MS_NOSUID | MS_NODEV, options), "working directory")
    os.chdir(spec["workdir"])
    for name, text in spec["files"].items():
        write(name, text)
    step = "limits"
    limits = spec["limits"]
    for res, soft, hard in ((resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"]),
                            (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
                            (resource.RLIMIT_NPROC, limits["max_processes"] + 1, limits["max_processes"] + 1),
                            (resource.RLIMIT_FSIZE, limits["max_file_bytes"], limits["max_file_bytes"]),
                            (resource.RLIMIT_NOFILE, limits["max_open_files"], limits["max_open_files"]),
                            (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(res, (soft, hard))
    read_end, write_end = os.pipe()
    pid, stop = 0, []  # SIGTERM from the caller: kill PID 1 (its namespace dies with it), wait, then exit
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL) if pid else stop.append(True))
    pid = os.fork()
    if pid == 0:  # PID 1 of the new PID namespace
        try:
            step = "mounting /proc"
            call(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "/proc")
            os.dup2(read_end, 0)
            os.close(read_end)
            os.close(write_end)
            python = spec["python"]
            os.execve(python, [python, "-I", "-S", "-B", "main.py"], {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
        except OSError as err:
            os.write(2, f"rlfleet-sandbox: {step}: {err}\n".encode())
            os._exit(125)
    if stop:
        os.kill(pid, signal.SIGKILL)
    os.close(read_end)
    os.write(write_end, spec["nonce"].encode() + b"\n")
    os.close(write_end)
    status, usage = os.wait4(pid, 0)[1:]
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    cpu_out = os.WTERMSIG(status) == 9 and usage.ru_utime + usage.ru_stime >= limits["cpu_s"] - 0.05
    os._exit(124 if cpu_out else 128 + os.WTERMSIG(status))  # PID 1 ignores SIGXCPU: the hard limit's SIGKILL
except Exception as err:
    os.write(2, f"rlfleet-sandbox: {step}: {type(err).__name__}: {err}\n".encode())
    os._exit(125)
'''

# The runner, main.py in the sandbox: the solution, then the tests, in one namespace; the nonce (read from stdin)
# is printed only after both ran.
RUNNER = r'''
import os, sys
def _run():
    nonce = sys.stdin.readline().strip()
    scope = {"__name__": "__main__"}
    for name in ("solution.py", "tests.py"):
        with open(name, encoding="utf-8") as f:
            exec(compile(f.read(), name, "exec"), scope)
    sys.stdout.flush()
    os.write(1, ("\n" + nonce + "\n").encode())
try:
    _run()
except MemoryError:
    os.write(2, b"MemoryError\n")
    os._exit(3)
except BaseException:
    import traceback
    sys.stdout.flush()
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
os._exit(0)
'''


def world_executable(path: str) -> bool:
    """True when a user other than the owner can reach and run ``path`` (every directory above it searchable)."""
    path = os.path.realpath(path)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != "/":
        parts.append(os.path.dirname(parts[-1]))
    try:
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in parts) and bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def default_python() -> str:
    """The interpreter the sandbox runs: this one, unless the sandbox's user (nobody, when rlfleet runs as root)
    cannot reach it (e.g. under a mode-700 /root), then the system's ``python3``."""
    if os.geteuid() != 0:
        return sys.executable
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if world_executable(candidate):
            return os.path.realpath(candidate)
    raise SandboxUnavailable(f"no Python interpreter that user {NOBODY} can run (tried {sys.executable}, "
                             "/usr/bin/python3, /usr/local/bin/python3); pass Sandbox(python=...)")


_checked: dict[tuple, str | None] = {}  # (python, allow_network, uid) -> None (works) or the reason it does not
_checked_lock = threading.Lock()


class Sandbox:
    """Runs a program and its tests with :class:`SandboxLimits`. ``network``: ``"none"`` (a new network namespace,
    required) or ``"allow"`` (the host's network, for platforms without network namespaces: an explicit choice).
    Thread-safe: concurrent :meth:`run` calls use separate processes and directories."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), network: str = "none", python: str | None = None,
                 uid: int = NOBODY):
        if network not in ("none", "allow"):
            raise ValueError(f"Sandbox.network: {network!r}; use 'none' (no network) or 'allow'")
        self.limits = limits
        self.network = network
        self.python = python or default_python()
        self.uid = uid

    def check(self) -> None:
        """Raise :class:`SandboxUnavailable` (saying why and what to do) unless a trivial program runs here; the
        answer is cached per process."""
        key = (self.python, self.network, self.uid)
        with _checked_lock:
            if key not in _checked:
                result = self.run("pass", "assert True")
                _checked[key] = None if result.passed else f"{result.status}: {result.output.strip()[-300:]}"
        if (reason := _checked[key]) is not None:
            fix = ("allow user and network namespaces (sysctl user.max_user_namespaces > 0; in Docker, a seccomp "
                   "profile that permits unshare), or choose network='allow' explicitly" if self.network == "none"
                   else "allow user namespaces (sysctl user.max_user_namespaces > 0)")
            raise SandboxUnavailable(f"the code sandbox cannot run here ({reason}); {fix}")

    def run(self, code: str, tests: str = "") -> SandboxResult:
        """Run ``code`` and then ``tests`` (asserts) in one fresh interpreter; passed when both finish."""
        nonce = secrets.token_hex(16)
        workdir = tempfile.mkdtemp(prefix="rlfleet-sandbox-")
        start = time.monotonic()
        try:
            if os.geteuid() == 0:
                os.chown(workdir, self.uid, self.uid)
            spec = {"uid": self.uid, "allow_network": self.network == "allow", "workdir": workdir,
                    "max_disk_bytes": self.limits.max_disk_bytes, "python": self.python, "nonce": nonce,
                    "limits": vars(self.limits),
                    "files": {"main.py": RUNNER, "solution.py": code, "tests.py": tests}}
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={}, cwd="/",
                                    start_new_session=True)
            try:
                output, cut = self._collect(proc, json.dumps(spec).encode(), start + self.limits.timeout_s)
            finally:
                if proc.returncode is None:
                    stop(proc)
                proc.stdout.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        text = output.decode("utf-8", "replace")
        status = cut or _status(proc.returncode, nonce in text)
        text = text.replace(f"\n{nonce}\n", "")[-self.limits.excerpt_chars:]
        return SandboxResult(status == "ok", status, time.monotonic() - start, text)

    def _collect(self, proc: subprocess.Popen, spec: bytes, deadline: float) -> tuple[bytes, str | None]:
        """Send the spec, then read output until EOF and exit; ``(output, "timeout" | "output_limit" | None)``."""
        try:
            proc.stdin.write(spec)
            proc.stdin.close()
        except BrokenPipeError:  # the launcher died at once; its output says why
            pass
        fd, chunks, size = proc.stdout.fileno(), [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks), "timeout"
            if not select.select([fd], [], [], left)[0]:
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
            size += len(data)
            if size > self.limits.max_output_bytes:
                return b"".join(chunks)[:self.limits.max_output_bytes], "output_limit"
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:  # closed its output but runs on
            return b"".join(chunks), "timeout"
        return b"".join(chunks), None


def stop(proc: subprocess.Popen) -> None:
    """End a run: SIGTERM asks the launcher to SIGKILL PID 1 and to exit once the kernel has killed the rest of the
    PID namespace, so nothing of the program outlives this call; a launcher that does not exit in time is killed
    with its process group (its id is not reaped yet, so it cannot name another group)."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _status(returncode: int, nonce_seen: bool) -> str:
    """The launcher's exit status as a :data:`STATUSES` entry (128 + n: PID 1 died of signal n)."""
    if returncode == 0:
        return "ok" if nonce_seen else "failed"  # exit 0 without the nonce: it left before the tests ran
    if returncode == SETUP_FAILED:
        return "error"
    if returncode == MEMORY_EXIT:
        return "memory"
    if returncode == CPU_EXCEEDED:
        return "timeout"
    return "killed" if returncode > 128 else "failed"
