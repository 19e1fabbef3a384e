"""Reward functions run beside the generator, so that user code cannot stall, block or kill generation. No Ray, no
vLLM.

A reward function is the user's code, and often the outside world's: an LLM judge behind HTTP, a test run, a
sandbox. Three things must not follow it into the job: a call that never returns, a synchronous call that blocks the
engine's thread, and a crash that takes its process with it (a segfault in an extension, ``os._exit``). So the
generator does not call reward functions itself. It hands each call to a :class:`RewardWorker`, a child process that
holds the functions (unpickled by reference: their modules are imported there) and runs the calls:

- a synchronous function in a thread of the child (``algorithm.reward_concurrency`` threads), called once per
  request with every completion of its groups, as TRL calls it;
- an ``async def`` function on the child's event loop, called once per *group* and awaited concurrently across
  groups (at most ``reward_concurrency`` at once): a remote judge's latency overlaps.

Each call must end within ``algorithm.reward_timeout_s`` of its start. An ``async`` call past it is cancelled by the
child; a synchronous one cannot be cancelled, so the worker is killed (its whole process group) and the calls it was
running fail with it. A worker that dies (killed, crashed, exited) fails the calls it held and is started again for
the next call; the generator drops the groups of a failed call and counts them in ``errors/reward``. Nothing else is
lost: the engine, the other groups and the actor go on.

:class:`InlineRewards` runs the same calls in the caller's process (no timeout for synchronous calls, no crash
containment): for unit tests of the generator and tools that score a handful of completions.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)
GRACE_S = 0.5  # past an async call's timeout, the worker's own cancellation should have answered by now
START_TIMEOUT_S = 120.0  # the child imports the reward functions' modules (a judge client, a tokenizer, ...)


@dataclass(frozen=True)
class Outcome:
    """How one call ended: ``status`` "ok" (``values``: one float or None per completion), "error" (it raised or
    returned something else), "timeout" or "lost" (the worker died); ``detail`` says what happened."""

    status: str
    values: list[float | None] | None = None
    detail: str = ""
    trace: str = ""  # the traceback of an error, for --debug
    counts: dict[str, int] | None = None  # what the function counted since its last report (``outcomes``)


def as_values(out: Any) -> list[float | None]:
    """A reward function's return value as floats (None kept: "not scored by this function"); raises otherwise."""
    if out is None or isinstance(out, (str, bytes)):
        raise TypeError(f"returned {type(out).__name__}, not a list of numbers")
    return [None if v is None else float(v) for v in out]


def is_async(func: Callable) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


class CallRunner:
    """Runs ``(function index, kwargs)`` calls on an event loop: ``async`` functions on the loop under a timeout,
    synchronous ones in a thread pool (no timeout here: see the module docstring). Used in the worker process and by
    :class:`InlineRewards`."""

    def __init__(self, funcs: Sequence[Callable], timeout_s: float, concurrency: int):
        self.funcs = list(funcs)
        self.timeout_s = timeout_s
        self.is_async = [is_async(f) for f in self.funcs]
        self.threads = ThreadPoolExecutor(concurrency, thread_name_prefix="rlfleet-reward")
        self.slots: asyncio.Semaphore | None = None  # made on the loop that runs the calls
        self.concurrency = concurrency
        self.reported: list[Counter] = [Counter() for _ in self.funcs]

    def counted(self, k: int) -> dict[str, int] | None:
        """A function may count what happened in its calls in an ``outcomes`` Counter (the sandboxed code reward
        counts its programs' ends): what it counted since the last report, reported once (totals are exact; with
        calls side by side, a count may come back with a neighbouring call)."""
        outcomes = getattr(self.funcs[k], "outcomes", None)
        if not isinstance(outcomes, Counter):
            return None
        now = Counter(outcomes)
        delta, self.reported[k] = now - self.reported[k], now
        return dict(delta)

    async def run(self, k: int, kwargs: dict, started: Callable[[], None] = lambda: None) -> Outcome:
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.concurrency)
        async with self.slots:
            started()
            try:
                if self.is_async[k]:
                    out = await asyncio.wait_for(self.funcs[k](**kwargs), self.timeout_s)
                else:
                    loop = asyncio.get_running_loop()
                    out = await loop.run_in_executor(self.threads, lambda: self.funcs[k](**kwargs))
                return Outcome("ok", as_values(out), counts=self.counted(k))
            except asyncio.TimeoutError:
                return Outcome("timeout", detail=f"no answer within algorithm.reward_timeout_s={self.timeout_s:g} s",
                               counts=self.counted(k))
            except Exception as err:  # deliberate: the user's function must not stop the worker
                return Outcome("error", detail=f"{type(err).__name__}: {err}", trace=traceback.format_exc(),
                               counts=self.counted(k))


