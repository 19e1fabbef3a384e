"""Shared fixtures: the offline tiny model, and a local Ray cluster per test module. And a check that the session
leaves no process behind (see ``pytest_sessionfinish``)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from contextlib import contextmanager

import pytest

from rlfleet.models import resolve_model_path


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Directory of the offline ``builtin:tiny`` model (built once into the rlfleet cache)."""
    return resolve_model_path("builtin:tiny")


@contextmanager
def ray_test_env():
    """The environment of a test Ray cluster, restored afterwards: no token auth (tests do not exercise it;
    platform-notes) and no hub (inherited by the workers: tests never touch it)."""
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster in this process for one test module (4 CPUs, no dashboard, no token auth).

    Yields the ``ray`` module. Shut down at the module's end, so a later module starts from no cluster.
    """
    import ray

    with ray_test_env():
        ray.init(num_cpus=4, include_dashboard=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's ops are too small for intra-op threads: on a busy 2-core machine one thread runs a module of
    learner steps ~6x faster. Restored afterwards for other modules. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# --- what a session leaves running ------------------------------------------------------------------------------------
# Every process the session starts (in-process Ray clusters, `rlfleet` subprocesses, scripts/local_head.py's head and
# Prometheus, the Ray workers and engines below them) inherits SESSION_MARKER from this process's environment. At the
# session's end, after every fixture's teardown, a marked process still running was started by a test and not
# stopped: it is reported, and killed so the machine is left clean. Processes that were running before the session
# started never carry this session's marker and are never touched.

SESSION_MARKER = "RLFLEET_TEST_SESSION"
# a Ray head's daemons (and the head's Prometheus/Grafana): they never end on their own, so a survivor fails the run
HEAD_DAEMONS = ("gcs_server", "raylet", "ray.util.client.server", "ray/dashboard/dashboard.py", "ray::DashboardAgent",
                "ray::RuntimeEnvAgent", "autoscaler/_private/monitor.py", "_private/log_monitor.py", "prometheus",
                "grafana")
# helpers of this process that end with it (they watch their parent): not leaks
ENDS_WITH_PYTEST = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "compile_worker")
LEFTOVER_GRACE_S = 30.0  # for processes still exiting (workers notice their raylet's end within seconds)
_session: dict = {}


def _psutil():
    try:
        import psutil
    except ImportError:  # the check is skipped where psutil is missing
        return None
    return psutil


def pytest_sessionstart(session):
    psutil = _psutil()
    if psutil is None:
        return
    _session["before"] = {(p.pid, p.info["create_time"]) for p in psutil.process_iter(["create_time"])}
    _session["marker"] = os.environ[SESSION_MARKER] = uuid.uuid4().hex
    _session["t0"] = time.time()


def _running(p) -> bool:
    psutil = _psutil()
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _command(p) -> str:
    return " ".join(p.info.get("cmdline") or []) or (p.info.get("name") or "?")


def _leftovers() -> list:
    """Processes started during this session, still running: those carrying its marker and their descendants (Ray's
    agents set their process title over their environment, so only their parentage names them), never this process,
    the helpers that end with it, or a process that was running before the session."""
    psutil = _psutil()
    me = psutil.Process()
    children = {c.pid for c in me.children(recursive=True)}
    marked = [p for p in psutil.process_iter(["environ", "create_time", "name", "cmdline"])
              if (p.info["environ"] or {}).get(SESSION_MARKER) == _session["marker"]]
    found = {}
    for p in [*marked, *(c for p in marked for c in _descendants(p))]:
        if p.pid == me.pid or p.pid in found or not _running(p):
            continue
        if not hasattr(p, "info"):
            p.info = p.as_dict(["create_time", "name", "cmdline"], ad_value=None)
        if (p.pid, p.info["create_time"]) in _session["before"]:
            continue
        if p.pid in children and any(helper in _command(p) for helper in ENDS_WITH_PYTEST):
            continue
        found[p.pid] = p
    return list(found.values())


def _descendants(p) -> list:
    try:
        return p.children(recursive=True)
    except _psutil().Error:
        return []


def pytest_sessionfinish(session, exitstatus):
    if "marker" not in _session:
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (found := _leftovers()) and time.monotonic() < deadline:
        time.sleep(1.0)
    if not found:
        return
    daemons = [p for p in found if any(name in _command(p) for name in HEAD_DAEMONS)]
    lines = []
    for p in found:
        after = (p.info["create_time"] or _session["t0"]) - _session["t0"]
        kind = "Ray head daemon" if p in daemons else "process"
        lines.append(f"pid {p.pid} ({kind}, started {max(after, 0):.0f} s into the session): {_command(p)[:300]}")
    # stop them now (SIGTERM, then SIGKILL: a GCS can hang in its SIGTERM handler), so the machine is left clean
    psutil = _psutil()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in found:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        end = time.monotonic() + 10
        while (found := [p for p in found if _running(p)]) and time.monotonic() < end:
            time.sleep(0.2)
    _session["report"] = (lines, bool(daemons), found)
    if daemons and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if "report" not in _session:
        return
    lines, failed, survivors = _session["report"]
    terminalreporter.section("processes the tests left running", sep="=", red=failed, yellow=not failed, bold=True)
    terminalreporter.line(f"{len(lines)} process(es) started during this session were still running "
                          f"{LEFTOVER_GRACE_S:.0f} s after its last teardown (a test or fixture did not stop what "
                          "it started); now " + ("killed" if not survivors else
                                                  f"signalled, {len(survivors)} still running") + ":")
    for line in lines:
        terminalreporter.line(f"  {line}")
    if failed:
        terminalreporter.line("A Ray head daemon among them fails the run (exit status 1).", red=True)
