"""Benchmark 4: the replay actor's throughput (add + sample) against the rate the learner consumes groups.

    .venv/bin/python bench/replay_throughput.py [--quick | --full]

rlfleet's ``ReplayActor`` (``make_replay_actor``) between 2 (and 8) producer actors that call ``add`` with 4 groups at a
time and wait for the ack, as ``GenerationActor.generate`` does, and one consumer actor that calls
``sample(groups_per_step=4, version, timeout)`` and waits, as ``LearnerActor.train_step`` does. Groups have
realistic shapes: a 128-token prompt and G completions of up to T tokens (lengths uniform in [T/2, T]; a quarter of
the groups have zero reward variance). ``groups_per_s`` = groups through add and sample / wall time, both sides
running at once; ``sample_ms`` = median latency of one ``sample`` call as the consumer sees it. Two buffer modes:
``keep`` (plain FIFO) and ``replay`` (zero-variance groups substituted from a 64-group reservoir, drawn with
probability proportional to score). ``buffer_groups_per_s`` is the plain ``ReplayBuffer`` in-process (no Ray): the
cost of the data structure alone.

The learner's rate: ``PolicyLearner.train_step`` in-process on one thread (a learner actor's 1 CPU) on batches of
the same shapes, with the tiny model: the fastest learner this machine runs (a larger model only consumes slower).
``headroom`` = replay groups/s / learner groups/s: the replay actor is never the bottleneck while it is >> 1.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import (LoadMonitor, arg_parser, init_ray, load_line, machine, model_path, pick,  # noqa: E402
                          print_table, save_json, setup_env)

PROMPT_TOKENS = 128
GROUPS_PER_CALL = 4  # groups per add() (one generation request of 4 prompts) and per sample() (groups_per_step)


def make_groups(count: int, G: int, T: int, seed: int, zero_variance_frac: float = 0.25):
    """``count`` groups of G completions of up to T tokens, token ids < 256 (valid for the byte tokenizer)."""
    from rlfleet.types import Group

    rng = np.random.default_rng(seed)
    groups = []
    for i in range(count):
        lengths = rng.integers(T // 2, T + 1, size=G).astype(np.int32)  # [G]
        mask = np.arange(T)[None, :] < lengths[:, None]  # [G, T]
        if rng.random() < zero_variance_frac:
            rewards = np.full(G, 0.5, dtype=np.float32)  # [G]
        else:
            rewards = rng.random(G).astype(np.float32)
        std = float(rewards.std(ddof=1))
        advantages = ((rewards - rewards.mean()) / (std + 1e-4)).astype(np.float32)  # [G]
        groups.append(Group(
            prompt_id=str(i), prompt_token_ids=rng.integers(0, 256, PROMPT_TOKENS).astype(np.int32),
            completion_ids=(rng.integers(0, 256, (G, T)) * mask).astype(np.int32),
            completion_lengths=lengths, behaviour_logprobs=(-rng.random((G, T)) * 5 * mask).astype(np.float32),
            rewards=rewards, advantages=advantages, truncated=lengths == T, policy_version=0, reward_std=std))
    return groups


class Producer:
    """Stands in for a generation actor: sends its groups to the replay actor, ``per_call`` at a time."""

    def __init__(self, replay, G: int, T: int, seed: int):
        self.replay = replay
        self.pool = make_groups(64, G, T, seed)

    def run(self, calls: int) -> float:
        import ray

        t0 = time.perf_counter()
        for c in range(calls):
            start = (c * GROUPS_PER_CALL) % len(self.pool)
            ray.get(self.replay.add.remote(self.pool[start:start + GROUPS_PER_CALL]))
        return time.perf_counter() - t0


class Consumer:
    """Stands in for the learner actor: takes one batch after another, returns each call's latency."""

    def __init__(self, replay):
        self.replay = replay

    def run(self, steps: int) -> list[float]:
        import ray

        latencies = []
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = ray.get(self.replay.sample.remote(GROUPS_PER_CALL, 0, 60.0))
            if batch is None:
                raise RuntimeError("the replay actor formed no batch within 60 s")
            latencies.append(time.perf_counter() - t0)
        return latencies


def through_actor(G: int, T: int, mode: str, total: int, num_producers: int) -> dict:
    """``num_producers`` producers and one consumer through a fresh replay actor; ``total`` groups in all."""
    import ray

    from rlfleet.config import ReplayConfig
    from rlfleet.replay.actor import make_replay_actor

    cfg = ReplayConfig(zero_variance=mode, replay_buffer_size=64 if mode == "replay" else 0, max_staleness=1)
    replay = make_replay_actor(cfg, seed=0, name=None)
    producers = [ray.remote(Producer).options(num_cpus=0).remote(replay, G, T, seed)
                 for seed in range(1, num_producers + 1)]
    consumer = ray.remote(Consumer).options(num_cpus=0).remote(replay)
    ray.get([replay.stats.remote(), consumer.__ray_ready__.remote(), *[p.__ray_ready__.remote() for p in producers]])
    calls = total // (GROUPS_PER_CALL * len(producers))
    t0 = time.perf_counter()
    latencies = consumer.run.remote(calls * len(producers))
    ray.get([p.run.remote(calls) for p in producers])
    latencies = ray.get(latencies)
    wall = time.perf_counter() - t0
    stats = ray.get(replay.stats.remote())
    for handle in [replay, consumer, *producers]:
        ray.kill(handle)
    groups = calls * len(producers) * GROUPS_PER_CALL
    return {"groups": groups, "wall_s": wall, "groups_per_s": groups / wall,
            "sample_ms": 1e3 * statistics.median(latencies), "substituted": stats["replay/substituted"]}


