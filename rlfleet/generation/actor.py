"""The generation actor: a thin Ray shell around :class:`~rlfleet.generation.generator.Generator` and its vLLM engine.

The class carries no ``@ray.remote`` decorator: resources come from the config at launch
(:func:`make_generation_actor`). Groups go straight to the replay actor; the caller gets a small stats dict.
Ray runs one method at a time on the actor, so a weight update never lands in the middle of a generation.
"""

from __future__ import annotations

import time

import ray

from rlfleet.generation.engine import Engine
from rlfleet.generation.generator import Generator
from rlfleet.config import RLFleetConfig
from rlfleet.models import load_tokenizer
from rlfleet.transport.packed import PackedWeights, unpack


class GenerationActor:
    """One vLLM engine with the policy's weights (seeded ``cfg.seed + index``), its generator and a replay handle."""

    def __init__(self, cfg: RLFleetConfig, replay: ray.actor.ActorHandle, index: int = 0):
        self.cfg = cfg
        self.replay = replay
        self.engine = Engine(cfg.model, cfg.generation, seed=cfg.seed + index)
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        self.generator = Generator.from_config(self.engine, tokenizer, cfg)

    def generate(self, records: list[dict]) -> dict[str, float]:
        """Generate groups for ``records``, hand them to the replay actor (waiting for its ack), return stats."""
        groups, stats = self.generator.generate(records)
        if groups:
            ray.get(self.replay.add.remote(groups), timeout=self.cfg.cluster.timeout_s)
        return stats

    def update_weights(self, weights: PackedWeights, version: int) -> float:
        """Load weights in place (the driver passes an ObjectRef; Ray resolves it to a view of the object store);
        returns the seconds it took."""
        start = time.perf_counter()
        self.engine.update_weights(unpack(weights), version)
        return time.perf_counter() - start

    def version(self) -> int:
        return self.engine.version

    def ready(self) -> bool:
        return True


def make_generation_actor(cfg: RLFleetConfig, replay: ray.actor.ActorHandle, index: int = 0, **options):
    """Start ``GenerationActor`` number ``index`` named ``rlfleet-generator-{index}``, resources from ``cfg.cluster``.

    ``options`` override the ``.options()`` defaults (e.g. a placement-group scheduling strategy).
    """
    opts = dict(
        name=f"rlfleet-generator-{index}",
        num_cpus=cfg.cluster.generator_num_cpus,
        num_gpus=cfg.cluster.generator_num_gpus,
        max_restarts=cfg.cluster.max_restarts,
    ) | options
    return ray.remote(GenerationActor).options(**opts).remote(cfg, replay, index)
