"""Benchmark: LoRA against full fine-tuning, side by side in one run: weight sync and the learner.

    .venv/bin/python bench/lora.py [--quick | --full]

1. **Sync** (also ``bench/weight_sync.py --lora``): rlfleet's own learner and generation actors, object-store
   transport, one generator; ``sync_s`` = the learner's ``publish_weights()`` call -> the generator's
   ``update_weights(handle)`` returned (the real path of every step), for the full model and for a rank-16 adapter
   on every linear layer of the decoder (the engine then registers the adapter in memory). ``MiB`` = bytes
   published; ``x_copy`` = ``sync_s`` / one memory copy of the full model's bytes (the bound of a full sync is 3
   such copies: pack, put, load). Versions are checked after every sync.
2. **Learner**: one ``PolicyLearner.train_step`` on 4 groups x 8 completions of 64 tokens (prompts of 32), micro
   batches of 8, on the same model, full vs LoRA; each in its own process, so ``peak_rss_GiB`` (the process's peak
   resident memory, ``ru_maxrss``) is that configuration's own; ``step_s`` is the median of the steps after a
   warm-up step.

Models: rlfleet's ``small`` (~20M parameters) and the bench's ``m100`` (~104M), random-init Qwen2 (bench.common).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (LoadMonitor, arg_parser, init_ray, load_line, machine, median, model_path,  # noqa: E402
                          param_count, pick, print_table, save_json, setup_env)
from bench.weight_sync import copy_seconds  # noqa: E402

RANK = 16
ROOT = Path(__file__).resolve().parents[1]


def measure_sync(size: str, reps: int) -> list[dict]:
    """Full and adapter syncs on ``size``, ``reps`` each, interleaved."""
    import ray

    from rlfleet.config import load_config
    from rlfleet.generation.actor import make_generation_actor
    from rlfleet.learner.actor import make_learner_actor
    from rlfleet.replay.actor import make_replay_actor

    path = model_path(size)
    rows, actors = [], []
    setups = {}
    for kind in ("full", "lora"):
        overrides = [f"model.name_or_path={path}", "cluster.max_restarts=0"]
        if kind == "lora":
            overrides.append(f"model.lora={{r: {RANK}}}")
        cfg = load_config(ROOT / "deploy" / "quickstart.yaml", overrides)
        replay_name = f"bench-lora-replay-{kind}"
        replay = make_replay_actor(cfg.replay, cfg.seed, name=replay_name)
        learner = make_learner_actor(cfg, replay_name)
        gen = make_generation_actor(cfg, replay_name, index={"full": 0, "lora": 1}[kind])
        ray.get([gen.ready.remote(), learner.version.remote()], timeout=900)
        setups[kind] = (learner, gen)
        actors += [replay, learner, gen]
    nbytes = 4 * param_count(path)

    def sync(kind: str) -> dict:
        learner, gen = setups[kind]
        t0 = time.perf_counter()
        handle = ray.get(learner.publish_weights.remote(), timeout=600)
        load_s = ray.get(gen.update_weights.remote(handle), timeout=600)
        sync_s = time.perf_counter() - t0
        return {"size": size, "kind": kind, "sync_s": sync_s, "load_s": load_s,
                "verified": ray.get(gen.version.remote()) == handle.version}

    for kind in ("full", "lora"):  # warm-up
        sync(kind)
    samples = []
    for r in range(reps):
        for kind in ("full", "lora") if r % 2 == 0 else ("lora", "full"):
            samples.append(sync(kind) | {"copy_s": copy_seconds(nbytes)})
    published = {kind: ray.get(setups[kind][0].publish_weights.remote()) for kind in setups}
    sizes = {kind: ray.get(handle.payload).buffer.nbytes for kind, handle in published.items()}
    for kind in ("full", "lora"):
        mine = [s for s in samples if s["kind"] == kind]
        copy_s = median(s["copy_s"] for s in mine)
        rows.append({"size": size, "params_M": nbytes / 4e6, "kind": kind, "MiB": sizes[kind] / 2**20,
                     "sync_s": median(s["sync_s"] for s in mine), "load_s": median(s["load_s"] for s in mine),
                     "copy_s": copy_s, "x_copy": median(s["sync_s"] for s in mine) / copy_s, "reps": len(mine),
                     "verified": all(s["verified"] for s in mine)})
    full, lora = rows[-2], rows[-1]
    lora["vs_full"] = lora["sync_s"] / full["sync_s"]
    full["vs_full"] = 1.0
    for a in actors:
        ray.kill(a, no_restart=True)
    return rows


def learner_child(size: str, kind: str, steps: int) -> dict:
    """One configuration's learner steps, in this (fresh) process: step seconds and peak RSS."""
    import resource

    import numpy as np
    import torch

    from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, LoraConfig, ModelConfig
    from rlfleet.learner.policy import PolicyLearner
    from rlfleet.types import Group

    torch.manual_seed(0)
    model = ModelConfig(name_or_path=model_path(size), lora=LoraConfig(r=RANK) if kind == "lora" else None)
    learner = PolicyLearner(model, AlgorithmConfig(), LearnerConfig(device="cpu", micro_batch_size=8),
                            GenerationConfig(num_generations=8, generation_batch_size=32, max_completion_length=64))
    rng = np.random.default_rng(0)
    groups = [Group(f"p{i}", rng.integers(0, 256, 32).astype(np.int32), rng.integers(0, 256, (8, 64)).astype(np.int32),
                    np.full(8, 64, np.int32), np.full((8, 64), -5.5, np.float32), rng.random(8).astype(np.float32),
                    rng.standard_normal(8).astype(np.float32), np.zeros(8, bool), 0, reward_std=0.3)
              for i in range(4)]
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        learner.train_step(groups)
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
    return {"size": size, "kind": kind, "step_s": float(np.median(times[1:])), "trainable_M": trainable / 1e6,
            "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads()}


def measure_learner(size: str, steps: int) -> list[dict]:
    rows = []
    for kind in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--child", size, kind, str(steps)], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows[1]["vs_full_step"] = rows[1]["step_s"] / rows[0]["step_s"]
    rows[1]["vs_full_rss"] = rows[1]["peak_rss_GiB"] / rows[0]["peak_rss_GiB"]
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(learner_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    args = arg_parser(__doc__.split("\n")[0]).parse_args()
    setup_env()
    sizes = pick(args.mode, ["small"], ["small", "m100"], ["small", "m100"])
    reps, steps = pick(args.mode, 3, 5, 10), pick(args.mode, 2, 3, 5)
    print(f"LoRA (rank {RANK}) vs full: sizes {sizes}, {reps} syncs and {steps} learner steps each", flush=True)
    init_ray(num_cpus=6)
    with LoadMonitor() as load:
        sync_rows = [row for size in sizes for row in measure_sync(size, reps)]
        learner_rows = [row for size in sizes for row in measure_learner(size, steps)]
    sync_table = print_table(sync_rows, ["size", "params_M", "kind", "MiB", "sync_s", "load_s", "copy_s", "x_copy",
                                         "vs_full", "reps", "verified"],
                             title="weight sync (medians), one generator: publish -> loaded; x_copy = sync_s / one "
                                   "memory copy of the full model")
    learner_table = print_table(learner_rows, ["size", "kind", "trainable_M", "step_s", "peak_rss_GiB",
                                               "vs_full_step", "vs_full_rss", "threads"],
                                title="learner: one train_step (4 x 8 sequences of 32 + 64 tokens)")
    summary = load.summary()
    print(load_line(summary))
    save_json("lora", {"benchmark": "lora", "mode": args.mode, "rank": RANK, "machine": machine(), "load": summary,
                       "sync": sync_rows, "learner": learner_rows, "tables": [sync_table, learner_table]}, args.out)


if __name__ == "__main__":
    main()