def in_process(G: int, T: int, mode: str, total: int) -> float:
    """Groups/s of ``ReplayBuffer.add`` + ``sample`` alone, no Ray."""
    from rlfleet.config import ReplayConfig
    from rlfleet.replay.buffer import ReplayBuffer

    buffer = ReplayBuffer(ReplayConfig(zero_variance=mode, replay_buffer_size=64 if mode == "replay" else 0), 0)
    pool = make_groups(64, G, T, seed=3)
    t0 = time.perf_counter()
    for c in range(total // GROUPS_PER_CALL):
        start = (c * GROUPS_PER_CALL) % len(pool)
        buffer.add(pool[start:start + GROUPS_PER_CALL])
        if buffer.sample(GROUPS_PER_CALL, 0) is None:
            raise RuntimeError("the buffer formed no batch")
    return total / (time.perf_counter() - t0)


def learner_rate(G: int, T: int, steps: int) -> dict:
    """Groups/s of ``PolicyLearner.train_step`` with the tiny model on 4 groups of this shape, one thread."""
    import torch

    from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, ModelConfig
    from rlfleet.learner.policy import PolicyLearner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        learner = PolicyLearner(ModelConfig(name_or_path=model_path("tiny"), max_model_len=PROMPT_TOKENS + T + 1),
                                AlgorithmConfig(), LearnerConfig(groups_per_step=GROUPS_PER_CALL, learning_rate=1e-4),
                                GenerationConfig(max_completion_length=T), seed=0)
        groups = make_groups(GROUPS_PER_CALL * (steps + 1), G, T, seed=4, zero_variance_frac=0.0)
        learner.train_step(groups[:GROUPS_PER_CALL])  # warm-up
        t0 = time.perf_counter()
        for s in range(1, steps + 1):
            learner.train_step(groups[s * GROUPS_PER_CALL:(s + 1) * GROUPS_PER_CALL])
        step_s = (time.perf_counter() - t0) / steps
    finally:
        torch.set_num_threads(threads)
    return {"learner_step_s": step_s, "learner_groups_per_s": GROUPS_PER_CALL / step_s}


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    args = parser.parse_args()
    setup_env()
    shapes = pick(args.mode, [(8, 256)], [(8, 256), (16, 1024)], [(8, 256), (16, 1024)])
    modes = ["keep", "replay"]
    producers = pick(args.mode, [2], [2, 8], [2, 8])
    total = pick(args.mode, 512, 1024, 2048)
    learner_steps = pick(args.mode, 2, 3, 5)
    print(f"replay throughput: shapes (G, T) {shapes}, modes {modes}, {total} groups per run", flush=True)
    init_ray(num_cpus=4)
    rows = []
    with LoadMonitor() as load:
        for G, T in shapes:
            rate = learner_rate(G, T, learner_steps)
            for mode in modes:
                buffer_rate = in_process(G, T, mode, total)
                for n in producers:
                    row = {"G": G, "T": T, "group_KiB": (G * T * 8 + PROMPT_TOKENS * 4) / 1024, "mode": mode,
                           "producers": n, **through_actor(G, T, mode, total, n),
                           "buffer_groups_per_s": buffer_rate, **rate}
                    row["headroom"] = row["groups_per_s"] / row["learner_groups_per_s"]
                    row["sample_vs_step"] = row["sample_ms"] / 1e3 / row["learner_step_s"]
                    rows.append(row)
                    print(f"  G={G} T={T} {mode}, {n} producers: {row['groups_per_s']:.0f} groups/s through the "
                          f"actor, learner {row['learner_groups_per_s']:.2f} groups/s", flush=True)
    table = print_table(rows, ["G", "T", "group_KiB", "mode", "producers", "groups", "groups_per_s", "sample_ms",
                               "buffer_groups_per_s", "learner_step_s", "learner_groups_per_s", "headroom",
                               "sample_vs_step"],
                        title="replay actor: groups/s through add + sample (N producers, 1 consumer) vs the tiny "
                              "model's learner; headroom = replay / learner; sample_vs_step = one sample call / one "
                              "learner step")
    summary = load.summary()
    print(load_line(summary))
    save_json("replay_throughput", {"benchmark": "replay_throughput", "mode": args.mode, "shapes": shapes,
                                    "total": total, "machine": machine(), "load": summary, "rows": rows,
                                    "table": table}, args.out)


if __name__ == "__main__":
    main()
