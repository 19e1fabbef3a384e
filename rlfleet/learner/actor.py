"""Ray wrapper of :class:`~rlfleet.learner.policy.PolicyLearner`: pulls batches from the replay actor, publishes
weights through the object store. Each method delegates in a line or two; the logic lives in ``policy.py``."""

from __future__ import annotations

from typing import Any

import ray

from rlfleet.config import RLFleetConfig
from rlfleet.learner.policy import PolicyLearner


class LearnerActor:
    """Created with :func:`make_learner_actor`; ``replay`` is the handle of the replay actor."""

    def __init__(self, cfg: RLFleetConfig, replay: Any):
        self.learner = PolicyLearner(cfg.model, cfg.algorithm, cfg.learner, cfg.generation, cfg.seed)
        self.replay = replay
        self.groups_per_step = cfg.learner.groups_per_step
        self.rpc_timeout_s = cfg.cluster.timeout_s

    def train_step(self, timeout_s: float) -> tuple[dict[str, float], list[ray.ObjectRef], int] | None:
        """Sample ``groups_per_step`` groups from the replay actor (waiting up to ``timeout_s``), train on them and
        publish the new weights: ``(metrics, [weights ref], policy_version)``, one call per step so the driver can
        start the next step at once. None when the replay actor has no full batch in time; the driver decides what
        to do then."""
        request = self.replay.sample.remote(self.groups_per_step, self.learner.policy_version, timeout_s)
        groups = ray.get(request, timeout=timeout_s + self.rpc_timeout_s)
        if groups is None:
            return None
        metrics = self.learner.train_step(groups)
        return metrics, *self.publish_weights()

    def publish_weights(self) -> tuple[list[ray.ObjectRef], int]:
        """One ``ray.put`` of the packed state dict (one copy into the object store), returned as ``([ref],
        policy_version)``: the driver's ``ray.get`` of this call yields the ref (nested refs are never resolved), so
        bulk data never passes through it."""
        return [ray.put(self.learner.packed_weights())], self.learner.policy_version

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)

    def version(self) -> int:
        return self.learner.policy_version


def make_learner_actor(cfg: RLFleetConfig, replay_handle: Any, **options: Any) -> ray.actor.ActorHandle:
    """Start a :class:`LearnerActor` with the learner's resources from ``cfg.cluster``; ``options`` (any
    ``ray.remote`` option: name, scheduling_strategy, num_gpus ...) override them."""
    options = {"num_cpus": cfg.cluster.learner_num_cpus, "num_gpus": cfg.cluster.learner_num_gpus, **options}
    return ray.remote(LearnerActor).options(**options).remote(cfg, replay_handle)
