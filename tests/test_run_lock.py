"""One run per output directory (issue 33): ``output_dir/.rlfleet.lock`` held for a run's life. A second run is
refused naming the holder; a lock left by a dead process is taken over with a line; a lock on another host is
refused naming it; an ``output_dir`` that is a file or cannot be created is refused before Ray starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet.cli import EXIT_BAD_INPUT, main
from rlfleet.cluster.run_lock import LOCK_NAME, hold_output_dir, process_start
from rlfleet.errors import OutputDirError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "deploy" / "quickstart.yaml")
HOLDER = """
import sys
from rlfleet.cluster.run_lock import hold_output_dir
with hold_output_dir(sys.argv[1], "rlfleet train"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def write_lock(out: Path, **holder) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    content = {"pid": dead_pid(), "host": socket.gethostname(), "started": "2025-01-01 00:00:00 +0000",
               "command": "rlfleet train", "argv": "rlfleet train job.yaml", "proc_start": 1, **holder}
    (out / LOCK_NAME).write_text(json.dumps(content))
    return out / LOCK_NAME


def train_refused(capsys, out: Path, *overrides: str) -> tuple[str, str]:
    """``rlfleet train`` in this process, refused with exit 2 before Ray starts; (stdout, stderr)."""
    import ray

    code = main(["train", QUICKSTART, f"output_dir={out}", *overrides])
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, captured.err
    assert not ray.is_initialized()
    return captured.out, captured.err


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    """The holder is another process (the kernel's lock); after kill -9 its lock is taken over with one line, and
    the run goes on to its next check (here: a dataset that does not exist), then releases the lock."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        stdout, stderr = train_refused(capsys, out)
        host = socket.gethostname()
        assert stderr.startswith(f"rlfleet train: output_dir '{out}' is in use by another run: pid {holder.pid} on "
                                 f"host {host}, started "), stderr
        assert stderr.endswith(f". Wait for it to end, stop it, or give another output_dir; the lock is "
                               f"{out / LOCK_NAME}\n"), stderr
        assert stdout == ""
    finally:
        holder.kill()
        holder.wait()
    stdout, stderr = train_refused(capsys, out, f"data.dataset={tmp_path / 'absent.jsonl'}")
    assert stdout.startswith(f"rlfleet train: output_dir {out}: taking over the lock left by pid {holder.pid} on host "
                             f"{host}, started "), stdout
    assert stdout.endswith(", which is no longer running\n") and stdout.count("\n") == 1, stdout
    assert f"data.dataset: file '{tmp_path / 'absent.jsonl'}' does not exist" in stderr, stderr
    assert (out / LOCK_NAME).read_text() == ""  # released at the end (here: on the error)


def test_a_lock_left_by_a_dead_pid_is_taken_over_and_rewritten(tmp_path, capsys):
    out = tmp_path / "run"
    lock = write_lock(out)
    dead = json.loads(lock.read_text())["pid"]
    with hold_output_dir(out, "rlfleet train") as path:
        assert path == lock
        mine = json.loads(lock.read_text())
        assert (mine["pid"], mine["host"], mine["command"]) == (os.getpid(), socket.gethostname(), "rlfleet train")
        assert mine["proc_start"] == process_start(os.getpid())
    assert capsys.readouterr().out == (
        f"rlfleet train: output_dir {out}: taking over the lock left by pid {dead} on host {socket.gethostname()}, "
        "started 2025-01-01 00:00:00 +0000 (rlfleet train: rlfleet train job.yaml), which is no longer running\n")
    assert lock.read_text() == ""


def test_a_reused_pid_is_not_the_holder(tmp_path, capsys):
    """The lock names a live pid (this process) that started at another moment than the lock's process: taken
    over."""
    out = tmp_path / "run"
    write_lock(out, pid=os.getpid(), proc_start=process_start(os.getpid()) - 1)
    with hold_output_dir(out, "rlfleet dpo"):
        pass
    assert "taking over the lock left by pid" in capsys.readouterr().out


def test_a_live_holder_without_the_kernel_lock_is_still_refused(tmp_path):
    """A filesystem where the kernel lock did not hold: the content names a live process on this host (this
    test's parent process, which is alive and started when /proc says): refused."""
    out = tmp_path / "run"
    parent = os.getppid()
    write_lock(out, pid=parent, proc_start=process_start(parent))
    with pytest.raises(OutputDirError) as info:
        with hold_output_dir(out, "rlfleet train"):
            pass
    assert str(info.value).startswith(f"output_dir '{out}' is in use by another run: pid {parent} on host "
                                      f"{socket.gethostname()}, started 2025-01-01 00:00:00 +0000"), info.value


def test_a_lock_from_another_host_is_refused_naming_the_host(tmp_path, capsys):
    out = tmp_path / "run"
    lock = write_lock(out, host="node-7", pid=4242)
    _, stderr = train_refused(capsys, out)
    assert stderr == (f"rlfleet train: output_dir '{out}' is locked by a run on another host: pid 4242 on host node-7, "
                      "started 2025-01-01 00:00:00 +0000 (rlfleet train: rlfleet train job.yaml), which cannot be "
                      f"checked from here. If that run is gone, delete {lock} and start again\n")
    assert json.loads(lock.read_text())["host"] == "node-7"  # left as it was


def test_a_run_releases_the_lock_on_an_error_and_the_next_takes_it_without_a_line(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with hold_output_dir(out, "rlfleet train"):
            raise RuntimeError("boom")
    with hold_output_dir(out, "rlfleet train"):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert capsys.readouterr().out == ""


def test_an_output_dir_that_is_a_file_is_refused_before_ray_starts(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("not a directory\n")
    _, stderr = train_refused(capsys, path)
    assert stderr == (f"rlfleet train: output_dir '{path}' is a file, not a directory; give another output_dir "
                      "(output_dir=...)\n")
    _, stderr = train_refused(capsys, path / "run")
    assert stderr == (f"rlfleet train: output_dir '{path / 'run'}' cannot be created: '{path}' is a file; give a "
                      "directory this user can write (output_dir=...)\n")
    assert path.read_text() == "not a directory\n"


def test_debug_shows_the_traceback_of_a_refused_output_dir(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "rlfleet.cli", "dpo", QUICKSTART, f"output_dir={path}", "--debug"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and 'in hold_output_dir' in done.stderr, done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == (
        f"rlfleet.errors.OutputDirError: output_dir '{path}' is a file, not a directory; give another output_dir "
        "(output_dir=...)"), done.stderr
