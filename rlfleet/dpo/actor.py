"""Ray wrapper of :class:`~rlfleet.dpo.learner.DPOLearner`. Each method delegates in one line; the logic lives in
``dpo/learner.py``. Preference pairs arrive from the driver (a few KB per step); nothing else crosses the wire. With
``cluster.learner_workers`` > 1 this actor is rank 0 of a learner group (:mod:`rlfleet.learner.group`)."""

from __future__ import annotations

from typing import Any

import ray

from rlfleet.config import RLFleetConfig
from rlfleet.dpo.learner import DPOLearner
from rlfleet.dpo.data import PreferencePair
from rlfleet.learner.distributed import Rank
from rlfleet.learner.group import LearnerGroup, follow, learner_options
from rlfleet.learner.trainee import resolve_device
from rlfleet.learner.threads import node_cores, set_threads


class DPOLearnerActor:
    """Created with :func:`make_dpo_learner_actor`."""

    def __init__(self, cfg: RLFleetConfig, rank: Rank | None = None, rendezvous=None):
        threads = cfg.cluster.learner_threads
        set_threads(node_cores() if threads == "auto" else threads)  # the learner is the only stage: every core
        self.group = LearnerGroup(DPOLearnerActor, (cfg,), cfg.cluster, resolve_device(cfg.learner.device),
                                  rendezvous, rank)
        self.learner = DPOLearner(cfg.model, cfg.dpo, cfg.learner, cfg.seed, rank=self.group.rank)

    def _all(self, method: str, *args):
        """``method(*args)`` of the learner on every rank; rank 0's result."""
        return self.group.run(method, args, lambda: getattr(self.learner, method)(*args))

    def train_step(self, pairs: list[PreferencePair]) -> dict[str, float]:
        return self._all("train_step", pairs)

    def evaluate(self, pairs: list[PreferencePair]) -> dict[str, float]:
        return self._all("evaluate", pairs)

    def save(self, directory: str) -> None:
        self._all("save", directory)

    def load(self, directory: str) -> None:
        self._all("load", directory)

    def save_bema(self, directory: str) -> None:
        self._all("save_bema", directory)

    def follow(self, method: str, *args) -> None:
        follow(self.learner, method, *args)

    def step(self) -> int:
        return self.learner.step


def make_dpo_learner_actor(cfg: RLFleetConfig, **options: Any) -> ray.actor.ActorHandle:
    """Start a :class:`DPOLearnerActor` with the learner's resources from ``cfg.cluster``; ``options`` (any
    ``ray.remote`` option: name, scheduling_strategy, num_gpus ...) override them."""
    options = {**learner_options(cfg.cluster), **options}
    return ray.remote(DPOLearnerActor).options(**options).remote(cfg)
