"""The driver of ``rlfleet train``: the program that ``ray job submit`` runs.

Phases, top to bottom:
1. validate everything that can be checked without actors (config is already valid; model, data, reward and filter
   functions here), write the resolved ``config.json``;
2. connect to Ray, reserve every actor's resources in one placement group, start the replay, learner and
   generation actors; restore the latest checkpoint when resuming; broadcast the initial weights;
3. the loop: keep generation requests in flight on every generator, as far as the staleness bound admits, and one
   learner step in flight; after each step publish the new weights (one object ref) and record metrics;
   checkpoint every ``save_steps``;
4. a final checkpoint, the plot, and a clean shutdown (also on Ctrl-C / SIGTERM / ``ray job stop``).

Admission control. The learner consumes groups in FIFO order, ``groups_per_step`` per step, and its policy version
counts its steps. Say ``ahead`` groups are queued in the replay actor or being generated, and the next batch the
learner takes will be trained at version ``V + lag``, where ``V`` is the latest published version and ``lag`` is 1
while the learner is training on a batch it has already taken, else 0. A request for ``m`` prompts sampled now, with
version ``V``, is then trained on by version ``V + lag + ceil((ahead + m) / groups_per_step) - 1`` at the latest, so
its staleness stays within ``max_staleness`` iff ``ahead + m <= (max_staleness + 1 - lag) * groups_per_step``. The
driver sizes each request to fit (``max_staleness: 0`` is synchronous on-policy training). Groups that still end up
older (when others ahead of them were dropped) are dropped by the replay actor, and the driver generates anew.

Bulk data never passes through here: groups go generator -> replay, batches replay -> learner, weights learner ->
object store -> generators. The driver moves prompts, object refs, versions and small metric dicts.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.metrics import MetricsLog, Progress, RayMetrics, plot
from rlfleet.cluster.runtime import connect, reserve
from rlfleet.config import ConfigError, RLFleetConfig, dump_config

log = logging.getLogger("rlfleet")


class RunStopped(Exception):
    """SIGTERM (``ray job stop``) or Ctrl-C: stop after a final checkpoint."""


@dataclass
class GenSlot:
    """One generation actor as the driver sees it."""

    index: int
    handle: ray.actor.ActorHandle
    version: int = -1  # weights version the actor holds (or will, once its queued update runs)
    future: ray.ObjectRef | None = None  # the generate() in flight
    prompts: int = 0  # prompts in that request
    sync_future: ray.ObjectRef | None = None  # the update_weights() queued before it


@dataclass
class StepWindow:
    """Generation figures accumulated between two learner steps, per generator."""

    groups: int = 0
    reward_errors: int = 0
    dropped: int = 0
    busy_s: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    sync_s: list[float] = field(default_factory=list)

    def add(self, index: int, stats: dict) -> None:
        self.groups += int(stats.get("gen/groups", 0))
        self.reward_errors += int(stats.get("errors/reward", 0))
        self.dropped += int(stats.get("gen/dropped_groups", 0))
        self.busy_s[index] = self.busy_s.get(index, 0.0) + float(stats.get("gen/seconds", 0.0))
        self.tokens[index] = self.tokens.get(index, 0) + int(stats.get("gen/tokens", 0))

    def per_generator(self, wall_s: float, num_generators: int) -> dict[int, dict[str, float]]:
        out = {}
        for i in range(num_generators):
            busy = self.busy_s.get(i, 0.0)
            out[i] = {"rlfleet_generator_idle_frac": max(0.0, 1.0 - busy / wall_s) if wall_s > 0 else 0.0,
                      "rlfleet_gen_tokens_per_s": self.tokens.get(i, 0) / busy if busy else 0.0}
        return out

    def metrics(self, wall_s: float, num_generators: int) -> dict:
        busy, tokens = sum(self.busy_s.values()), sum(self.tokens.values())
        per_gen = self.per_generator(wall_s, num_generators).values()
        return {
            "gen/groups": self.groups,
            "gen/tokens": tokens,
            "time/gen_s": busy,
            "throughput/gen_tokens_per_s": tokens / busy if busy else 0.0,
            "idle/generator_frac": sum(g["rlfleet_generator_idle_frac"] for g in per_gen) / max(num_generators, 1),
            "errors/reward": self.reward_errors,
            "gen/dropped_groups": self.dropped,
            "sync/seconds": max(self.sync_s, default=0.0),
        }


def preflight(cfg: RLFleetConfig):
    """Checks that need files or imports but no actors: model path, dataset, reward and filter functions."""
    from rlfleet.actors.generator import resolve_reward_funcs
    from rlfleet.actors.scoring import BUILTIN_GROUP_FILTERS, resolve_function
    from rlfleet.data import load_prompt_dataset
    from rlfleet.models import resolve_model_path

    problems = []
    path = resolve_model_path(cfg.model.name_or_path)
    if (path.startswith((".", "/", "~")) or Path(path).suffix) and not Path(path).expanduser().is_dir():
        problems.append(f"model.name_or_path: {path!r} is not a directory; give a model directory, a hub name, "
                        "or builtin:tiny")
    dataset = None
    try:
        dataset = load_prompt_dataset(cfg.data, cfg.data.split, seed=cfg.seed)
    except (ValueError, FileNotFoundError) as err:
        problems.append(f"data.dataset: {err}")
    alg = cfg.algorithm
    checks = [lambda: resolve_reward_funcs(alg, cfg.data)]
    if alg.group_filter_func is not None:
        checks.append(lambda: resolve_function(alg.group_filter_func, BUILTIN_GROUP_FILTERS,
                                               "algorithm.group_filter_func"))
    for check in checks:
        try:
            check()
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    return dataset


def call(ref, cfg: RLFleetConfig, what: str):
    """ray.get with the configured timeout and an error that names the actor."""
    try:
        return ray.get(ref, timeout=cfg.cluster.timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"{what} did not answer within cluster.timeout_s={cfg.cluster.timeout_s:g} s") from None
    except ray.exceptions.RayActorError as err:
        raise RuntimeError(f"{what} died: {err}") from err


def train(cfg: RLFleetConfig) -> dict:
    """Run ``rlfleet train``. Returns a small summary (last metrics, output paths)."""
    from rlfleet.actors.actor import make_generation_actor
    from rlfleet.data import PromptStream
    from rlfleet.learner.actor import make_learner_actor
    from rlfleet.replay.actor import make_replay_actor

    # -- 1. validate and record -------------------------------------------------------------------------------
    dataset = preflight(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = ckpt.latest_checkpoint(out) if cfg.checkpoint.resume else None
    if cfg.checkpoint.resume and resume_from is None:
        print(f"rlfleet: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
    (out / "config.json").write_text(dump_config(cfg))

    # -- 2. cluster, actors, initial state -------------------------------------------------------------------
    where = connect(cfg.cluster)
    started_here = where.startswith("local")
    placement = reserve(cfg.cluster)
    c = cfg.cluster
    replay = make_replay_actor(cfg.replay, cfg.seed, name=None, num_cpus=0)
    learner = make_learner_actor(cfg, replay, num_cpus=c.learner_num_cpus, num_gpus=c.learner_num_gpus,
                                 name="rlfleet-learner", **placement.learner())
    slots = [GenSlot(i, make_generation_actor(
        cfg, replay, i, num_cpus=c.generator_num_cpus, num_gpus=c.generator_num_gpus, name=f"rlfleet-generator-{i}",
        max_restarts=c.max_restarts, **placement.generator(i))) for i in range(c.num_generators)]
    stream = PromptStream(dataset, seed=cfg.seed, shuffle=cfg.data.shuffle)

    step = 0
    if resume_from is not None:
        replay_state, driver_state = ckpt.read_state(resume_from)
        call(learner.load.remote(str(resume_from / "policy")), cfg, "the learner (loading a checkpoint)")
        call(replay.load_state_dict.remote(*replay_state), cfg, "the replay actor (loading a checkpoint)")
        stream.load_state_dict(driver_state["stream"])
        step = driver_state["step"]
        print(f"rlfleet: resumed from {resume_from} at step {step}", flush=True)
    call([s.handle.ready.remote() for s in slots], cfg, "the generation actors (starting their engines)")
    metrics_log = MetricsLog(out, resume_step=step if resume_from else None)
    progress = Progress(cfg.learner.max_steps, cfg.logging.progress, cfg.logging.log_every, start=step)
    print(f"rlfleet: training on {where}: {c.num_generators} generator(s), output in {out}", flush=True)

    # -- 3. the loop ----------------------------------------------------------------------------------------
    gps = cfg.learner.groups_per_step
    prompts_per_request = cfg.generation.generation_batch_size // cfg.generation.num_generations
    weights, version = call(learner.publish_weights.remote(), cfg, "the learner (publishing weights)")
    initial_stats = call(replay.stats.remote(), cfg, "the replay actor")
    sampled_before, substituted_before = initial_stats["replay/sampled"], initial_stats["replay/substituted"]
    ray_metrics = RayMetrics(out.resolve().name)
    steps_here, starved = 0, False
    learner_future: ray.ObjectRef | None = None
    pull_s = min(c.timeout_s, 5.0)  # the learner returns None after waiting this long, so the driver stays in charge
    window, last_record, t_step = StepWindow(), {}, time.perf_counter()

    def save(at_step: int) -> Path:
        # Quiesce generation so the replay buffer and the prompt cursor describe the same moment.
        for s in slots:
            if s.future is not None:
                window.add(s.index, call(s.future, cfg, f"rlfleet-generator-{s.index}"))
                s.future, s.prompts = None, 0
        staging = ckpt.staging_dir(out, at_step)
        call(learner.save.remote(str(staging / "policy")), cfg, "the learner (saving)")
        replay_state = call(replay.state_dict.remote(), cfg, "the replay actor (saving)")
        ckpt.write_state(staging, replay_state, {"step": at_step, "policy_version": version,
                                                 "stream": stream.state_dict()})
        return ckpt.commit(staging, at_step, cfg.checkpoint.keep_last)

    def finish_step(metrics: dict) -> None:
        nonlocal step, steps_here, weights, version, t_step, window, last_record
        step, steps_here = step + 1, steps_here + 1
        weights, version = call(learner.publish_weights.remote(), cfg, "the learner (publishing weights)")
        replay_stats = call(replay.stats.remote(), cfg, "the replay actor")
        now = time.perf_counter()
        wall_s, learner_s = now - t_step, metrics.pop("time/step_s")
        record = {"step": step, **metrics, "policy_version": version, **replay_stats,
                  "replay/size": replay_stats["replay/fresh_size"] + replay_stats["replay/reservoir_size"],
                  "replay/substituted_step": replay_stats["replay/substituted"] - last_record.get(
                      "replay/substituted", substituted_before),
                  **window.metrics(wall_s, len(slots)), "time/step_s": wall_s, "time/learner_s": learner_s,
                  "idle/learner_frac": max(0.0, 1.0 - learner_s / wall_s), "learner/groups": gps}
        ray_metrics.publish(record, window.per_generator(wall_s, len(slots)))
        t_step, window, last_record = now, StepWindow(), record
        metrics_log.write(record)
        progress.update(record)

    def on_signal(signum, frame):
        raise RunStopped(signal.Signals(signum).name)

    previous_handler = signal.signal(signal.SIGTERM, on_signal)
    try:
        while step < cfg.learner.max_steps:
            # Admission: launch generation on idle actors while the staleness bound admits more prompts.
            replay_stats = call(replay.stats.remote(), cfg, "the replay actor")
            ahead = int(replay_stats["replay/fresh_size"]) + sum(s.prompts for s in slots)
            lag = int(replay_stats["replay/sampled"] - sampled_before >= (steps_here + 1) * gps)
            budget = (cfg.replay.max_staleness + 1 - lag) * gps - ahead
            for s in slots:
                n = min(prompts_per_request, budget)
                if s.future is not None or n <= 0:
                    continue
                if s.version != version:
                    s.sync_future = s.handle.update_weights.remote(weights[0], version)
                    s.version = version
                s.future, s.prompts = s.handle.generate.remote(stream.next_batch(n)), n
                budget -= n
            if starved and not any(s.future for s in slots):
                raise RuntimeError(
                    f"the learner needs {gps} groups, the replay actor holds {replay_stats['replay/fresh_size']:g} "
                    "usable ones and the staleness bound admits no new generation; this is a bug, please report it")
            if learner_future is None:
                learner_future = learner.train_step.remote(pull_s)

            pending = [learner_future] + [s.future for s in slots if s.future is not None]
            ready, _ = ray.wait(pending, num_returns=1, timeout=c.timeout_s)
            if not ready:
                raise RuntimeError(f"no actor finished work within cluster.timeout_s={c.timeout_s:g} s")

            for s in slots:
                if s.future is not None and s.future in ready:
                    window.add(s.index, call(s.future, cfg, f"rlfleet-generator-{s.index}"))
                    if s.sync_future is not None:
                        window.sync_s.append(call(s.sync_future, cfg, f"rlfleet-generator-{s.index}"))
                        s.sync_future = None
                    s.future, s.prompts = None, 0

            if learner_future in ready:
                metrics = call(learner_future, cfg, "the learner")
                learner_future = None
                starved = metrics is None and not any(s.future for s in slots)
                if metrics is None:  # waited pull_s for a batch: admission runs again with fresh replay stats
                    continue
                finish_step(metrics)
                if step % cfg.checkpoint.save_steps == 0 and step < cfg.learner.max_steps:
                    save(step)
    except (KeyboardInterrupt, RunStopped) as stop:
        print(f"\nrlfleet: stopping ({type(stop).__name__}); writing a final checkpoint", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    # -- 4. final checkpoint, plot, shutdown -----------------------------------------------------------------
    try:
        if learner_future is not None:  # a step in flight changes the weights: count it before saving
            metrics = call(learner_future, cfg, "the learner")
            if metrics is not None:
                finish_step(metrics)
        final = save(step)
        records = metrics_log.read()
        png = plot(records, out / "reward.png") if cfg.logging.plot else None
        summary = {"step": step, "checkpoint": str(final), "metrics": str(metrics_log.path),
                   "plot": str(png) if png else None, "last": last_record}
        (out / "summary.json").write_text(json.dumps(summary, default=str, indent=2))
        print(f"rlfleet: done at step {step}; checkpoint {final}", flush=True)
        return summary
    finally:
        for handle in [learner, replay] + [s.handle for s in slots]:
            ray.kill(handle, no_restart=True)
        placement.release()
        if started_here:
            ray.shutdown()
