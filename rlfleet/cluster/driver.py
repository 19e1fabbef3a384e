"""``rlfleet train``: the RL job, the program that ``ray job submit`` runs.

The job lifecycle (connect, restore, stop signals, recovery, final checkpoint) is
:func:`rlfleet.cluster.lifecycle.run_job`'s; this module supplies what is particular to RL training:

1. :func:`~rlfleet.cluster.preflight.preflight` (everything that can be checked without actors), then the resolved
   ``config.json``;
2. :class:`RLJob`: the replay actor, the learner (in a placement group of its own), the
   :class:`~rlfleet.cluster.pool.GeneratorPool` (started once ``num_generators``' min are running; it grows and
   shrinks while the job runs), and the ``rlfleet-control`` actor that ``rlfleet scale`` talks to;
3. its loop: one learner step in flight, generation requests on every idle generator as far as
   :func:`~rlfleet.cluster.admission.admission_budget` admits, evaluations
   (:class:`~rlfleet.cluster.evaluations.Evaluations`), operator requests; each step ends with the new weights
   published through the transport; metrics; a checkpoint every ``save_steps``.

The loop's only waits are for work: admission counts live groups in a ledger
(:class:`~rlfleet.cluster.admission.LiveGroups`) fed by the events the driver already receives (requests, the
generators' results with the replay actor's ack, the learner's result with the stats its pull left), and the step's
record takes the replay actor's figures from the newest of them. ``driver/round_trips`` counts the calls whose
answer it does wait for (the node table once a step; the replay actor only after a learner found no batch).

Accounting. The learner reports the prompts of every batch it trained (``batches.jsonl``); the pool re-issues the
prompts of a generator that died before delivering, first. A checkpoint is taken with no request in flight, so the
stream's cursor, the prompts waiting to be re-issued and the replay buffer describe one moment: every prompt the
stream handed out is trained, queued in the replay actor, waiting to be re-issued, or counted as dropped.

Bulk data never passes through here: groups go generator -> replay, batches replay -> learner, weights learner ->
generators by the transport. The driver moves prompts, weight handles, versions and small metric dicts.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.admission import LiveGroups, admission_budget
from rlfleet.cluster.evaluations import Evaluations
from rlfleet.cluster.learners import LearnerGroup
from rlfleet.cluster.lifecycle import RunStopped, call, kill, run_job, wait_any
from rlfleet.cluster.metrics import console, fmt, plot, rl_series, warn
from rlfleet.cluster.pool import GeneratorPool
from rlfleet.cluster.preflight import preflight
from rlfleet.cluster.records import StepRecords
from rlfleet.cluster.run_lock import hold_output_dir
from rlfleet.cluster.runtime import fleet_size, generator_bundle, learner_bundles, reserve
from rlfleet.config import RLFleetConfig, dump_config
from rlfleet.errors import RunFailed

log = logging.getLogger("rlfleet")
REPLAY_NAME = "rlfleet-replay"


def train(cfg: RLFleetConfig, engine_factory=None) -> dict:
    """Run ``rlfleet train``. Returns a small summary (last metrics, output paths). ``engine_factory`` replaces the
    vLLM engine in every generation actor (benchmarks: :mod:`bench.standin`). The run holds ``output_dir``'s lock
    (:mod:`~rlfleet.cluster.run_lock`) from before its checks to its end."""
    with hold_output_dir(cfg.output_dir, RLJob.command):
        dataset, eval_dataset = preflight(cfg)
        (Path(cfg.output_dir) / "config.json").write_text(dump_config(cfg))
        return run_job(cfg, lambda recoveries, control: RLJob(cfg, dataset, control, recoveries, engine_factory,
                                                              eval_dataset),
                       cfg.cluster.min_generators, with_reference=cfg.algorithm.keeps_reference)


class RLJob:
    """One life of the RL job's actors: start (or restore), the loop, the final checkpoint (see :class:`Job`)."""

    label, command, phase = "rlfleet", "rlfleet train", "starting the actors"

    def __init__(self, cfg: RLFleetConfig, dataset, control, recoveries: int = 0, engine_factory=None,
                 eval_dataset=None):
        self.cfg, self.dataset, self.control, self.engine_factory = cfg, dataset, control, engine_factory
        self.eval_dataset = eval_dataset
        self.out = Path(cfg.output_dir)
        self.recoveries = recoveries
        self.replay = self.learner = self.learner_placement = self.pool = self.records = None
        self.learner_future = None  # the train_step in flight

    def _timeout(self) -> float:
        return self.cfg.cluster.timeout_s

    def start(self, resume_from: Path | None) -> None:
        """Start the actors, restore the checkpoint (if any), wait for ``min`` generators, publish the weights."""
        from rlfleet.data import PromptStream
        from rlfleet.models import inflight_groups
        from rlfleet.generation.actor import STREAM, make_generation_actor, vllm_engine
        from rlfleet.dpo.online import online_dpo_learner
        from rlfleet.learner.actor import policy_learner
        from rlfleet.replay.actor import make_replay_actor

        cfg, c, t = self.cfg, self.cfg.cluster, self._timeout()
        self.phase = "placing the learner"
        self.replay = make_replay_actor(cfg.replay, cfg.seed, name=REPLAY_NAME, num_cpus=0)
        self.learner_placement = reserve(learner_bundles(c), "rlfleet-learner", timeout_s=min(t, 120.0))
        objective = online_dpo_learner if cfg.algorithm.name == "online_dpo" else policy_learner
        factory = self.engine_factory or vllm_engine
        actor, extra_args, placing = None, (), {}
        if c.colocate:  # the learner's ranks are the pool's members, in the learner's placement
            from rlfleet.cluster.colocated import SharedPlacement, colocated_actor_class

            actor, extra_args = colocated_actor_class(cfg), (factory,)
            placing = {"place": lambda bundle, name: SharedPlacement(self.learner_placement.group),
                       "colocated": True}
        self.learner = LearnerGroup(cfg, objective, REPLAY_NAME, "rlfleet-learner", self.learner_placement, actor,
                                    extra_args)

        def start_generator(index: int, options: dict):
            if c.colocate:  # member r is learner rank r
                return self.learner.ranks[index]
            return make_generation_actor(cfg, REPLAY_NAME, index, factory, **options)

        fleet = c.max_generators
        if fleet is None:  # cluster.num_generators: auto
            import ray

            total = ray.cluster_resources()
            fleet = fleet_size(c, total)
            console(f"cluster.num_generators auto: {fleet} generator(s) ({generator_bundle(c)} each) beside the "
                    f"learner ({learner_bundles(c)}) on the cluster's {total.get('CPU', 0):g} CPUs, "
                    f"{total.get('GPU', 0):g} GPUs")
        prompts, depth, stream = (cfg.generation.generation_batch_size // cfg.generation.num_generations,
                                  c.requests_per_generator, None)
        if cfg.generation.engine == "continuous":  # as many groups in flight as the engine keeps, in requests as
            prompts = depth = inflight_groups(cfg)  # large as the bound admits
            stream = STREAM
        self.pool = GeneratorPool(
            start_generator, generator_bundle(c), fleet, prompts, t, depth,
            # request order: the replay actor hears of lost requests from here (the call is ordered before any
            # later one of the driver's, a checkpoint's state_dict included)
            skip_requests=self.replay.skip.remote if cfg.replay.consume_order == "request" else None, stream=stream,
            fence_requests=lambda keys: call(self.replay.fence.remote(keys), t, "the replay actor (fencing the "
                                             "requests of a lost generator)"),
            forget_requests=self.replay.forget.remote, follow=cfg.replay.max_staleness <= 1,
            **placing)
        self.stream = PromptStream(self.dataset, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.step, errors_total = 0, {"reward": 0, "env": 0}
        if resume_from is not None:
            self.phase = f"restoring {resume_from}"
            replay_state, driver_state = ckpt.read_state(resume_from)
            self.learner.run("load", str(resume_from), what="the learner (loading a checkpoint)")
            call(self.replay.load_state_dict.remote(*replay_state), t, "the replay actor (loading a checkpoint)")
            self.stream.load_state_dict(driver_state["stream"])
            self.pool.retry = list(driver_state.get("retry", []))
            self.step = driver_state["step"]
            errors_total = {"reward": int(driver_state.get("reward_errors_total", 0)),
                            "env": int(driver_state.get("env_errors_total", 0))}
            console(f"resumed from {resume_from} at step {self.step}")
        self.phase = "starting the generation actors (placing them, loading their engines)"
        print(f"rlfleet: starting {c.min_generators} generation actor(s)"
              + (f", up to {fleet} as the cluster has room" if fleet > c.min_generators else ""),
              flush=True)
        self.pool.start(c.min_generators)
        self.phase = "publishing the first weights"
        self.weights = self.learner.run("publish_weights", self.pool.weight_group(), what="the learner (publishing)")
        stats = call(self.replay.stats.remote(), t, "the replay actor")
        # admission's count of live groups starts with those trained (one batch per version) and those queued
        self.pool.live = LiveGroups(self.weights.version * cfg.learner.groups_per_step, stats)
        series = rl_series(cfg.algorithm.kl_coef, multi_turn=cfg.algorithm.environment is not None,
                           online_dpo=cfg.algorithm.name == "online_dpo", evaluation=self.eval_dataset is not None)
        self.records = StepRecords(cfg, series, self.step if resume_from else None, stats)
        self.control_seen, self.control_future = 0, self.control.next_request.remote(0)  # any request so far
        self.groups_attempted = self.groups_failed = 0  # since the driver (re)started: the error-rate check
        self.errors_total = errors_total  # over the run, checkpointed (errors/reward_total, errors/env_total)
        self.driver_s: dict[str, float] = {}  # the driver's own seconds by phase (timed)
        self.round_trips = 0  # answers the loop waited for: ask() and the pool's node checks
        self.evaluations = Evaluations(cfg, self.eval_dataset)
        if resume_from is None:  # the baseline: the initial weights, step 0
            self.evaluations.after_step(0, self.weights)

    @property
    def version(self) -> int:
        return self.weights.version

    # -- the loop ----------------------------------------------------------------------------------------------

    def loop(self) -> None:
        """Keep generation and one learner step in flight until max_steps; checkpoint every save_steps."""
        cfg, t = self.cfg, self._timeout()
        pull_s = min(t, 5.0)  # the learner returns None after this long: the driver stays in charge
        waiting_said, nodes_checked = False, None  # the step at which the nodes were last checked
        while self.step < cfg.learner.max_steps:
            new_step = self.learner_future is None or nodes_checked != self.step
            if self.learner_future is None:  # first, so the learner never waits for admission's calls
                self.start_learner_step(pull_s)
            self.pool.reconcile(check_nodes=new_step)  # an idle generator's lost node is noticed once per step
            nodes_checked = self.step
            if not self.pool.members:
                raise RunFailed("every generation actor is gone (each died more than cluster.max_restarts "
                                   "times); see the generator logs")
            self.admit_all()
            if not self.pool.active() and not waiting_said:
                warn("no generation actor is running; waiting for the cluster to place one")
            waiting_said = not self.pool.active()

            ready = set(wait_any([self.learner_future, self.control_future, *self.pool.refs()], t))
            if not ready:
                raise RunFailed(f"no actor finished work within cluster.timeout_s={t:g} s")
            with self.timed("collect"):
                self.collect(self.pool.on_ready(ready))
            if self.control_future in ready:
                self.on_control()
            if self.learner_future in ready:
                result = self.learner.get(self.learner_future, "the learner")
                self.learner_future = None
                if result is None:  # no batch within pull_s: admission runs again with fresh replay stats
                    self.pool.live.heard(self.ask(self.replay.stats.remote(), "the replay actor"))
                    self.reach_new_members()
                    continue
                with self.timed("finish_step"):
                    end = self.advance(result)
                checkpoint = self.step % cfg.checkpoint.save_steps == 0 and self.step < cfg.learner.max_steps
                if not checkpoint and self.step < cfg.learner.max_steps:
                    # the next step and the requests the new weights admit go out before the step's record is
                    # written: at max_staleness 1 a request waits for the last publication, and the learner for
                    # that request, so the driver's bookkeeping would sit on both (not before a checkpoint, which
                    # needs the learner idle)
                    self.start_learner_step(pull_s)
                    self.admit_all()
                with self.timed("finish_step"):
                    self.record_step(result, end)
                if checkpoint:
                    self.save()
        self.finish_evaluations()

    def start_learner_step(self, pull_s: float) -> None:
        self.learner_future = self.learner.call("train_step", pull_s, self.pool.weight_group())

    def admit_all(self) -> None:
        """Evaluations first (one waits for no training request), then generation as far as the bound admits."""
        with self.timed("admit"):
            self.evaluations.dispatch(self.pool)
            self.admit()

    def collect(self, finished: list[tuple[int, dict]]) -> None:
        """Finished requests: a generation's stats go to the step's window, an evaluation's to its own record."""
        for index, stats in finished:
            if "eval/step" in stats:
                self.record_evaluation(stats)
            else:
                self.records.window.add(index, stats)
                self.check_reward_errors(stats)
        self.evaluations.requeue(self.pool)

    def record_evaluation(self, stats: dict) -> None:
        """An evaluation's record: a line of its own in metrics.jsonl (``step``: the learner step whose weights
        were evaluated), the Ray series, the loggers, one console line."""
        step = int(stats.pop("eval/step"))
        stats.pop("sync/seconds", None)  # the weights load before it: not a training step's
        record = {"step": step, **stats}
        self.records.outputs.write(record)
        self.evaluations.done(record)
        console(f"eval at step {step}: reward {fmt(record.get('eval/reward/mean'), 3)} on "
                f"{int(record['eval/prompts'])} {self.evaluations.prompts}")

    def finish_evaluations(self) -> None:
        """Wait for the evaluations still queued or running (the last step's at least), serving them first;
        generation requests still in flight are collected meanwhile."""
        t = self._timeout()
        while self.evaluations.outstanding(self.pool):
            self.evaluations.dispatch(self.pool)
            self.pool.reconcile()
            if not self.pool.members:
                raise RunFailed("every generation actor is gone before the last evaluation; see the generator logs")
            ready = set(wait_any(self.pool.refs(), t))
            if not ready:
                raise RunFailed(f"no generation actor finished work within cluster.timeout_s={t:g} s (waiting for "
                                "the last evaluation)")
            self.collect(self.pool.on_ready(ready))

    def ask(self, ref, what: str):
        """A call to another actor whose answer the loop waits for: counted (``driver/round_trips``)."""
        self.round_trips += 1
        return call(ref, self._timeout(), what)

    @contextmanager
    def timed(self, phase: str):
        """Adds the block's seconds to the driver's own time in ``phase`` (``time/driver/<phase>_s`` in each
        record, cumulative: bench/orchestration_scale.py reads the driver's share of a step from it)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.driver_s[phase] = self.driver_s.get(phase, 0.0) + time.perf_counter() - start

    def admit(self) -> int:
        """Launch generation on idle generators as far as the staleness bound admits, with the pool's count of live
        groups (:class:`~rlfleet.cluster.admission.LiveGroups`: no call to the replay actor)."""
        cfg, live, g = self.cfg, self.pool.live.count, self.cfg.learner.groups_per_step
        if cfg.replay.staleness_unit == "token":
            # the window counts settled groups, two batches at most; each generator's max_inflight_groups caps
            # those generating (admission.py, "The token unit")
            settled, window = live - self.pool.generating(), min(cfg.replay.max_staleness, 1)

            def budget(version: int, oldest: int | None, launched: int) -> int:
                return admission_budget(version, None, settled, g, window)
        else:
            def budget(version: int, oldest: int | None, launched: int) -> int:
                return admission_budget(version, oldest, live + launched, g, cfg.replay.max_staleness)
        return self.pool.dispatch(self.weights, budget, self.stream.next_batch)

    def reach_new_members(self) -> None:
        """With a transport that has a membership (broadcast), active generators the last publication did not
        reach (joined or restarted since) get nothing to do until one does; while no batch comes (they may be the
        ones to generate it), the current weights are published again to the group as it is now."""
        if any(not self.weights.reaches(key) for key in self.pool.weight_group()):
            self.round_trips += 1
            self.weights = self.learner.run("publish_weights", self.pool.weight_group(),
                                            what="the learner (publishing to the generators that joined)")

    def on_control(self) -> None:
        """An operator's request through the rlfleet-control actor (``rlfleet scale``, a stop)."""
        self.control_seen, request = call(self.control_future, self._timeout(), "the rlfleet-control actor")
        self.control_future = self.control.next_request.remote(self.control_seen)
        if "generators" in request and request["generators"] != self.pool.target and self.cfg.cluster.colocate:
            warn(f"rlfleet scale {request['generators']}: a colocated job (cluster.colocate) has one engine, in its "
                 "learner; the fleet stays at 1")
        elif "generators" in request and request["generators"] != self.pool.target:
            print(f"rlfleet: scaling the fleet to {request['generators']} generator(s) (was {self.pool.target})",
                  flush=True)
            self.pool.scale(request["generators"])
        if request.get("stop"):
            raise RunStopped("stop requested through rlfleet-control")

    def check_reward_errors(self, stats: dict) -> None:
        """Stop when reward / filter functions or the environment fail on more than
        algorithm.max_reward_error_frac of the groups."""
        failed = {kind: int(stats.get(f"errors/{kind}", 0)) for kind in ("reward", "env")}
        self.groups_attempted += int(stats.get("gen/groups", 0)) + sum(failed.values())
        self.groups_failed += sum(failed.values())
        for kind, n in failed.items():
            if n and not self.errors_total[kind]:  # the first of the run stands out; then errors/* count them
                what = "the environment" if kind == "env" else "a reward or group-filter function"
                warn(f"{n} group(s) dropped: {what} failed (the generator's log line above names it and the error); "
                     f"errors/{kind} counts such groups at every step")
            self.errors_total[kind] += n
        limit = self.cfg.algorithm.max_reward_error_frac
        if self.groups_attempted >= 16 and self.groups_failed > limit * self.groups_attempted:
            env = self.cfg.algorithm.environment is not None
            raise RunFailed(
                f"reward or group-filter functions{' or the environment' if env else ''} failed on "
                f"{self.groups_failed} of {self.groups_attempted} groups (more than "
                f"algorithm.max_reward_error_frac={limit:g}"
                + (f"; the environment: {self.errors_total['env']} in the run" if env else "")
                + "); the generator logs name the function and its error. Fix the function"
                + (" or the environment" if env else "") + ", or raise the limit")

    def advance(self, result) -> float:
        """A learner step finished: its weights go to each generator before its next request, its evaluation is
        queued, the replay actor's stats its pull brought count for admission. Returns the time it ended."""
        self.step += 1
        self.weights = result.weights
        self.pool.live.heard(result.replay_stats)
        self.evaluations.after_step(self.step, self.weights)
        return time.perf_counter()

    def record_step(self, result, now: float) -> None:
        """The finished step's record (:class:`~rlfleet.cluster.records.StepRecords`) with the job's counters, and
        its report to ``rlfleet scale``. The replay actor's figures are the newest heard (the step's pull, or a
        generator's ack since)."""
        replay = {k: v for k, v in self.pool.live.latest.items() if k != "replay/seq"}
        generators = [m.index for m in self.pool.active()]
        job = {**self.pool.counts, "errors/reward_total": self.errors_total["reward"],
               **({"errors/env_total": self.errors_total["env"]} if self.cfg.algorithm.environment else {}),
               "faults/recoveries": self.recoveries, "fleet/generators": len(generators),
               **{f"gen/requests/{i}": n for i, n in self.pool.requests_by_generator.items()},
               **{f"time/driver/{phase}_s": sec for phase, sec in self.driver_s.items()},
               "driver/round_trips": self.round_trips + self.pool.node_queries}
        self.records.write(self.step, self.version, result, replay, generators, job, now)
        self.control.report.remote({"step": self.step, "generators": len(generators), "target": self.pool.target,
                                    "fleet/added": self.pool.counts["fleet/added"],
                                    "fleet/removed": self.pool.counts["fleet/removed"]})

    # -- the end -----------------------------------------------------------------------------------------------

    def settle(self) -> None:
        """A step in flight changes the weights: count it before the final checkpoint."""
        if self.learner_future is not None:
            result = self.learner.get(self.learner_future, "the learner")
            self.learner_future = None
            if result is not None:
                self.record_step(result, self.advance(result))

    def save(self) -> Path:
        """Checkpoint at the current step. Generation is quiesced first, so the replay buffer, the prompt cursor and
        the prompts to re-issue describe the same moment."""
        self.collect(self.pool.quiesce())
        t, staging = self._timeout(), ckpt.staging_dir(self.out, self.step)
        self.learner.run("save", str(staging), what="the learner (saving)")
        replay_state = call(self.replay.state_dict.remote(), t, "the replay actor (saving)")
        ckpt.write_state(staging, replay_state, {"step": self.step, "policy_version": self.version,
                                                 "stream": self.stream.state_dict(), "retry": self.pool.retry,
                                                 "reward_errors_total": self.errors_total["reward"],
                                                 "env_errors_total": self.errors_total["env"]})
        return ckpt.commit(staging, self.step, self.cfg.checkpoint.keep_last)

    def finish(self, final: Path) -> dict:
        records = self.records.outputs.log.read()
        keys = ("reward/mean", "loss") + (("eval/reward/mean",) if self.eval_dataset is not None else ())
        png = plot(records, self.out / "reward.png", keys) if self.cfg.logging.plot else None
        merged = bema = None
        if self.cfg.algorithm.name == "online_dpo" and self.cfg.dpo.bema is not None:
            bema = self.out / "bema"
            self.learner.run("save_bema", str(bema), what="the learner (saving the BEMA weights)")
        if self.cfg.model.lora is not None and self.cfg.model.lora.save_merged:
            merged = self.out / "merged"
            self.learner.run("save_merged", str(merged), what="the learner (saving the merged model)")
        summary = {"step": self.step, "checkpoint": str(final), "metrics": str(self.records.outputs.log.path),
                   "plot": str(png) if png else None, "merged": str(merged) if merged else None,
                   "bema": str(bema) if bema else None,
                   "last": self.records.last}
        (self.out / "summary.json").write_text(json.dumps(summary, default=str, indent=2))
        console(f"done at step {self.step}; checkpoint {final}")
        return summary

    def teardown(self) -> None:
        if self.records is not None:
            self.records.close()
        if self.pool is not None:
            self.pool.shutdown()
        if self.learner is not None:
            self.learner.kill()
        kill(self.replay)
        if self.learner_placement is not None:
            self.learner_placement.release()
