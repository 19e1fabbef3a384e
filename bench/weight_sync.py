"""Benchmark 3: weight sync, from the learner's step end to every generator running the new weights.

    .venv/bin/python bench/weight_sync.py [--quick | --full] [--lora]

(``--lora``: a LoRA adapter's sync against the full model's, with the learner's step time and memory:
``bench/lora.py``.)

The real path of ``rlfleet train``, with rlfleet's own actors: ``LearnerActor.publish_weights()`` (the end of
every ``train_step``) packs the state dict into the learner's reusable host buffer in the compute dtype
(``rlfleet/transport/packed.py``) and ``ray.put``\ s it (the ``object_store`` transport); every
``GenerationActor.update_weights(handle)`` gets a read-only view of the object store from Ray, unpacks it into
tensor views and loads them into its vLLM engine in place (``collective_rpc("reload_weights")``, then a prefix-cache reset). Timed from the driver: ``sync_s`` =
publish call -> the last generator's update returned;
parts: ``publish_s`` (learner pack + put, as the driver sees it), ``pack_s`` and ``put_s`` (the same two as the
learner times them), ``load_s`` (the slowest generator's engine load, as it reports it) and ``transfer_s`` (the
rest: the generators' fetch of the object, call overheads). After each sync every generator's version is checked.

Bound: one memory copy of the same bytes at this machine's copy bandwidth (``numpy.copyto`` of a buffer that size,
best of 5, measured between the syncs), ``copy_s = bytes / bandwidth``. ``x_copy = sync_s / copy_s`` is how many
copy-times a sync costs (the design needs 2 + N copies: into the pack buffer, into the object store, into each
engine; with N generators on C cores at best 2 + ceil(N / C) copy-times).

Two publication paths, interleaved on the same actors: ``packed`` (rlfleet as it is) and ``dict`` (rlfleet before
the packed buffer, kept here for the comparison: a dict of CPU tensors ``ray.put`` as is, which Ray pickles tensor by
tensor, copying the bytes on put and again on get). Sizes: rlfleet's ``tiny`` and ``small`` and bench-built
random-init Qwen2 models of ~50M and ~100M parameters; 1, 2 and 4 generators, each configuration repeated and the
order reversed every repetition.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import (LoadMonitor, arg_parser, init_ray, load_line, machine, median, model_path,  # noqa: E402
                          param_count, pick, print_table, save_json, setup_env)

PATHS = ("packed", "dict", "broadcast")


def bench_actor_classes():
    """rlfleet's learner and generation actors plus the timed parts and the old ``dict`` path (bench only)."""
    import ray

    from rlfleet.generation.actor import GenerationActor
    from rlfleet.learner.actor import LearnerActor

    class BenchLearner(LearnerActor):
        def weights_dict(self) -> dict:
            """rlfleet's publication before the packed buffer: one contiguous CPU copy per tensor (tied once)."""
            learner, copies, out = self.learner, {}, {}
            for name, t in learner.model.state_dict().items():
                key = (t.data_ptr(), tuple(t.shape), t.stride())
                if key not in copies:
                    copies[key] = t.detach().to("cpu", learner.compute_dtype, copy=True).contiguous()
                out[name] = copies[key]
            return out

        def publish_timed(self, path: str) -> tuple[list, float, float]:
            """([ref], pack_s, put_s) for ``path``."""
            t0 = time.perf_counter()
            weights = self.learner.packed_weights() if path == "packed" else self.weights_dict()
            t1 = time.perf_counter()
            ref = ray.put(weights)
            return [ref], t1 - t0, time.perf_counter() - t1

        def publish_as(self, generators: list[str], version: int):
            """``publish_weights`` as if ``version`` steps had been trained (versions must grow across paths)."""
            self.learner.policy_version = version
            return self.publish_weights(generators)

    class BenchGenerator(GenerationActor):
        def load_weights_dict(self, state_dict: dict, version: int) -> float:
            start = time.perf_counter()
            self.engine.load_weights(state_dict, version)
            return time.perf_counter() - start

    return BenchLearner, BenchGenerator


