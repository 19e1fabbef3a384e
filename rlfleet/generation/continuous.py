"""Continuous generation: vLLM's engine core stepped by a thread of its own, new weights loaded between two steps.

:class:`ContinuousEngine` wraps an :class:`~rlfleet.generation.engine.Engine` (which owns the ``vllm.LLM`` and its
weight loaders) and drives its ``LLMEngine`` itself: one loop thread runs, between two engine steps, every command
other threads queued (add a request, load weights, abort), then one step. So:

- **No request barrier.** A prompt joins the running batch at the next step and its group is handed back the moment
  its last completion ends (:meth:`submit` returns a future per group); the engine idles only when nothing is in
  flight (``busy_s`` / ``idle_s`` measure it).
- **In-flight weight updates.** A load runs between two steps, with every request kept in the scheduler: unfinished
  completions continue under the new weights. ``kv_on_update`` says what happens to their KV cache:

  - ``keep``: their KV blocks, computed under the old weights, stay; a token sampled after the load comes from the
    new weights attending to the old weights' keys and values of everything before it (PipelineRL's and AReaL's
    choice: no recomputation). Requests added after the load never reuse a block cached under older weights: every
    request's prefix-cache salt is the version it was added under.
  - ``recompute``: every running request is preempted (``reset_prefix_cache(reset_running_requests=True)``, vLLM's
    own path) and re-prefilled, prompt and tokens so far, under the new weights; a token sampled after the load is
    then exactly what a clean forward pass of the new weights gives.

- **A policy version on every token.** The engine core labels every output with its weight version
  (``set_weight_version``, set at each load), and vLLM returns per-completion spans (``weight_versions``), turned
  into one version per token (:attr:`Completion.versions`). A token's behaviour log-prob is the one the engine
  computed when it sampled it, under that token's own version.

Why not ``vllm.v1.engine.async_llm.AsyncLLM``: it runs the same engine core, but always in a child process (on CPU
its start takes about 38 s against 5 s in process: platform-notes), its pause/resume and weight loads are messages
to that process (a full state dict through ZMQ), and its loop is asyncio. Stepping the in-process core gives the
same continuous batching and the same "pause keeping requests, load, resume" with exact step boundaries, the weights
loaded by reference, and no event loop in the Ray actor. The batched path (``Engine.sample``, one ``generate`` per
request) is ``generation.engine: batched``.

Evaluations pin the weights (:meth:`pinned`): a load waits until the evaluation's block has closed and none of its
requests is in flight, so an evaluation of step s is sampled with step s's weights throughout, between the turns of
its episodes too.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import contextmanager

import torch

from rlfleet.generation.engine import Completion, Engine, completions
from rlfleet.transport import FULL, Contents

logger = logging.getLogger(__name__)
KV_ON_UPDATE = ("keep", "recompute")


class EngineStopped(RuntimeError):
    """The engine loop stopped (shut down, or it failed) before the request finished."""


class ContinuousEngine:
    """``engine``'s vLLM core stepped by a loop thread (``start=False``: by the caller, through :meth:`run_once`,
    which is how tests place a weight load between two chosen steps)."""

    def __init__(self, engine: Engine, kv_on_update: str = "keep", start: bool = True):
        if kv_on_update not in KV_ON_UPDATE:
            raise ValueError(f"generation.kv_on_update: {kv_on_update!r} is not one of {KV_ON_UPDATE}")
        self.engine, self.kv_on_update = engine, kv_on_update
        self.core = engine.llm.llm_engine
        self.generation, self.max_model_len = engine.generation, engine.max_model_len
        self.core.set_weight_version(str(engine.version))
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future, bool]] = queue.SimpleQueue()
        self._requests: dict[str, tuple[Future, bool]] = {}  # request id -> (its future, pinned)
        self._held: list[tuple[Callable[[], object], Future]] = []  # loads waiting for pinned requests to end
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._pins, self._pins_lock = 0, threading.Lock()  # pinned() blocks open
        # requests submitted in a pinned() block's context (this engine's own flag) hold weight loads back
        self._pinned = contextvars.ContextVar(f"rlfleet_pinned_{id(self)}", default=False)
        self._version_changed = threading.Condition()
        self._reported = {"busy_s": 0.0, "idle_s": 0.0, "load_s": 0.0, "loads": 0, "steps": 0}
        self._report_lock = threading.Lock()  # stats() is called from every request thread
        self._stopped = False
        self.busy_s = self.idle_s = 0.0  # time the loop spent in engine steps / waiting for work
        self.load_s = 0.0  # time the loop spent loading weights (the engine stepped nothing meanwhile)
        self.steps = self.loads = 0
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._run, name="rlfleet-engine", daemon=True)
            self._thread.start()

    # -- what the generator and the actor call (any thread) --------------------------------------------------------

    @property
    def version(self) -> int:
        """The version of the weights loaded now (tokens sampled from here on carry it)."""
        return self.engine.version

    def submit(self, prompt_token_ids: list[int], n: int, temperature: float | None = None
               ) -> Future[list[Completion]]:
        """``n`` completions of one prompt, sampled as the engine runs; the future resolves when the last ends."""
        params = self.engine.sampling_params(n, temperature)
        pinned = self._pinned.get()
        done: Future[list[Completion]] = Future()

        def add() -> None:
            request_id = f"g{next(self._ids)}"
            salt = f"v{self.engine.version}"  # no request reuses KV blocks cached under older weights
            self.core.add_request(request_id, {"prompt_token_ids": list(prompt_token_ids), "cache_salt": salt},
                                  params, lora_request=self.engine.lora_request)
            self._requests[request_id] = (done, pinned)

        self._call(add).add_done_callback(lambda f: f.exception() and done.set_exception(f.exception()))
        return done

    def sample(self, prompt_token_ids: list[list[int]], n: int, temperature: float | None = None
               ) -> list[list[Completion]]:
        """:meth:`Engine.sample`'s contract: every prompt submitted at once, their groups in order."""
        futures = [self.submit(ids, n, temperature) for ids in prompt_token_ids]
        return [f.result() for f in futures]

    @contextmanager
    def pinned(self):
        """While this block runs, and until every request submitted in it (in its context: this thread, and the
        coroutines and threads that inherit the context, as an evaluation's episodes do) has ended, weight loads
        wait: an evaluation's multi-turn episodes keep one version between their turns too."""
        token = self._pinned.set(True)
        with self._pins_lock:
            self._pins += 1
        try:
            yield
        finally:
            self._pinned.reset(token)
            with self._pins_lock:
                self._pins -= 1
            self._wake.set()  # a load held back may run now

    # -- loading weights (rlfleet.transport.GroupWeightLoader): every load between two engine steps ---------------

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int, contents: Contents = FULL) -> None:
        """Load ``state_dict`` between two engine steps, requests in flight kept (``kv_on_update``); returns once
        it is loaded."""
        self.load_async(state_dict, version, contents).result()

    def load_async(self, state_dict: Mapping[str, torch.Tensor], version: int, contents: Contents = FULL) -> Future:
        """:meth:`load_weights` without waiting: the future resolves once the loop has loaded the weights."""
        def load() -> int:
            self.engine.load(state_dict, contents)
            return int(version)
        return self._call(self._at_boundary(load), load=True)

    def between_requests(self, load: Callable[[], int | None]) -> int:
        """Run ``load`` between two engine steps (held while pinned requests run); a version it loaded labels every
        token from then on. Returns the version served."""
        return self._call(self._at_boundary(load), load=True).result()

    def join_weight_group(self, init_info: dict) -> None:
        self.engine.join_weight_group(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def receive_weights(self, update_info: dict) -> None:
        """A broadcast round, staged beside the running engine (:meth:`Engine.receive_weights`)."""
        self.engine.receive_weights(update_info)

    def finish_weight_update(self, version: int) -> None:
        """The staged round into the model; inside :meth:`between_requests` (so on the loop thread)."""
        self.engine.finish_weight_update(version)

    def wait_for_version(self, version: int, timeout_s: float) -> None:
        """Return once weights of at least ``version`` are loaded (a load queued by another thread may be on its
        way); TimeoutError after ``timeout_s``."""
        with self._version_changed:
            if not self._version_changed.wait_for(lambda: self.version >= version or self._stopped, timeout_s):
                raise TimeoutError(f"the engine holds weights version {self.version}; version {version} did not "
                                   f"load within {timeout_s:g} s")
        if self._stopped:
            raise EngineStopped("the engine loop has stopped")

    def stats(self) -> dict[str, float]:
        """The loop's figures since the last call: ``engine/busy_s`` (in engine steps), ``engine/idle_s`` (waiting
        for work), ``engine/load_s`` (loading weights between two steps), ``engine/steps`` (each samples one token
        of every running completion: tokens / steps is the mean batch), ``sync/inflight_loads`` (weight loads made
        with requests in flight or not)."""
        with self._report_lock:
            now = {"busy_s": self.busy_s, "idle_s": self.idle_s, "load_s": self.load_s, "loads": self.loads,
                   "steps": self.steps}
            delta = {k: now[k] - self._reported[k] for k in now}
            self._reported = now
        return {"engine/busy_s": delta["busy_s"], "engine/idle_s": delta["idle_s"], "engine/load_s": delta["load_s"],
                "engine/steps": float(delta["steps"]), "sync/inflight_loads": float(delta["loads"])}

    def shutdown(self) -> None:
        """Stop the loop; requests in flight fail with :class:`EngineStopped`."""
        def stop() -> None:
            self._stopped = True
        self._call(stop)
        if self._thread is not None:
            self._thread.join()

    # -- the loop --------------------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], object], load: bool = False) -> Future:
        """Queue ``fn`` for the loop thread (``load``: a weight load, held while pinned requests run)."""
        done: Future = Future()
        if self._stopped:
            done.set_exception(EngineStopped("the engine loop has stopped"))
            return done
        self._commands.put((fn, done, load))
        self._wake.set()
        return done

    def _at_boundary(self, load: Callable[[], int | None]) -> Callable[[], int]:
        """``load`` as the loop runs it: a version it loaded becomes the engine's (:meth:`_loaded`)."""
        def run() -> int:
            start = time.perf_counter()
            loaded = load()
            if loaded is not None:
                self._loaded(loaded)
            self.load_s += time.perf_counter() - start
            return self.engine.version
        return run

    def _loaded(self, version: int) -> None:
        """Make ``version`` (just loaded into the model) the label of every token from now on."""
        self.engine._version = int(version)
        self.core.set_weight_version(str(int(version)))
        if self.kv_on_update == "recompute":
            self.core.reset_prefix_cache(reset_running_requests=True)
        self.loads += 1
        with self._version_changed:
            self._version_changed.notify_all()

    def run_once(self) -> bool:
        """Run the queued commands, then one engine step if a request is in flight; False when there was nothing
        to step."""
        self._run_commands()
        if self._stopped or not self.core.has_unfinished_requests():
            return False
        start = time.perf_counter()
        outputs = self.core.step()
        self.busy_s += time.perf_counter() - start
        self.steps += 1
        for out in outputs:
            if out.finished and out.request_id in self._requests:
                done, _ = self._requests.pop(out.request_id)
                done.set_result(completions(out))
        return True

    def _run_commands(self) -> None:
        while True:
            if self._held and not self._pinning():
                pending, self._held = self._held, []
                for fn, done in pending:
                    self._execute(fn, done)
            try:
                fn, done, load = self._commands.get_nowait()
            except queue.Empty:
                return
            if load and self._pinning():
                self._held.append((fn, done))  # after the pinned requests (an evaluation) end
            else:
                self._execute(fn, done)

    def _pinning(self) -> bool:
        """A pinned block is open or a pinned request is in flight: loads wait."""
        return self._pins > 0 or any(pinned for _, pinned in self._requests.values())

    def _execute(self, fn: Callable[[], object], done: Future) -> None:
        try:
            done.set_result(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the caller waiting on it
            done.set_exception(err)

    def _run(self) -> None:
        try:
            while not self._stopped:
                if not self.run_once() and not self._stopped:
                    start = time.perf_counter()
                    self._wake.wait()
                    self._wake.clear()
                    self.idle_s += time.perf_counter() - start
        except BaseException as err:  # noqa: BLE001 - an engine failure fails every request waiting on it
            logger.error("the engine loop failed: %s: %s", type(err).__name__, err)
            self._fail(err)
            raise
        self._fail(EngineStopped("the engine loop stopped"))

    def _fail(self, err: BaseException) -> None:
        self._stopped = True
        with self._version_changed:
            self._version_changed.notify_all()
        failures = [done for done, _ in self._requests.values()] + [done for _, done in self._held]
        while True:
            try:
                failures.append(self._commands.get_nowait()[1])
            except queue.Empty:
                break
        for done in failures:
            if not done.done():
                done.set_exception(err if isinstance(err, EngineStopped) else EngineStopped(f"engine failed: {err}"))
        self._requests.clear()