class InlineRewards:
    """Reward calls in this process (see the module docstring): the same interface as :class:`RewardWorker`."""

    restarts = 0

    def __init__(self, funcs: Sequence[Callable], timeout_s: float = 60.0, concurrency: int = 8):
        self.runner = CallRunner(funcs, timeout_s, concurrency)
        self.is_async = self.runner.is_async

    def run(self, calls: list[tuple[int, dict]]) -> list[Outcome]:
        async def all_calls():
            return await asyncio.gather(*(self.runner.run(k, kwargs) for k, kwargs in calls))

        return asyncio.run(all_calls()) if calls else []

    def close(self) -> None:
        self.runner.threads.shutdown(wait=False)


# ---------------------------------------------------------------------------------------------------------------
# The worker process. Messages on one socket, pickled by multiprocessing.connection (both ends are this code; the
# payloads are the generator's own data and the user's trusted functions, never model output run as code):
#   parent -> child: (funcs, timeout_s, concurrency) once, then (call_id, k, kwargs) per call
#   child -> parent: ("ready", is_async) | ("failed", message) once, then ("started", call_id) and
#                    ("done", call_id, Outcome) per call


def serve(conn: Connection) -> None:
    """The child's main loop: load the functions, then run calls as they arrive until the parent hangs up."""
    try:  # unpickling the functions imports their modules: the user's import errors surface here
        funcs, timeout_s, concurrency = pickle.loads(conn.recv_bytes())
    except Exception as err:
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    runner = CallRunner(funcs, timeout_s, concurrency)
    conn.send(("ready", runner.is_async))
    loop = asyncio.new_event_loop()
    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            conn.send(msg)

    async def call(call_id: int, k: int, kwargs: dict) -> None:
        outcome = await runner.run(k, kwargs, started=lambda: send(("started", call_id)))
        try:
            send(("done", call_id, outcome))
        except Exception as err:  # e.g. an unpicklable value in an error message: send the reason instead
            send(("done", call_id, Outcome("error", detail=f"could not return the result: {err}")))

    def read() -> None:
        while True:
            try:
                call_id, k, kwargs = conn.recv()
            except (EOFError, OSError):  # the parent is gone: nothing left to score for
                os._exit(0)
            loop.call_soon_threadsafe(loop.create_task, call(call_id, k, kwargs))

    threading.Thread(target=read, daemon=True, name="rlfleet-reward-reader").start()
    loop.run_forever()


@dataclass
class _Call:
    done: threading.Event
    outcome: Outcome | None = None
    started_at: float | None = None


@dataclass
class _Process:
    """One worker process and the calls it holds: when it dies, those calls fail, and only those."""

    proc: subprocess.Popen
    sock: socket.socket  # the parent's end; conn reads and writes a duplicate of it
    conn: Connection
    calls: dict[int, _Call]
    dying: bool = False  # killed, or its stream ended: new calls go to a fresh process


