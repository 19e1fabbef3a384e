"""One learner actor for every objective: a Ray shell around one rank of a :class:`~rlfleet.learner.core.Learner`.

The job starts one per rank (:class:`~rlfleet.cluster.learners.LearnerGroup`: one rank, or ``cluster.learner_workers``
ranks forming one ``torch.distributed`` group) and calls every method on every rank together; each rank runs its
part of the collectives and rank 0's answer is the group's. Each method delegates in a few lines; the logic lives in
the learner.

- ``rlfleet train`` (GRPO family, online DPO): :meth:`LearnerActor.train_step` pulls a batch from the replay actor on
  rank 0, hands it to the other ranks through the process group, trains, and publishes the new weights through the
  configured transport (:mod:`rlfleet.transport`) from rank 0.
- ``rlfleet dpo``: :meth:`LearnerActor.train` on the preference pairs the job sends (a few KB a step), no replay
  actor, no publication.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import ray

from rlfleet.config import ClusterConfig, RLFleetConfig
from rlfleet.errors import quiet_kill_in_finalizers
from rlfleet.learner import distributed as dist_
from rlfleet.learner.core import Learner
from rlfleet.learner.distributed import SINGLE, Rank, init_process_group
from rlfleet.learner.policy import PolicyLearner
from rlfleet.learner.threads import LearnerThreads, node_cores, set_threads
from rlfleet.learner.trainee import resolve_device
from rlfleet.models import publish_dtype
from rlfleet.transport import WeightHandle, make_publisher, published_contents

SAMPLES_PER_STEP = 4
LearnerFactory = Callable[[RLFleetConfig, Rank], Learner]  # (cfg, rank) -> the learner of that rank


@dataclass(frozen=True)
class StepResult:
    """One learner step as the driver sees it: metrics, the published weights, and the batch the learner took
    (the ``prompt_id`` of each of its groups, in order): the learner's own report of what it trained."""

    metrics: dict[str, float]
    weights: WeightHandle
    prompt_record_ids: list[str]  # Group.prompt_id: dataset record ids, not token ids
    samples: list[dict] = field(default_factory=list)  # a few groups' first completion, for the loggers
    replay_stats: dict[str, float] = field(default_factory=dict)  # the replay actor's, as the batch's pull left them

    @property
    def version(self) -> int:
        return self.weights.version


