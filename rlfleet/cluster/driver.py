"""``rlfleet train``: the RL job, the program that ``ray job submit`` runs.

The job lifecycle (connect, restore, stop signals, recovery, final checkpoint) is
:func:`rlfleet.cluster.lifecycle.run_job`'s; this module supplies what is particular to RL training:

1. preflight: everything that can be checked without actors (model, data, reward and filter functions, prompt
   lengths), then the resolved ``config.json``;
2. :class:`RLJob`: the replay actor, the learner (in a placement group of its own), the
   :class:`~rlfleet.cluster.pool.GeneratorPool` (started once ``num_generators``' min are running; it grows and
   shrinks while the job runs), and the ``rlfleet-control`` actor that ``rlfleet scale`` talks to;
3. its loop: one learner step in flight, generation requests on every idle generator as far as
   :func:`~rlfleet.cluster.admission.admission_budget` admits, operator requests; each step ends with the new
   weights published through the transport; metrics; a checkpoint every ``save_steps``.

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
from dataclasses import dataclass, field
from pathlib import Path

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.admission import admission_budget
from rlfleet.cluster.lifecycle import RunStopped, call, kill, run_job, wait_any
from rlfleet.cluster.metrics import (RL_GENERATOR_SERIES, MetricsLog, Progress, StepOutputs, fmt, console, plot,
                                    rl_series, warn)
from rlfleet.cluster.pool import GeneratorPool
from rlfleet.cluster.runtime import fleet_size, generator_bundle, learner_bundles, reserve
from rlfleet.config import ConfigError, RLFleetConfig, dump_config
from rlfleet.errors import RunFailed

log = logging.getLogger("rlfleet")
REPLAY_NAME = "rlfleet-replay"
REPLAY_DROPS = ("replay/dropped_stale", "replay/dropped_zero_variance", "replay/dropped_overflow")


@dataclass
class StepWindow:
    """Generation figures accumulated between two learner steps, per generator."""

    groups: int = 0
    reward_errors: int = 0
    env_errors: int = 0
    dropped: int = 0
    multi_turn: bool = False  # the job has an environment
    env_s: float = 0.0
    busy_s: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    sync_s: list[float] = field(default_factory=list)

    def add(self, index: int, stats: dict) -> None:
        self.groups += int(stats.get("gen/groups", 0))
        self.reward_errors += int(stats.get("errors/reward", 0))
        self.env_errors += int(stats.get("errors/env", 0))
        self.env_s += float(stats.get("env/seconds", 0.0))
        self.dropped += int(stats.get("gen/dropped_groups", 0))
        self.busy_s[index] = self.busy_s.get(index, 0.0) + float(stats.get("gen/seconds", 0.0))
        self.tokens[index] = self.tokens.get(index, 0) + int(stats.get("gen/tokens", 0))
        if "sync/seconds" in stats:
            self.sync_s.append(float(stats["sync/seconds"]))

    def per_generator(self, wall_s: float, generators: list[int]) -> dict[int, dict[str, float]]:
        out = {}
        for i in generators:
            busy = self.busy_s.get(i, 0.0)
            out[i] = {"rlfleet_generator_idle_frac": max(0.0, 1.0 - busy / wall_s) if wall_s > 0 else 0.0,
                      "rlfleet_gen_tokens_per_s": self.tokens.get(i, 0) / busy if busy else 0.0}
        return out

    def metrics(self, wall_s: float, generators: list[int]) -> dict:
        busy, tokens = sum(self.busy_s.values()), sum(self.tokens.values())
        per_gen = self.per_generator(wall_s, generators).values()
        # multi-turn: the environment's seconds and failures in the window (turns per episode and the environment's
        # token share are the trained batch's, from the learner)
        env = {"env/seconds": self.env_s, "errors/env": self.env_errors} if self.multi_turn else {}
        return env | {
            "gen/groups": self.groups,
            "gen/active_generators": sum(1 for t in self.tokens.values() if t > 0),
            "gen/tokens": tokens,
            "time/gen_s": busy,
            "throughput/gen_tokens_per_s": tokens / busy if busy else 0.0,
            "idle/generator_frac": sum(g["rlfleet_generator_idle_frac"] for g in per_gen) / max(len(generators), 1),
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
    tools = None
    if alg.environment is not None:
        from rlfleet.environments import make_environment

        try:
            tools = getattr(make_environment(alg.environment, alg.environment_kwargs), "tools", None)
        except ValueError as err:
            problems.append(str(err))
        if dataset is not None and len(dataset) and not isinstance(dataset[0]["prompt"], list):
            problems.append(f"algorithm.environment: {alg.environment!r} needs conversational prompts (lists of "
                            f"{{'role', 'content'}} messages), and data.dataset {cfg.data.dataset!r} has plain "
                            "strings; set data.system_prompt (\"\" for none) to make each string a user message")
    problems += model_problems(cfg)
    eval_dataset = None
    if cfg.logging.eval_steps is not None:
        try:
            eval_dataset = load_eval_dataset(cfg)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
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
                                 lambda tokenizer, prompt: prompt_token_ids(tokenizer, prompt, tools))
    if problems:
        raise ConfigError(problems)
    if cfg.data.eval_split is not None and cfg.logging.eval_steps is None:
        console(f"data.eval_split {cfg.data.eval_split!r} is set but logging.eval_steps is not: no evaluation while "
                "training")
    return dataset, eval_dataset


def load_eval_dataset(cfg: RLFleetConfig):
    """The held-out prompts (``data.eval_split``, the first ``data.max_eval_prompts``, in the split's order);
    errors name ``data.eval_split``."""
    from rlfleet.data import load_prompt_dataset

    data = cfg.data.model_copy(update={"max_prompts": cfg.data.max_eval_prompts, "shuffle": False})
    try:
        return load_prompt_dataset(data, cfg.data.eval_split, seed=cfg.seed)
    except (ValueError, FileNotFoundError) as err:
        message = str(err).removeprefix("data.split: ").removeprefix("data.dataset: ")
        raise ValueError(f"data.eval_split: {cfg.data.eval_split!r} cannot be loaded (used by logging.eval_steps): "
                         f"{message}") from None


def model_problems(cfg: RLFleetConfig) -> list[str]:
    """``model.lora`` on this model: a rank the engines serve, target modules the model has (its config is read,
    not its weights)."""
    if cfg.model.lora is None:
        return []
    from rlfleet.cluster.memory import meta_model
    from rlfleet.lora import lora_problems

    try:
        names = [name for name, _ in meta_model(cfg.model.name_or_path, cfg.model.trust_remote_code).named_modules()]
    except (OSError, ValueError):  # no model config to read: model.name_or_path's own check says so
        return []
    return lora_problems(cfg.model.lora, names)


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




def train(cfg: RLFleetConfig, engine_factory=None) -> dict:
    """Run ``rlfleet train``. Returns a small summary (last metrics, output paths). ``engine_factory`` replaces the
    vLLM engine in every generation actor (benchmarks: :mod:`bench.standin`)."""
    dataset, eval_dataset = preflight(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(dump_config(cfg))
    online_dpo = cfg.algorithm.name == "online_dpo"  # its reference: a frozen copy (BEMA's) or the adapter disabled
    return run_job(cfg, lambda recoveries, control: RLJob(cfg, dataset, control, recoveries, engine_factory,
                                                          eval_dataset),
                   cfg.cluster.min_generators, with_reference=cfg.algorithm.beta > 0 or online_dpo)


class Evaluations:
    """Evaluation while training (``logging.eval_steps``): which learner steps are due, with the weights each
    evaluates, queued until a generator is idle; which ran.

    Step 0 (the initial weights, a baseline) is due when a run starts from scratch. After step s with
    ``s % eval_steps == 0`` or ``s == max_steps``, step s is queued with its weights handle. An object-store handle
    keeps its weights in the store, so the evaluation loads exactly step s's weights even if later steps were
    published meanwhile; a broadcast round cannot be received twice, so there a queued evaluation takes the latest
    weights when it starts, and its record names their step. An evaluation whose generator died is queued again."""

    def __init__(self, cfg: RLFleetConfig, dataset):
        self.every, self.max_steps = cfg.logging.eval_steps, cfg.learner.max_steps
        self.n = cfg.logging.eval_num_generations
        self.temperature = 0.0 if cfg.logging.eval_greedy else None
        self.records = None
        if dataset is not None and self.every is not None:
            import ray

            self.records = ray.put([{**row, "prompt_id": f"eval-{i}"} for i, row in enumerate(dataset)])
        self.queue: list[tuple[int, object]] = []  # (step, its weights handle), oldest first
        self.handles: dict[int, object] = {}  # the handle of every step queued or running
        self.latest = None  # the latest weights handle
        self.steps_done: list[int] = []

    def after_step(self, step: int, weights) -> None:
        self.latest = weights
        if self.records is not None and (step % self.every == 0 or step == self.max_steps):
            self.queue.append((step, weights))
            self.handles[step] = weights

    def dispatch(self, pool: GeneratorPool) -> None:
        while self.queue:
            step, weights = self.queue[0]
            if weights.transport != "object_store" and self.latest is not None:
                step, weights = self.latest.version, self.latest  # see the class doc
            if not pool.dispatch_evaluation(step, weights, self.records, self.n, self.temperature):
                return
            self.queue.pop(0)
            self.handles[step] = weights

    def requeue(self, pool: GeneratorPool) -> None:
        """Evaluations lost with their generator go to the front of the queue."""
        while pool.lost_evaluations:
            step = pool.lost_evaluations.pop()
            self.queue.insert(0, (step, self.handles[step]))

    def done(self, record: dict) -> None:
        self.handles.pop(int(record["step"]), None)
        self.steps_done.append(int(record["step"]))

    def outstanding(self, pool: GeneratorPool) -> bool:
        return bool(self.queue) or any(m.evaluating for m in pool.members)


class RLJob:
    """One life of the RL job's actors: start (or restore), the loop, the final checkpoint (see :class:`Job`)."""

    label, command, phase = "rlfleet", "rlfleet train", "starting the actors"

    def __init__(self, cfg: RLFleetConfig, dataset, control, recoveries: int = 0, engine_factory=None,
                 eval_dataset=None):
        self.cfg, self.dataset, self.control, self.engine_factory = cfg, dataset, control, engine_factory
        self.eval_dataset = eval_dataset
        self.out = Path(cfg.output_dir)
        self.recoveries = recoveries
        self.replay = self.learner = self.learner_placement = self.pool = self.outputs = None
        self.learner_future = None  # the train_step in flight

    def _timeout(self) -> float:
        return self.cfg.cluster.timeout_s

    def start(self, resume_from: Path | None) -> None:
        """Start the actors, restore the checkpoint (if any), wait for ``min`` generators, publish the weights."""
        from rlfleet.data import PromptStream
        from rlfleet.generation.actor import make_generation_actor, vllm_engine
        from rlfleet.learner.actor import make_learner_actor
        from rlfleet.replay.actor import make_replay_actor

        cfg, c, t = self.cfg, self.cfg.cluster, self._timeout()
        self.phase = "placing the learner"
        self.replay = make_replay_actor(cfg.replay, cfg.seed, name=REPLAY_NAME, num_cpus=0)
        self.learner_placement = reserve(learner_bundles(c), "rlfleet-learner", timeout_s=min(t, 120.0))
        self.learner = make_learner_actor(cfg, REPLAY_NAME, name="rlfleet-learner", **self.learner_placement.options())
        factory = self.engine_factory or vllm_engine
        fleet = c.max_generators
        if fleet is None:  # cluster.num_generators: auto
            import ray

            total = ray.cluster_resources()
            fleet = fleet_size(c, total)
            console(f"cluster.num_generators auto: {fleet} generator(s) ({generator_bundle(c)} each) beside the "
                    f"learner ({learner_bundles(c)}) on the cluster's {total.get('CPU', 0):g} CPUs, "
                    f"{total.get('GPU', 0):g} GPUs")
        self.pool = GeneratorPool(
            lambda index, options: make_generation_actor(cfg, REPLAY_NAME, index, factory, **options),
            generator_bundle(c), fleet,
            cfg.generation.generation_batch_size // cfg.generation.num_generations, t, c.requests_per_generator,
            # request order: the replay actor hears of lost requests from here (the call is ordered before any
            # later one of the driver's, a checkpoint's state_dict included)
            skip_requests=self.replay.skip.remote if cfg.replay.consume_order == "request" else None)
        self.stream = PromptStream(self.dataset, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.step, errors_total = 0, {"reward": 0, "env": 0}
        if resume_from is not None:
            self.phase = f"restoring {resume_from}"
            replay_state, driver_state = ckpt.read_state(resume_from)
            call(self.learner.load.remote(str(resume_from / "policy")), t, "the learner (loading a checkpoint)")
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
        series = rl_series(cfg.algorithm.beta, multi_turn=cfg.algorithm.environment is not None,
                           online_dpo=cfg.algorithm.name == "online_dpo", evaluation=self.eval_dataset is not None)
        self.outputs = StepOutputs(cfg, series, self.step if resume_from else None,
                                   RL_GENERATOR_SERIES)
        self.batches_log = MetricsLog(self.out, resume_step=self.step if resume_from else None, name="batches.jsonl")
        self.progress = Progress(cfg.learner.max_steps, cfg.logging.progress, cfg.logging.log_every, start=self.step)

        self.weights = call(self.learner.publish_weights.remote(self.pool.weight_group()), t,
                            "the learner (publishing)")
        stats = call(self.replay.stats.remote(), t, "the replay actor")
        # Admission's count of live groups starts with those trained (one batch per version) and those queued.
        self.live_before = self.weights.version * cfg.learner.groups_per_step + int(stats["replay/fresh_size"])
        self.replay_drops_before = sum(stats[k] for k in REPLAY_DROPS)
        self.substituted_before = stats["replay/substituted"]
        self.control_seen, self.control_future = 0, self.control.next_request.remote(0)  # any request so far
        self.window, self.last_record, self.t_step = self.new_window(), {}, time.perf_counter()
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

    def new_window(self) -> StepWindow:
        return StepWindow(multi_turn=self.cfg.algorithm.environment is not None)

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
                result = call(self.learner_future, t, "the learner")
                self.learner_future = None
                if result is None:  # no batch within pull_s: admission runs again with fresh replay stats
                    self.reach_new_members()
                    continue
                with self.timed("finish_step"):
                    stats, end = self.advance(result)
                checkpoint = self.step % cfg.checkpoint.save_steps == 0 and self.step < cfg.learner.max_steps
                if not checkpoint and self.step < cfg.learner.max_steps:
                    # the next step and the requests the new weights admit go out before the step's record is
                    # written: at max_staleness 1 a request waits for the last publication, and the learner for
                    # that request, so the driver's bookkeeping would sit on both (not before a checkpoint, which
                    # needs the learner idle)
                    self.start_learner_step(pull_s)
                    self.admit_all(stats)
                with self.timed("finish_step"):
                    self.record_step(result, stats, end)
                if checkpoint:
                    self.save()
        self.finish_evaluations()

    def start_learner_step(self, pull_s: float) -> None:
        self.learner_future = self.learner.train_step.remote(pull_s, self.pool.weight_group())

    def admit_all(self, stats: dict | None = None) -> None:
        """Evaluations first (one waits for no training request), then generation as far as the bound admits."""
        with self.timed("admit"):
            self.evaluations.dispatch(self.pool)
            self.admit(stats)

    def collect(self, finished: list[tuple[int, dict]]) -> None:
        """Finished requests: a generation's stats go to the step's window, an evaluation's to its own record."""
        for index, stats in finished:
            if "eval/step" in stats:
                self.record_evaluation(stats)
            else:
                self.window.add(index, stats)
                self.check_reward_errors(stats)
        self.evaluations.requeue(self.pool)

    def record_evaluation(self, stats: dict) -> None:
        """An evaluation's record: a line of its own in metrics.jsonl (``step``: the learner step whose weights
        were evaluated), the Ray series, the loggers, one console line."""
        step = int(stats.pop("eval/step"))
        stats.pop("sync/seconds", None)  # the weights load before it: not a training step's
        record = {"step": step, **stats}
        self.outputs.write(record)
        self.evaluations.done(record)
        console(f"eval at step {step}: reward {fmt(record.get('eval/reward/mean'), 3)} on "
                f"{int(record['eval/prompts'])} held-out prompts")

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

    def live_groups(self, replay_stats: dict) -> int:
        """Groups requested and not known to be dropped or lost: admission's count (see rlfleet.cluster.admission)."""
        replay_drops = sum(replay_stats[k] for k in REPLAY_DROPS) - self.replay_drops_before
        return int(self.live_before + self.pool.requested - self.pool.dropped - self.pool.lost() - replay_drops)

    def admit(self, stats: dict | None = None) -> int:
        """Launch generation on idle generators as far as the staleness bound admits. ``stats``: the replay actor's,
        if just read (a drop they miss makes the bound admit less, never more)."""
        cfg = self.cfg
        if stats is None:
            stats = self.ask(self.replay.stats.remote(), "the replay actor")
        live = self.live_groups(stats)
        return self.pool.dispatch(
            self.weights, lambda version, oldest, launched: admission_budget(
                version, oldest, live + launched, cfg.learner.groups_per_step, cfg.replay.max_staleness),
            self.stream.next_batch)

    def reach_new_members(self) -> None:
        """With a transport that has a membership (broadcast), active generators the last publication did not
        reach (joined or restarted since) get nothing to do until one does; while no batch comes (they may be the
        ones to generate it), the current weights are published again to the group as it is now."""
        if any(not self.weights.reaches(key) for key in self.pool.weight_group()):
            self.weights = self.ask(self.learner.publish_weights.remote(self.pool.weight_group()),
                                    "the learner (publishing to the generators that joined)")

    def on_control(self) -> None:
        """An operator's request through the rlfleet-control actor (``rlfleet scale``, a stop)."""
        self.control_seen, request = call(self.control_future, self._timeout(), "the rlfleet-control actor")
        self.control_future = self.control.next_request.remote(self.control_seen)
        if "generators" in request and request["generators"] != self.pool.target:
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

    def advance(self, result) -> tuple[dict, float]:
        """A learner step finished: its weights go to each generator before its next request, its evaluation is
        queued. Returns the replay actor's stats as the step left them and the time it ended (for its record)."""
        self.step += 1
        self.weights = result.weights
        stats = self.ask(self.replay.stats.remote(), "the replay actor")
        end = time.perf_counter()
        self.evaluations.after_step(self.step, self.weights)
        return stats, end

    def record_step(self, result, stats: dict, now: float) -> None:
        """The finished step's record: metrics.jsonl, batches.jsonl, the Ray series, progress, ``rlfleet scale``."""
        gps = self.cfg.learner.groups_per_step
        metrics = dict(result.metrics)
        wall_s, learner_s = now - self.t_step, metrics.pop("time/step_s")
        generators = [m.index for m in self.pool.active()]
        substituted_last = self.last_record.get("replay/substituted", self.substituted_before)
        record = {"step": self.step, **metrics, "policy_version": self.version, **stats,
                  "replay/size": stats["replay/fresh_size"] + stats["replay/reservoir_size"],
                  "replay/substituted_step": stats["replay/substituted"] - substituted_last,
                  **self.window.metrics(wall_s, generators), **self.pool.counts,
                  "errors/reward_total": self.errors_total["reward"],
                  **({"errors/env_total": self.errors_total["env"]} if self.cfg.algorithm.environment else {}),
                  "faults/recoveries": self.recoveries, "fleet/generators": len(generators),
                  **{f"gen/requests/{i}": n for i, n in self.pool.requests_by_generator.items()},
                  **{f"time/driver/{phase}_s": sec for phase, sec in self.driver_s.items()},
                  "driver/round_trips": self.round_trips + self.pool.node_queries,
                  "time/step_s": wall_s, "time/learner_s": learner_s,
                  "idle/learner_frac": max(0.0, 1.0 - learner_s / wall_s), "learner/groups": gps}
        self.outputs.write(record, result.samples, self.window.per_generator(wall_s, generators))
        self.t_step, self.window, self.last_record = now, self.new_window(), record
        self.batches_log.write({"step": self.step, "policy_version": self.version, "prompt_ids": result.prompt_ids})
        self.progress.update(record)
        self.control.report.remote({"step": self.step, "generators": len(generators), "target": self.pool.target,
                                    "fleet/added": self.pool.counts["fleet/added"],
                                    "fleet/removed": self.pool.counts["fleet/removed"]})

    # -- the end -----------------------------------------------------------------------------------------------

    def settle(self) -> None:
        """A step in flight changes the weights: count it before the final checkpoint."""
        if self.learner_future is not None:
            result = call(self.learner_future, self._timeout(), "the learner")
            self.learner_future = None
            if result is not None:
                self.record_step(result, *self.advance(result))

    def save(self) -> Path:
        """Checkpoint at the current step. Generation is quiesced first, so the replay buffer, the prompt cursor and
        the prompts to re-issue describe the same moment."""
        self.collect(self.pool.quiesce())
        t, staging = self._timeout(), ckpt.staging_dir(self.out, self.step)
        call(self.learner.save.remote(str(staging / "policy")), t, "the learner (saving)")
        replay_state = call(self.replay.state_dict.remote(), t, "the replay actor (saving)")
        ckpt.write_state(staging, replay_state, {"step": self.step, "policy_version": self.version,
                                                 "stream": self.stream.state_dict(), "retry": self.pool.retry,
                                                 "reward_errors_total": self.errors_total["reward"],
                                                 "env_errors_total": self.errors_total["env"]})
        return ckpt.commit(staging, self.step, self.cfg.checkpoint.keep_last)

    def finish(self, final: Path) -> dict:
        records = self.outputs.log.read()
        keys = ("reward/mean", "loss") + (("eval/reward/mean",) if self.eval_dataset is not None else ())
        png = plot(records, self.out / "reward.png", keys) if self.cfg.logging.plot else None
        merged = bema = None
        if self.cfg.algorithm.name == "online_dpo" and self.cfg.dpo.bema is not None:
            bema = self.out / "bema"
            call(self.learner.save_bema.remote(str(bema)), self._timeout(), "the learner (saving the BEMA weights)")
        if self.cfg.model.lora is not None and self.cfg.model.lora.save_merged:
            merged = self.out / "merged"
            call(self.learner.save_merged.remote(str(merged)), self._timeout(), "the learner (saving the merged model)")
        summary = {"step": self.step, "checkpoint": str(final), "metrics": str(self.outputs.log.path),
                   "plot": str(png) if png else None, "merged": str(merged) if merged else None,
                   "bema": str(bema) if bema else None,
                   "last": self.last_record}
        (self.out / "summary.json").write_text(json.dumps(summary, default=str, indent=2))
        console(f"done at step {self.step}; checkpoint {final}")
        return summary

    def teardown(self) -> None:
        if self.outputs is not None:
            self.outputs.close()
        if self.pool is not None:
            self.pool.shutdown()
        kill(self.learner, self.replay)
        if self.learner_placement is not None:
            self.learner_placement.release()