class RewardWorker:
    """A child process running the reward functions (see the module docstring). Thread-safe: the generator's
    threads may score side by side (a continuous engine's groups do). ``restarts`` counts the deaths it recovered
    from."""

    def __init__(self, funcs: Sequence[Callable], timeout_s: float, concurrency: int):
        self.funcs, self.timeout_s = list(funcs), timeout_s
        self.names = [getattr(f, "__name__", repr(f)) for f in self.funcs]
        self.payload = pickle.dumps((self.funcs, timeout_s, concurrency))  # fails here, by name, if unpicklable
        self.restarts = 0
        self.is_async: list[bool] = []
        self._lock = threading.Lock()
        self._next_id = 0
        self._box: list[_Process | None] = [None]  # the current process (its reader threads hold no ref to self)
        self._started_once = False
        weakref.finalize(self, _shut_down, self._box)  # a generator dropped without close() stops its worker too
        with self._lock:
            self._start()

    # -- the process ------------------------------------------------------------------------------------------

    def _start(self) -> _Process:
        """Start a worker and wait until its functions are loaded (called with the lock held)."""
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the caller's imports
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlfleet.generation.reward_worker", str(child.fileno())],
            pass_fds=[child.fileno()], env=env, start_new_session=True,  # its own group: killed with its children
        )
        child.close()
        conn = Connection(os.dup(parent.fileno()))
        conn.send_bytes(self.payload)
        if not conn.poll(START_TIMEOUT_S):
            _kill(proc)
            parent.close()
            raise RuntimeError(f"the reward worker did not start within {START_TIMEOUT_S:g} s")
        try:
            status, info = conn.recv()
        except EOFError:
            parent.close()
            raise RuntimeError(f"the reward worker exited while loading {', '.join(self.names)} "
                               f"({_exit_reason(proc.wait())})") from None
        if status != "ready":
            _kill(proc)
            parent.close()
            raise ValueError(f"reward functions {', '.join(self.names)} could not be loaded in the reward worker: "
                             f"{info}")
        self.is_async = info
        self.restarts += self._started_once
        self._started_once = True
        self._box[0] = _Process(proc, parent, conn, {})
        threading.Thread(target=_read, args=(self._box[0], self._lock, self.timeout_s), daemon=True,
                         name="rlfleet-reward-worker").start()
        return self._box[0]

    # -- calls ------------------------------------------------------------------------------------------------

    def run(self, calls: list[tuple[int, dict]]) -> list[Outcome]:
        """Run ``(function index, kwargs)`` calls side by side; one :class:`Outcome` each, in order."""
        pending = []
        with self._lock:
            worker = self._box[0]
            if worker is None or worker.dying:
                worker = self._start()
            for k, kwargs in calls:
                call_id, self._next_id = self._next_id, self._next_id + 1
                pending.append(worker.calls.setdefault(call_id, _Call(threading.Event())))
                try:
                    message = pickle.dumps((call_id, k, kwargs))
                except Exception as err:  # a column value that cannot travel: this call fails, not the job
                    _finish(worker, call_id, Outcome("error", detail=f"its arguments cannot be sent to the reward "
                                                     f"worker ({type(err).__name__}: {err})"))
                    continue
                if not worker.dying:
                    try:
                        worker.conn.send_bytes(message)
                    except OSError:  # it just died: its reader fails every call it holds, this one too
                        worker.dying = True
        for call in pending:
            call.done.wait()
        return [c.outcome for c in pending]

    def close(self) -> None:
        with self._lock:
            _shut_down(self._box)


def _shut_down(box: list[_Process | None]) -> None:
    worker, box[0] = box[0], None
    if worker is not None:
        with contextlib.suppress(OSError):  # the child exits when its reader sees the end of the stream (a
            worker.sock.shutdown(socket.SHUT_RDWR)  # shutdown, not close: that waits for our reader's poll)
        try:
            worker.proc.wait(5)
        except subprocess.TimeoutExpired:
            _kill(worker.proc)


def _read(worker: _Process, lock: threading.Lock, timeout_s: float) -> None:
    """Deliver one worker process's answers; kill it when a started call outlives its deadline; on its death, fail
    every call it held."""
    reason = ""
    while True:
        with lock:
            deadlines = [c.started_at + timeout_s + GRACE_S
                         for c in worker.calls.values() if c.started_at is not None]
        wait = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
        try:
            ready = worker.conn.poll(wait)
        except (EOFError, OSError):
            break
        if not ready:  # a call is past its deadline: a synchronous function that will not return
            with lock:
                now = time.monotonic()
                late = [i for i, c in worker.calls.items()
                        if c.started_at is not None and now >= c.started_at + timeout_s]
                for i in late:
                    _finish(worker, i, Outcome("timeout", detail="no answer within algorithm.reward_timeout_s="
                                               f"{timeout_s:g} s; the reward worker was restarted"))
                worker.dying = worker.dying or bool(late)
            if late:
                reason = "killed: a call was past algorithm.reward_timeout_s"
                _kill(worker.proc)
            continue
        try:
            msg = worker.conn.recv()
        except (EOFError, OSError):
            break
        except Exception as err:  # a reply that does not unpickle here: the worker is of no further use
            reason = f"killed: its reply could not be read ({type(err).__name__}: {err})"
            _kill(worker.proc)
            break
        with lock:
            if msg[0] == "started" and msg[1] in worker.calls:
                worker.calls[msg[1]].started_at = time.monotonic()
            elif msg[0] == "done":
                _finish(worker, msg[1], msg[2])
    with lock:
        worker.dying = True
    code = worker.proc.wait()
    worker.conn.close()
    worker.sock.close()
    with lock:
        lost = Outcome("lost", detail=f"the reward worker process died ({reason or _exit_reason(code)}) while "
                       "running it; the worker is restarted")
        for i in list(worker.calls):
            _finish(worker, i, lost)


def _finish(worker: _Process, call_id: int, outcome: Outcome) -> None:
    call = worker.calls.pop(call_id, None)
    if call is not None:
        call.outcome = outcome
        call.done.set()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
    except ProcessLookupError:
        pass


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the job; the job stops this worker
    serve(Connection(fd))


if __name__ == "__main__":  # run as the module it is, so the Outcomes it sends unpickle in the parent as ours
    from rlfleet.generation.reward_worker import main as module_main

    module_main(int(sys.argv[1]))
