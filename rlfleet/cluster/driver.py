"""The driver of ``rlfleet train``: the program that ``ray job submit`` runs.

Phases, top to bottom:
1. validate everything that can be checked without actors (config is already valid; model, data, reward and filter
   functions here), write the resolved ``config.json``;
2. connect to Ray, reserve every actor's resources in one placement group, start the replay, learner and
   generation actors; restore the latest checkpoint when resuming; broadcast the initial weights;
3. the loop: keep generation requests in flight on every generator, as far as the staleness bound admits, and one
   learner step in flight; each step ends with the new weights published (one object ref); record metrics;
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
The learner's next step is launched before admission runs, so the learner never waits for the driver's calls; it
may take its batch just after the replay snapshot that admission reads, and the bound still holds: counting those
groups in ``ahead`` with ``lag`` 0 gives the same inequality as leaving them out with ``lag`` 1.

Bulk data never passes through here: groups go generator -> replay, batches replay -> learner, weights learner ->
object store -> generators. The driver moves prompts, object refs, versions and small metric dicts.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from contextlib import contextmanager
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
    records: list[dict] = field(default_factory=list)  # its prompts
    sync_future: ray.ObjectRef | None = None  # the update_weights() queued before it
    restart: ray.ObjectRef | None = None  # ready() of an actor Ray is restarting
    retired: bool = False  # died for good (restarts used up)

    @property
    def prompts(self) -> int:
        return len(self.records)


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
            "gen/active_generators": sum(1 for t in self.tokens.values() if t > 0),
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
    from rlfleet.generation.generator import prompt_token_ids, resolve_reward_funcs
    from rlfleet.generation.scoring import BUILTIN_GROUP_FILTERS, resolve_function
    from rlfleet.data import load_prompt_dataset
    from rlfleet.models import load_tokenizer, resolve_model_path

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
    if dataset is not None and not problems:
        problems += long_prompts(cfg, dataset, load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code),
                                 prompt_token_ids)
    if problems:
        raise ConfigError(problems)
    return dataset


def long_prompts(cfg: RLFleetConfig, dataset, tokenizer, encode, sample: int = 2000) -> list[str]:
    """The first prompt (of the first ``sample``) that leaves no room for a full completion, as a problem."""
    room = cfg.model.max_model_len - cfg.generation.max_completion_length
    for i, prompt in enumerate(dataset.select(range(min(len(dataset), sample)))["prompt"]):
        n = len(encode(tokenizer, prompt))
        if n > room:
            return [f"data.dataset: prompt {i} has {n} tokens, more than model.max_model_len "
                    f"({cfg.model.max_model_len}) - generation.max_completion_length "
                    f"({cfg.generation.max_completion_length}) = {room}; raise model.max_model_len, lower "
                    "generation.max_completion_length, or filter out long prompts"]
    return []


STOP_POLL_S = 0.5  # how soon a wait inside stop_on_sigterm notices a stop request


_stop_requested = threading.Event()


@contextmanager
def stop_on_sigterm():
    """Within the block, SIGTERM (``ray job stop``) and SIGINT (Ctrl-C) request a stop: the next :func:`call` or
    :func:`wait_any`, within ``STOP_POLL_S``, raises :class:`RunStopped`, so the run can write a final checkpoint.

    The handler only sets a flag. Raising from it, as Python's default SIGINT handler does, lands the exception in the
    middle of Ray's Cython ``ray.wait`` / ``ray.get``, which then fails with ``SystemError: ... returned a result
    with an exception set`` instead of the exception, and the run dies without its checkpoint. Signals reach the main
    thread only: elsewhere (a run started from a thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        _stop_requested.set()

    _stop_requested.clear()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_requested.clear()


def _check_stop() -> None:
    if _stop_requested.is_set():
        raise RunStopped("stop requested (SIGTERM or SIGINT)")


class ActorLost(RuntimeError):
    """The learner or the replay actor died: the run restarts its actors from the latest checkpoint."""


def call(ref, cfg: RLFleetConfig, what: str):
    """ray.get with the configured timeout and an error that names the actor; inside :func:`stop_on_sigterm` it
    raises :class:`RunStopped` soon after a stop request."""
    deadline = time.monotonic() + cfg.cluster.timeout_s
    while True:
        _check_stop()
        try:
            return ray.get(ref, timeout=min(STOP_POLL_S, max(deadline - time.monotonic(), 0.0)))
        except ray.exceptions.GetTimeoutError:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{what} did not answer within cluster.timeout_s={cfg.cluster.timeout_s:g} s") \
                    from None
        except ray.exceptions.RayActorError as err:
            raise ActorLost(f"{what} died: {err}") from err


def wait_any(refs: list[ray.ObjectRef], timeout_s: float) -> list[ray.ObjectRef]:
    """The refs of ``refs`` that are ready, as soon as one is (empty after ``timeout_s``); inside
    :func:`stop_on_sigterm` it raises :class:`RunStopped` soon after a stop request."""
    deadline = time.monotonic() + timeout_s
    while True:
        _check_stop()
        ready, _ = ray.wait(refs, num_returns=1, timeout=min(STOP_POLL_S, max(deadline - time.monotonic(), 0.0)))
        if ready or time.monotonic() >= deadline:
            return ready


def train(cfg: RLFleetConfig) -> dict:
    """Run ``rlfleet train``. Returns a small summary (last metrics, output paths).

    If the learner or the replay actor dies, every actor is recreated from the latest checkpoint (up to
    ``cluster.max_restarts`` times); a dead generation actor is restarted by Ray and handled inside the run.
    """
    dataset = preflight(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(dump_config(cfg))
    where = connect(cfg.cluster)
    placement = reserve(cfg.cluster)
    resume = cfg.checkpoint.resume
    if resume and ckpt.latest_checkpoint(out) is None:
        print(f"rlfleet: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
    recoveries = 0
    try:
        while True:
            run = TrainingRun(cfg, dataset, placement, recoveries)
            try:
                run.start(ckpt.latest_checkpoint(out) if resume else None)
                print(f"rlfleet: training on {where}: {cfg.cluster.num_generators} generator(s), output in {out}",
                      flush=True)
                return run.run()
            except ActorLost as err:
                recoveries += 1
                if recoveries > cfg.cluster.max_restarts:
                    raise RuntimeError(
                        f"{err}; gave up after {cfg.cluster.max_restarts} recoveries (cluster.max_restarts). Resume "
                        f"with: rlfleet train <job.yaml> --resume (output_dir={out})") from err
                print(f"rlfleet: {err}; recovery {recoveries}: restarting the actors from the latest checkpoint",
                      flush=True)
                resume = True
            finally:
                run.kill_actors()
    finally:
        placement.release()
        if where.startswith("local"):
            ray.shutdown()


class TrainingRun:
    """One life of the run's actors: start (or restore), the loop, the final checkpoint."""

    def __init__(self, cfg: RLFleetConfig, dataset, placement, recoveries: int = 0):
        from rlfleet.generation.actor import make_generation_actor
        from rlfleet.data import PromptStream
        from rlfleet.learner.actor import make_learner_actor
        from rlfleet.replay.actor import make_replay_actor

        self.cfg, c = cfg, cfg.cluster
        self.out = Path(cfg.output_dir)
        self.replay = make_replay_actor(cfg.replay, cfg.seed, name=None, num_cpus=0)
        self.learner = make_learner_actor(cfg, self.replay, num_cpus=c.learner_num_cpus,
                                          num_gpus=c.learner_num_gpus, name="rlfleet-learner", **placement.learner())
        self.slots = [GenSlot(i, make_generation_actor(
            cfg, self.replay, i, num_cpus=c.generator_num_cpus, num_gpus=c.generator_num_gpus,
            name=f"rlfleet-generator-{i}", max_restarts=c.max_restarts, **placement.generator(i)))
            for i in range(c.num_generators)]
        self.stream = PromptStream(dataset, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.retry: list[dict] = []  # prompts whose generator died before delivering: issued again first
        self.faults = {"faults/generator_restarts": 0, "faults/lost_groups": 0, "faults/recoveries": recoveries}
        self.groups_attempted = self.groups_failed = 0

    def start(self, resume_from: Path | None) -> None:
        """Restore the checkpoint (if any), wait for the engines, publish the first weights."""
        cfg = self.cfg
        self.step = 0
        if resume_from is not None:
            replay_state, driver_state = ckpt.read_state(resume_from)
            call(self.learner.load.remote(str(resume_from / "policy")), cfg, "the learner (loading a checkpoint)")
            call(self.replay.load_state_dict.remote(*replay_state), cfg, "the replay actor (loading a checkpoint)")
            self.stream.load_state_dict(driver_state["stream"])
            self.retry = driver_state.get("retry", [])
            self.step = driver_state["step"]
            print(f"rlfleet: resumed from {resume_from} at step {self.step}", flush=True)
        call([s.handle.ready.remote() for s in self.slots], cfg, "the generation actors (starting their engines)")
        self.metrics_log = MetricsLog(self.out, resume_step=self.step if resume_from else None)
        self.progress = Progress(cfg.learner.max_steps, cfg.logging.progress, cfg.logging.log_every, start=self.step)
        self.ray_metrics = RayMetrics(self.out.resolve().name)

        self.weights, self.version = call(self.learner.publish_weights.remote(), cfg, "the learner (publishing)")
        stats = call(self.replay.stats.remote(), cfg, "the replay actor")
        self.sampled_before, self.substituted_before = stats["replay/sampled"], stats["replay/substituted"]
        self.steps_here = 0
        self.learner_future: ray.ObjectRef | None = None  # the train_step in flight
        self.window, self.last_record, self.t_step = StepWindow(), {}, time.perf_counter()

    # -- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        with stop_on_sigterm():
            try:
                self.loop()
            except RunStopped as stop:
                print(f"\nrlfleet: stopping ({stop}); writing a final checkpoint", flush=True)
        if self.learner_future is not None:  # a step in flight changes the weights: count it before saving
            result = call(self.learner_future, self.cfg, "the learner")
            if result is not None:
                self.finish_step(*result)
        final = self.save()
        records = self.metrics_log.read()
        png = plot(records, self.out / "reward.png") if self.cfg.logging.plot else None
        summary = {"step": self.step, "checkpoint": str(final), "metrics": str(self.metrics_log.path),
                   "plot": str(png) if png else None, "last": self.last_record}
        (self.out / "summary.json").write_text(json.dumps(summary, default=str, indent=2))
        print(f"rlfleet: done at step {self.step}; checkpoint {final}", flush=True)
        return summary

    def loop(self) -> None:
        """Keep generation and one learner step in flight until max_steps; checkpoint every save_steps."""
        cfg, gps = self.cfg, self.cfg.learner.groups_per_step
        pull_s = min(cfg.cluster.timeout_s, 5.0)  # the learner returns None after this long: the driver stays in charge
        starved = False
        while self.step < cfg.learner.max_steps:
            if self.learner_future is None:  # first, so the learner never waits for admission's calls
                self.learner_future = self.learner.train_step.remote(pull_s)
            launched = self.admit()
            if starved and not launched and not self.busy():
                raise RuntimeError(f"the learner needs {gps} groups and the staleness bound admits no new "
                                   "generation; this is a bug, please report it")

            pending = [self.learner_future] + [f for s in self.slots for f in (s.future, s.restart) if f is not None]
            ready = wait_any(pending, cfg.cluster.timeout_s)
            if not ready:
                raise RuntimeError(f"no actor finished work within cluster.timeout_s={cfg.cluster.timeout_s:g} s")
            for s in self.slots:
                if s.future is not None and s.future in ready:
                    self.collect(s)
                if s.restart is not None and s.restart in ready:
                    self.restarted(s)
            if self.learner_future in ready:
                result = call(self.learner_future, cfg, "the learner")
                self.learner_future = None
                starved = result is None and not self.busy()
                if result is None:  # waited pull_s for a batch: admission runs again with fresh replay stats
                    continue
                self.finish_step(*result)
                if self.step % cfg.checkpoint.save_steps == 0 and self.step < cfg.learner.max_steps:
                    self.save()

    def busy(self) -> bool:
        """Some generator is generating, or being restarted by Ray."""
        return any(s.future is not None or s.restart is not None for s in self.slots)

    def admit(self) -> int:
        """Launch generation on idle actors as far as the staleness bound admits (see the module docstring)."""
        cfg, gps = self.cfg, self.cfg.learner.groups_per_step
        stats = call(self.replay.stats.remote(), cfg, "the replay actor")
        ahead = int(stats["replay/fresh_size"]) + sum(s.prompts for s in self.slots)
        lag = int(stats["replay/sampled"] - self.sampled_before >= (self.steps_here + 1) * gps)
        budget = (cfg.replay.max_staleness + 1 - lag) * gps - ahead
        per_request = cfg.generation.generation_batch_size // cfg.generation.num_generations
        launched = 0
        for s in self.slots:
            n = min(per_request, budget)
            if s.future is not None or s.restart is not None or s.retired or n <= 0:
                continue
            if s.version != self.version:  # runs before generate(): actor methods execute in order
                s.sync_future = s.handle.update_weights.remote(self.weights[0], self.version)
                s.version = self.version
            records, self.retry = self.retry[:n], self.retry[n:]
            records += self.stream.next_batch(n - len(records))
            s.future, s.records = s.handle.generate.remote(records), records
            budget, launched = budget - n, launched + n
        return launched

    def collect(self, s: GenSlot) -> None:
        """A generate() finished: add its stats, or, if the actor died, re-issue its prompts."""
        try:
            stats = ray.get(s.future, timeout=self.cfg.cluster.timeout_s)
            if s.sync_future is not None:
                self.window.sync_s.append(ray.get(s.sync_future, timeout=self.cfg.cluster.timeout_s))
        except ray.exceptions.RayActorError as err:
            # Ray restarts the actor (cluster.max_restarts) with the initial weights; it gets the current ones
            # before it generates again. Groups it delivered before dying stay in the replay actor.
            self.faults["faults/generator_restarts"] += 1
            self.faults["faults/lost_groups"] += len(s.records)
            self.retry.extend(s.records)
            s.version = -1
            # ready() retried until the restarted actor answers; ActorDiedError once its restarts are used up
            s.restart = s.handle.ready.options(max_task_retries=-1).remote()
            print(f"rlfleet: rlfleet-generator-{s.index} died ({type(err).__name__}); its prompts are re-issued "
                  "once Ray has restarted it", flush=True)
        else:
            if stats.get("policy_version", s.version) != s.version:  # restarted while idle: initial weights again
                self.faults["faults/generator_restarts"] += 1
                s.version = -1  # current weights go out before its next request
            self.window.add(s.index, stats)
            self.check_reward_errors(stats)
        s.future, s.sync_future, s.records = None, None, []

    def restarted(self, s: GenSlot) -> None:
        """Ray restarted a generation actor (it is admitted again), or gave up on it (it is retired)."""
        try:
            ray.get(s.restart, timeout=self.cfg.cluster.timeout_s)
        except ray.exceptions.RayActorError as err:
            s.retired = True
            print(f"rlfleet: rlfleet-generator-{s.index} is gone for good ({type(err).__name__})", flush=True)
            if all(x.retired for x in self.slots):
                raise RuntimeError("every generation actor died more than cluster.max_restarts times") from err
        s.restart = None

    def check_reward_errors(self, stats: dict) -> None:
        """Stop when reward / filter functions fail on more than algorithm.max_reward_error_frac of the groups."""
        self.groups_attempted += int(stats.get("gen/groups", 0) + stats.get("errors/reward", 0))
        self.groups_failed += int(stats.get("errors/reward", 0))
        limit = self.cfg.algorithm.max_reward_error_frac
        if self.groups_attempted >= 16 and self.groups_failed > limit * self.groups_attempted:
            raise RuntimeError(
                f"reward or group-filter functions failed on {self.groups_failed} of {self.groups_attempted} groups "
                f"(more than algorithm.max_reward_error_frac={limit:g}); the generator logs name the function and "
                "its error. Fix the function, or raise the limit")

    def finish_step(self, metrics: dict, weights: list[ray.ObjectRef], version: int) -> None:
        """Record a finished learner step; ``weights`` (its published state dict) go to each generator at its next
        request."""
        cfg, gps = self.cfg, self.cfg.learner.groups_per_step
        self.step, self.steps_here = self.step + 1, self.steps_here + 1
        self.weights, self.version = weights, version
        stats = call(self.replay.stats.remote(), cfg, "the replay actor")
        now = time.perf_counter()
        wall_s, learner_s = now - self.t_step, metrics.pop("time/step_s")
        substituted_last = self.last_record.get("replay/substituted", self.substituted_before)
        record = {"step": self.step, **metrics, "policy_version": self.version, **stats,
                  "replay/size": stats["replay/fresh_size"] + stats["replay/reservoir_size"],
                  "replay/substituted_step": stats["replay/substituted"] - substituted_last,
                  **self.window.metrics(wall_s, len(self.slots)), **self.faults,
                  "time/step_s": wall_s, "time/learner_s": learner_s,
                  "idle/learner_frac": max(0.0, 1.0 - learner_s / wall_s), "learner/groups": gps}
        self.ray_metrics.publish(record, self.window.per_generator(wall_s, len(self.slots)))
        self.t_step, self.window, self.last_record = now, StepWindow(), record
        self.metrics_log.write(record)
        self.progress.update(record)

    def save(self) -> Path:
        """Checkpoint at the current step. Generation is quiesced first, so the replay buffer and the prompt cursor
        describe the same moment (prompts of a generator that died are put back in front of the cursor)."""
        for s in self.slots:
            if s.future is not None:
                self.collect(s)
        cfg, staging = self.cfg, ckpt.staging_dir(self.out, self.step)
        call(self.learner.save.remote(str(staging / "policy")), cfg, "the learner (saving)")
        replay_state = call(self.replay.state_dict.remote(), cfg, "the replay actor (saving)")
        stream_state = self.stream.state_dict()
        ckpt.write_state(staging, replay_state, {"step": self.step, "policy_version": self.version,
                                                 "stream": stream_state, "retry": self.retry})
        return ckpt.commit(staging, self.step, cfg.checkpoint.keep_last)

    def kill_actors(self) -> None:
        for handle in [self.learner, self.replay] + [s.handle for s in self.slots]:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already gone
                pass
