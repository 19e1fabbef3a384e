"""One run per output directory: ``output_dir/.rlfleet.lock``, held for the run's life.

The lock is the kernel's (``flock`` on the open file), so it ends with the process that holds it, even after
``kill -9``. The file's content says who holds it, for the messages: ``{"pid", "host", "started", "command",
"argv", "proc_start", "boot_id"}`` (``proc_start``: the process's start in clock ticks since boot, from ``/proc``, which
tells a live holder from a later process that got its pid). A run that ends, also on an error, empties the file; a
run that was killed leaves its content behind, and the next run takes the lock over with a line saying so
(``--resume`` after a crash).

Where the kernel cannot say (a filesystem without working locks, a holder on another host over NFS), the content
decides: a holder on this host whose process still runs keeps the directory; one on another host cannot be
checked, so the run is refused with the host named, and the user deletes the file if that run is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlfleet.errors import OutputDirError

LOCK_NAME = ".rlfleet.lock"


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, field 22 of ``/proc/<pid>/stat``); None where there is no
    ``/proc`` or no such process. A zombie (killed, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return None if fields[0] in ("Z", "X") else int(fields[19])


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def holder_running(holder: dict) -> bool:
    """Whether the process a lock's content names (on this host) still runs: the same pid, started at the same
    moment since the same boot (a reused pid or a reboot means it is gone; without ``/proc``: the pid exists)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("boot_id") and boot_id() and holder["boot_id"] != boot_id():
        return False
    if Path("/proc/self/stat").exists():
        start = process_start(pid)
        return start is not None and holder.get("proc_start") in (None, start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(holder: dict) -> str:
    """``pid N on host H, started T (rlfleet train: <its command line>)``, from a lock's content."""
    if not holder:
        return "a run that is starting (it has not written its pid yet)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')} "
            f"({holder.get('command', '?')}: {holder.get('argv', '?')})")


def usable_dir(out: Path) -> None:
    """Create ``out`` if needed; raise :class:`OutputDirError` naming it and the reason if it is a file or cannot be
    created."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {str(out)!r} is a file, not a directory; give another output_dir "
                             "(output_dir=...)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        reason = f"{str(blocker)!r} is a file" if blocker is not None else (err.strerror or str(err))
        raise OutputDirError(f"output_dir {str(out)!r} cannot be created: {reason}; give a directory this user can "
                             "write (output_dir=...)") from err


def _read(fd: int) -> dict:
    try:
        content = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"pid": "?", "host": "?", "started": "?", "command": "unreadable lock content"}
    return content if isinstance(content, dict) else {}


@contextmanager
def hold_output_dir(output_dir: str | Path, command: str) -> Iterator[Path]:
    """Hold ``output_dir``'s lock for the ``with`` block (the run), creating the directory; yields the lock file.

    Raises :class:`OutputDirError` (before anything is written) if ``output_dir`` is a file, cannot be created or
    written, or another run holds it. A lock left by a run that is gone is taken over with one line on stdout.
    """
    out = Path(output_dir)
    usable_dir(out)
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputDirError(f"output_dir {str(out)!r} cannot be written ({path.name}: {err.strerror or err}); give "
                             "a directory this user can write (output_dir=...)") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kernel_lock = True
        except BlockingIOError:
            holder = _read(fd)
            gone = holder.get("host") == socket.gethostname() and not holder_running(holder)
            raise OutputDirError(
                f"output_dir {str(out)!r} is in use by another run: {describe(holder)}"
                + ("; that process has ended, but one it started still holds the lock" if gone and holder else "")
                + f". Wait for it to end, stop it, or give another output_dir; the lock is {path}") from None
        except OSError as err:  # a filesystem without flock: the content alone decides
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            kernel_lock = False
        holder = _read(fd)
        if holder:
            if holder.get("host") != socket.gethostname():
                raise OutputDirError(
                    f"output_dir {str(out)!r} is locked by a run on another host: {describe(holder)}, which cannot "
                    f"be checked from here. If that run is gone, delete {path} and start again")
            if holder_running(holder) and (not kernel_lock or holder.get("pid") != os.getpid()):
                raise OutputDirError(f"output_dir {str(out)!r} is in use by another run: {describe(holder)}. Wait "
                                     f"for it to end, stop it, or give another output_dir; the lock is {path}")
            print(f"{command}: output_dir {out}: taking over the lock left by {describe(holder)}, which is no "
                  "longer running", flush=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": command, "argv": shlex.join(sys.argv)[:300],
                "proc_start": process_start(os.getpid()), "boot_id": boot_id()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty lock: the run ended (a killed run leaves its content behind)
    finally:
        os.close(fd)  # the kernel's lock ends with it