def copy_seconds(nbytes: int, repeats: int = 5) -> float:
    """Best time of ``numpy.copyto`` between two warm buffers of ``nbytes``: one memory copy at full speed."""
    src = np.ones(max(nbytes // 8, 1), dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_size(size: str, gen_counts: list[int], reps: int) -> tuple[list[dict], dict]:
    """Start one learner per path and max(gen_counts) generators for ``size``; time every (path, N) ``reps``
    times. Returns the samples and the size's facts."""
    import ray

    from rlfleet.config import load_config
    from rlfleet.replay.actor import make_replay_actor
    from rlfleet.transport import WeightHandle

    path = model_path(size)
    params = param_count(path)
    cfg = load_config(Path(__file__).resolve().parents[1] / "deploy" / "quickstart.yaml",
                      [f"model.name_or_path={path}", "cluster.max_restarts=0"])
    t0 = time.perf_counter()
    replay_name = "bench-weight-sync-replay"
    replay = make_replay_actor(cfg.replay, cfg.seed, name=replay_name)
    learner_cls, generator_cls = bench_actor_classes()
    learner = ray.remote(learner_cls).options(num_cpus=cfg.cluster.learner_num_cpus).remote(cfg, replay_name)
    # generators with vLLM's weight-transfer engine (gloo backend): they take object-store handles too
    bcfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"weight_transport": "broadcast"})})
    broadcaster = ray.remote(learner_cls).options(num_cpus=cfg.cluster.learner_num_cpus).remote(bcfg, replay_name)
    gens = [ray.remote(concurrency_groups={"weights": 1})(generator_cls).options(
                name=f"bench-generator-{i}", num_cpus=cfg.cluster.generator_num_cpus).remote(bcfg, replay_name, i)
            for i in range(max(gen_counts))]
    ray.get([g.ready.remote() for g in gens] + [learner.version.remote(), broadcaster.version.remote()], timeout=600)
    group_of = {"n": 0}
    start_s = time.perf_counter() - t0
    nbytes = 4 * params  # float32 on CPU (model.dtype auto); tied embeddings stored once

    version = 0
    samples: list[dict] = []

    def sync(path_name: str, n: int) -> dict:
        nonlocal version
        version += 1
        keys = [f"bench-generator-{i}@0" for i in range(n)]
        if path_name == "broadcast":
            if group_of["n"] != n:  # (re)build the weight-transfer group outside the timing
                ray.get(broadcaster.publish_as.remote(keys, version), timeout=600)
                ray.get([g.update_weights.remote(handle) for g in gens[:n]
                         for handle in [WeightHandle("broadcast", version, None)]], timeout=600)
                group_of["n"] = n
                version += 1
            t0 = time.perf_counter()
            handle = ray.get(broadcaster.publish_as.remote(keys, version), timeout=600)  # the round: all receive
            t1 = time.perf_counter()
            loads = ray.get([g.update_weights.remote(handle) for g in gens[:n]], timeout=600)  # load the round
            t2 = time.perf_counter()
            held = ray.get([g.version.remote() for g in gens[:n]], timeout=600)
            return {"size": size, "path": path_name, "generators": n, "sync_s": t2 - t0, "publish_s": t1 - t0,
                    "pack_s": 0.0, "put_s": 0.0, "load_s": max(loads), "transfer_s": t2 - t1 - max(loads),
                    "verified": held == [handle.version] * n}
        t0 = time.perf_counter()
        refs, pack_s, put_s = ray.get(learner.publish_timed.remote(path_name), timeout=600)
        t1 = time.perf_counter()
        if path_name == "packed":  # the object_store transport's handle, as the driver passes it
            handle = WeightHandle("object_store", version, refs[0])
            loads = ray.get([g.update_weights.remote(handle) for g in gens[:n]], timeout=600)
        else:
            loads = ray.get([g.load_weights_dict.remote(refs[0], version) for g in gens[:n]], timeout=600)
        t2 = time.perf_counter()
        ok = ray.get([g.version.remote() for g in gens[:n]], timeout=600) == [version] * n
        return {"size": size, "path": path_name, "generators": n, "sync_s": t2 - t0, "publish_s": t1 - t0,
                "pack_s": pack_s, "put_s": put_s, "load_s": max(loads), "transfer_s": t2 - t1 - max(loads),
                "verified": ok}

    for path_name in PATHS:  # warm-up: first puts map fresh object-store memory, first loads warm the engines
        for _ in range(2):
            sync(path_name, max(gen_counts))
    for r in range(reps):
        order = [(p, n) for n in gen_counts for p in PATHS]
        for p, n in order if r % 2 == 0 else order[::-1]:
            samples.append(sync(p, n) | {"copy_s": copy_seconds(nbytes)})
    for handle in [replay, learner, broadcaster, *gens]:
        ray.kill(handle, no_restart=True)
    return samples, {"size": size, "params": params, "bytes": nbytes, "start_s": start_s}


