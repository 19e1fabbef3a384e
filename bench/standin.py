"""A fixed-latency stand-in for the vLLM engine (benchmarks only).

The only place a stand-in is right: it isolates rlfleet's own overhead (driver, admission, Ray calls, reward
functions, group building, replay, learner) from generation compute. It plugs in through the generation actor's
engine factory (``train(cfg, engine_factory=fixed_latency(0.5))``): the actor is rlfleet's own
``GenerationActor`` with the same ``Generator`` (tokenization, reward functions, advantages, ``Group`` packing),
``generate`` (groups to the replay actor, waiting for its ack), ``update_weights`` (the transport still reads the
weights; only the engine's load is skipped: it is a :class:`rlfleet.transport.WeightLoader`, which is all the object
store's receiver calls) and ``ready``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from rlfleet.config import RLFleetConfig
from rlfleet.generation.engine import Completion

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

    def load_weights(self, state_dict: Mapping, version: int, contents=None) -> None:
        self.version = int(version)


class fixed_latency:  # noqa: N801  (used like a function: an engine factory)
    """An engine factory for ``GenerationActor``: a :class:`FixedLatencyEngine` of ``latency_s`` per request."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    def __call__(self, cfg: RLFleetConfig, seed: int) -> FixedLatencyEngine:
        return FixedLatencyEngine(cfg.generation.max_completion_length, cfg.model.max_model_len, self.latency_s, seed)
