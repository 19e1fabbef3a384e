"""A fixed-latency stand-in for the vLLM engine, and a generation actor that uses it (benchmarks only).

The only place a stand-in is right: it isolates rlfleet's own overhead (driver, admission, Ray calls, reward
functions, group building, replay, learner) from generation compute. :class:`StandInGenerationActor` is rlfleet's
``GenerationActor`` with its engine swapped: the same ``Generator`` (tokenization, reward functions, advantages,
``Group`` packing), the same ``generate`` (groups to the replay actor, waiting for its ack), ``update_weights`` (Ray
still resolves the weights ref; only the engine load is skipped) and ``ready``.

:func:`use_stand_in` makes ``rlfleet train`` (``rlfleet.cluster.driver.train``) start stand-in actors: the driver
looks ``make_generation_actor`` up in ``rlfleet.generation.actor`` when a run starts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from rlfleet.generation.actor import GenerationActor
from rlfleet.generation.engine import Completion
from rlfleet.generation.generator import Generator
from rlfleet.config import RLFleetConfig
from rlfleet.models import load_tokenizer

STAND_IN_LOGPROB = -5.56  # ~log(1/260): what the random-init byte model assigns to a token


class FixedLatencyEngine:
    """``sample`` sleeps ``latency_s`` per call (whatever the batch), then returns random byte completions of
    uniform length in [1, max_completion_length] (truncated at the limit) with a constant behaviour log-prob."""

    def __init__(self, max_completion_length: int, max_model_len: int, latency_s: float, seed: int):
        self.max_completion_length = max_completion_length
        self.max_model_len = max_model_len
        self.latency_s = latency_s
        self.version = 0
        self.rng = np.random.default_rng(seed)

    def sample(self, prompt_token_ids: list[list[int]], n: int) -> list[list[Completion]]:
        time.sleep(self.latency_s)
        T = self.max_completion_length
        out = []
        for _ in prompt_token_ids:
            lengths = self.rng.integers(1, T + 1, size=n)  # [n]
            out.append([Completion(token_ids=self.rng.integers(0, 256, int(L)).tolist(),
                                   logprobs=[STAND_IN_LOGPROB] * int(L), truncated=bool(L == T)) for L in lengths])
        return out

    def update_weights(self, state_dict: Mapping, version: int) -> None:
        self.version = int(version)


class StandInGenerationActor(GenerationActor):
    """``GenerationActor`` whose engine is a :class:`FixedLatencyEngine` of ``latency_s`` per request."""

    def __init__(self, cfg: RLFleetConfig, replay, index: int = 0, latency_s: float = 0.5):
        self.cfg = cfg
        self.replay = replay
        self.engine = FixedLatencyEngine(cfg.generation.max_completion_length, cfg.model.max_model_len, latency_s,
                                         seed=cfg.seed + index)
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        self.generator = Generator.from_config(self.engine, tokenizer, cfg)


def use_stand_in(latency_s: float) -> None:
    """From now on, runs started in this process create stand-in generation actors of ``latency_s``."""
    import ray

    import rlfleet.generation.actor as actor_module

    def make_stand_in(cfg: RLFleetConfig, replay, index: int = 0, **options):
        opts = dict(name=f"rlfleet-generator-{index}", num_cpus=cfg.cluster.generator_num_cpus,
                    num_gpus=cfg.cluster.generator_num_gpus, max_restarts=cfg.cluster.max_restarts) | options
        return ray.remote(StandInGenerationActor).options(**opts).remote(cfg, replay, index, latency_s)

    actor_module.make_generation_actor = make_stand_in