def main() -> None:
    if "--lora" in sys.argv:  # adapter sync vs full sync: bench/lora.py (with the learner's step and memory)
        from bench import lora

        sys.argv.remove("--lora")
        lora.main()
        return
    parser = arg_parser(__doc__.split("\n")[0])
    args = parser.parse_args()
    setup_env()
    sizes = pick(args.mode, ["tiny", "small"], ["tiny", "small", "m100"], ["tiny", "small", "m50", "m100"])
    gen_counts = [1, 2, 4]
    reps = pick(args.mode, 3, 4, 10)
    print(f"weight sync: sizes {sizes}, generators {gen_counts}, {reps} repetitions, paths {' / '.join(PATHS)}",
          flush=True)
    init_ray(num_cpus=2 + 2 * max(gen_counts))  # actors outnumber the cores: syncs are timed one at a time
    samples, facts = [], []
    with LoadMonitor() as load:
        for size in sizes:
            s, f = measure_size(size, gen_counts, reps)
            samples += s
            facts.append(f)
            print(f"  {size}: {f['params'] / 1e6:.1f}M params, {f['bytes'] / 2**20:.0f} MiB, actors up in "
                  f"{f['start_s']:.0f} s", flush=True)

    rows = []
    for f in facts:
        copy_s = median(s["copy_s"] for s in samples if s["size"] == f["size"])
        base = {}
        for path_name in PATHS:
            for n in gen_counts:
                mine = [s for s in samples if s["size"] == f["size"] and s["path"] == path_name and
                        s["generators"] == n]
                row = {"size": f["size"], "params_M": f["params"] / 1e6, "MiB": f["bytes"] / 2**20,
                       "path": path_name, "generators": n, "reps": len(mine),
                       **{k: median(s[k] for s in mine) for k in ("sync_s", "publish_s", "pack_s", "put_s", "transfer_s",
                                                             "load_s")},
                       "copy_s": copy_s, "copy_GBps": f["bytes"] / copy_s / 1e9,
                       "verified": all(s["verified"] for s in mine)}
                row["x_copy"] = row["sync_s"] / copy_s
                base.setdefault(path_name, row["sync_s"])
                row["vs_1gen"] = row["sync_s"] / base[path_name]
                rows.append(row)
    table = print_table(rows, ["size", "params_M", "MiB", "path", "generators", "sync_s", "publish_s", "pack_s", "put_s",
                               "transfer_s",
                               "load_s", "copy_s", "x_copy", "vs_1gen", "copy_GBps", "verified"],
                        title="weight sync (medians): learner publish -> every generator loaded; x_copy = sync_s / "
                              "one memory copy of the same bytes; vs_1gen = sync_s / sync_s with 1 generator")
    summary = load.summary()
    print(load_line(summary))
    save_json("weight_sync", {"benchmark": "weight_sync", "mode": args.mode, "sizes": facts,
                              "gen_counts": gen_counts, "reps": reps, "machine": machine(), "load": summary,
                              "rows": rows, "samples": samples, "table": table}, args.out)


if __name__ == "__main__":
    main()