class LearnerActor:
    """One rank of the learner. ``replay``: the name of the replay actor (a name survives a restart, a handle may
    not), None for ``rlfleet dpo``; ``make_learner(cfg, rank)`` builds the learner (default: the GRPO family's,
    :func:`policy_learner`); ``rendezvous``: the group's store ``(address, port)`` when ``rank`` is one of several."""

    def __init__(self, cfg: RLFleetConfig, replay: str | None = None, make_learner: LearnerFactory | None = None,
                 rank: Rank = SINGLE, rendezvous: tuple[str, int] | None = None):
        quiet_kill_in_finalizers()
        self.rank = rank
        threads = cfg.cluster.learner_threads
        self.threads = None
        if replay is None:  # the learner is the job's only stage: every core
            set_threads(node_cores() if threads == "auto" else threads)
        else:
            self.threads = LearnerThreads(threads, int(cfg.cluster.learner_num_cpus), node_cores())
        if rank.sharded:
            init_process_group(rank, *rendezvous, resolve_device(cfg.learner.device), cfg.cluster.timeout_s)
        self.learner = (make_learner or policy_learner)(cfg, rank)
        self.publisher = self.replay = None
        if replay is not None and rank.leader:
            dtype = publish_dtype(cfg.model, cfg.generation, self.learner.compute_dtype,
                                  cfg.cluster.generator_num_gpus > 0)
            self.publisher = make_publisher(cfg.cluster.weight_transport, dtype, cfg.cluster.weight_sync_timeout_s,
                                            published_contents(cfg.model.lora))
            self.replay = ray.get_actor(replay)
        self.groups_per_step = cfg.learner.groups_per_step
        self.rpc_timeout_s = cfg.cluster.timeout_s

    def train_step(self, timeout_s: float, generators: list[str] | None = None) -> StepResult | None:
        """Sample ``groups_per_step`` groups from the replay actor (rank 0, waiting up to ``timeout_s``), train on
        them and publish the new weights (to ``generators``, for a transport with a membership), one call per step
        so the driver can start the next step at once. None when the replay actor has no full batch in time (the
        driver decides what to do then), and on ranks other than 0."""
        start = time.perf_counter()
        groups, replay_stats = None, {}
        if self.rank.leader:
            request = self.replay.sample_with_stats.remote(self.groups_per_step, self.learner.policy_version,
                                                           timeout_s)
            groups, replay_stats = ray.get(request, timeout=timeout_s + self.rpc_timeout_s)
        groups = dist_.broadcast_object(groups, self.rank)
        waited = time.perf_counter() - start
        if groups is None:
            self.threads.observe(waited, 0.0)
            return None
        with self.training():
            metrics = self.learner.train_step(groups)
            weights = self.publish_weights(generators)
        if not self.rank.leader:
            return None
        metrics["learner/threads"] = float(self.threads.threads)  # this step's (auto may change it for the next)
        self.threads.observe(waited, time.perf_counter() - start - waited)
        metrics |= self.publisher.stats()
        samples = [{"prompt_id": g.prompt_id, "reward": float(g.rewards[0]), "completion": g.meta.get("completion", "")}
                   for g in groups[:SAMPLES_PER_STEP]]
        return StepResult(metrics, weights, [g.prompt_id for g in groups], samples, replay_stats)

    def training(self):
        """The context of a step's training and publication, once its batch is in hand (the colocated actor puts
        its engine to sleep there)."""
        return nullcontext()

    def publish_weights(self, generators: list[str] | None = None) -> WeightHandle | None:
        """Publish the current policy through the transport from rank 0 (``broadcast``: to the group of
        ``generators``, the pool's member keys, rebuilt when they changed); every rank gathers its shards. The
        driver's ``ray.get`` of this call yields the small handle (object refs inside it are never resolved), so
        bulk data never passes through the driver."""
        state = self.learner.state_dict()
        if not self.rank.leader:
            return None
        if generators is not None:
            self.publisher.connect(generators)
        return self.publisher.publish(state, self.learner.policy_version)

    def train(self, items: list) -> dict[str, float]:
        """One step on ``items`` the job sends (``rlfleet dpo``'s preference pairs); its metrics."""
        return self.learner.train_step(items)

    def evaluate(self, items: list) -> dict[str, float]:
        return self.learner.evaluate(items)

    def save(self, step_dir: str) -> None:
        self.learner.save(step_dir)

    def load(self, step_dir: str) -> None:
        self.learner.load(step_dir)

    def save_merged(self, directory: str) -> None:
        """Base + LoRA adapter merged, in Hugging Face format (``model.lora.save_merged``)."""
        self.learner.save_merged(directory)

    def save_bema(self, directory: str) -> None:
        """DPO and online DPO with ``dpo.bema``: the BEMA weights in Hugging Face format."""
        self.learner.save_bema(directory)

    def version(self) -> int:
        return self.learner.policy_version

    def step(self) -> int:
        return self.learner.step


def policy_learner(cfg: RLFleetConfig, rank: Rank) -> Learner:
    """The learner of the GRPO family: the default ``make_learner``."""
    token_staleness = cfg.replay.max_staleness if cfg.replay.staleness_unit == "token" else None
    return PolicyLearner(cfg.model, cfg.algorithm, cfg.learner, cfg.generation, cfg.seed, rank, token_staleness)


def learner_options(cfg: ClusterConfig) -> dict:
    """Ray options of each learner rank: its CPUs and GPUs, and, where ``learner_threads`` exceeds its CPUs or is
    ``auto`` (it borrows cores the generators leave idle), OpenMP threads that sleep at a barrier instead of
    spinning. A spinning thread waits out a descheduled one while a generator holds that core: 2 threads on a busy
    neighbour's core took 3.1x one thread's time, 1.2x passive (bench/RESULTS.md section 11). OpenMP reads
    ``OMP_WAIT_POLICY`` once, when torch loads it, so it goes in the actor's environment (merged with the job's
    runtime_env by Ray)."""
    options = {"num_cpus": cfg.learner_num_cpus, "num_gpus": cfg.learner_num_gpus}
    threads = cfg.learner_threads
    if threads == "auto" or (threads is not None and threads > cfg.learner_num_cpus):
        options["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    return options


def make_learner_actor(cfg: RLFleetConfig, replay: str | None, make_learner: LearnerFactory | None = None,
                       **options: Any) -> ray.actor.ActorHandle:
    """Start a single-rank :class:`LearnerActor` (tests, benchmarks; jobs start a
    :class:`~rlfleet.cluster.learners.LearnerGroup`) with :func:`learner_options`; ``options`` (any ``ray.remote``
    option) override them."""
    options = {**learner_options(cfg.cluster), **options}
    return ray.remote(LearnerActor).options(**options).remote(cfg, replay, make_learner)
