"""Run outputs: ``metrics.jsonl`` (one object per learner step), progress on the terminal, the reward/loss plot."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from collections import deque
from pathlib import Path

from rlfleet.config import LoggingConfig, RLFleetConfig

REQUIRED_KEYS = ("step", "policy_version", "reward/mean", "reward/std", "loss", "staleness/mean", "replay/size",
                 "frac_reward_zero_std", "time/step_s")


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON line per learner step to ``name``. On resume, lines past the resumed step are dropped
    first."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None, name: str = "metrics.jsonl"):
        self.path = Path(output_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def console(text: str) -> None:
    """One line of rlfleet's own on stdout (``rlfleet: <text>``); a progress bar being drawn is ended first."""
    if Progress.bar_open:
        sys.stderr.write("\n")
        sys.stderr.flush()
        Progress.bar_open = False
    print(f"rlfleet: {text}", flush=True)


def warn(text: str) -> None:
    """An event a person should see (a generator died, a node was lost, a reward function failed): a line of its
    own, ``rlfleet: WARNING: <text>``, between the progress lines."""
    console(f"WARNING: {text}")


def window_rate(marks: list[tuple[float, int, int]]) -> tuple[float, float] | None:
    """``(groups per second, seconds per step)`` between the first and the last of ``marks`` (time, step, groups
    trained so far); None with fewer than two marks or no time between them."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return None
    (t0, s0, g0), (t1, s1, g1) = marks[0], marks[-1]
    return (g1 - g0) / (t1 - t0), (t1 - t0) / max(s1 - s0, 1)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """rlfleet's progress: a one-line bar on an interactive terminal, a plain line every ``every`` steps otherwise.

    The rate is that of the last ``window`` steps (groups trained per second, seconds per step, and the time left
    at that pace), not an average since the start, which start-up would weigh on for the whole run. The reward is
    the mean of the same steps' batch rewards, and the line names them (``reward 0.583 (steps 21-40)``): one step's
    batch is a handful of groups, too few to read a trend from. So is the completion length (``length 10.4``, tokens;
    jobs that sample completions).
    """

    bar_open = False  # a bar line is on the terminal (console() ends it before printing)

    def __init__(self, total: int, mode: str = "auto", every: int = 1, start: int = 0, window: int = 20):
        self.total, self.every = total, every
        self.bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.groups = 0
        self.marks: deque[tuple[float, int, int]] = deque(maxlen=window + 1)  # (time, step, groups so far)
        self.rewards: deque[tuple[int, float]] = deque(maxlen=window)  # (step, its batch's mean reward)
        self.lengths: deque[float] = deque(maxlen=window)  # the same steps' mean completion lengths

    def line(self, record: dict) -> str:
        rate = window_rate(list(self.marks))
        pace = "" if rate is None else (f"  {rate[0]:.1f} groups/s  {rate[1]:.2f} s/step  "
                                        f"eta {format_duration(rate[1] * (self.total - record['step']))}")
        length = f"  length {sum(self.lengths) / len(self.lengths):.1f}" if self.lengths else ""
        return (f"step {record['step']}/{self.total}  reward {window_reward(list(self.rewards))}{length}  "
                f"loss {fmt(record.get('loss'), 4)}  staleness {record.get('staleness/mean', 0):.2f}{pace}")

    def update(self, record: dict) -> None:
        step = record["step"]
        self.groups += int(record.get("learner/groups", 0))
        self.marks.append((time.perf_counter(), step, self.groups))
        reward = record.get("reward/mean")
        if isinstance(reward, (int, float)) and math.isfinite(reward):
            self.rewards.append((step, float(reward)))
        if "completions/mean_length" in record:
            self.lengths.append(float(record["completions/mean_length"]))
        text = self.line(record)
        if self.bar:
            done = int(30 * step / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {text}\x1b[K")
            Progress.bar_open = step < self.total
            if step >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif step % self.every == 0 or step >= self.total:
            console(text)


def window_reward(rewards: list[tuple[int, float]]) -> str:
    """``"0.583 (steps 21-40)"``: the mean of the ``(step, batch reward)`` pairs and the steps they span; ``"nan"``
    when no step had a reward."""
    if not rewards:
        return "nan"
    first, last = rewards[0][0], rewards[-1][0]
    span = f"step {last}" if first == last else f"steps {first}-{last}"
    return f"{sum(r for _, r in rewards) / len(rewards):.3f} ({span})"


def trailing_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def fmt(value, digits: int) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def plot(records: list[dict], path: str | Path, keys: tuple[str, ...] = ("reward/mean", "loss"),
         window: int = 20) -> Path | None:
    """Save a PNG with one panel per key against the step: each step's value as a faint point, and the mean of the
    last ``window`` steps (the console's reward) as a line."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        pts = [(r["step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, values, ".", alpha=0.3, label="each step")
        ax.plot(steps, trailing_mean(values, window), "-", label=f"mean of the last {window}")
        ax.legend(loc="best", fontsize="small")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


class Reporters:
    """The loggers of ``logging.report_to``, fed the same record as metrics.jsonl at each step.

    - ``tensorboard``: event files in ``output_dir/tensorboard``: every numeric key of the record as a scalar
      against the step (``reward/mean`` is the reward curve), and the step's sample completions as a text table.
      On resume, TensorBoard is told to drop the old events past the resumed step (``purge_step``), as metrics.jsonl
      drops its lines.
    - ``wandb``: one W&B run per output_dir (its id is kept in ``output_dir/wandb-run-id``, so a resumed job
      continues it), the resolved config, the scalars, and the samples as a table every ``log_every`` steps.
      ``WANDB_MODE=offline`` writes under ``output_dir/wandb`` without network.
    """

    def __init__(self, cfg: LoggingConfig, out: Path, run: str, config: dict, resume_step: int | None):
        self.log_every = cfg.log_every
        self.tensorboard = self.wandb = None
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"),
                                             purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in cfg.report_to:
            import wandb

            id_file = out / "wandb-run-id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.wandb_project, name=run, id=run_id, dir=str(out), config=config,
                                    resume="allow")
            # an evaluation while training arrives after later steps were logged, and W&B's own step only grows:
            # evaluations are charted against the step they evaluated (eval/step) instead
            self.wandb.define_metric("eval/step")
            self.wandb.define_metric("eval/*", step_metric="eval/step")

    def log(self, record: dict, samples: list[dict] = ()) -> None:
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        with_samples = bool(samples) and step % self.log_every == 0
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            if with_samples:
                self.tensorboard.add_text("samples", samples_markdown(samples), step)
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            if with_samples:
                table = wandb.Table(columns=["prompt_id", "reward", "completion"],
                                    data=[[s["prompt_id"], s["reward"], s["completion"]] for s in samples])
                scalars = {**scalars, "samples": table}
            if any(k.startswith("eval/") for k in scalars):
                scalars["eval/step"] = step
            evaluation_only = all(k.startswith("eval/") or k == "policy_version" for k in scalars)
            self.wandb.log(scalars, **({} if evaluation_only else {"step": step}))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            self.wandb = None
            # finish() can return before W&B's service process has written the run's last records (offline, 0.31:
            # about 1 run in 7 had no history rows when read right after); teardown waits for that process to exit
            wandb.teardown()


class StepOutputs:
    """Where each step's record goes: ``metrics.jsonl`` (``.log``), the Ray series of ``series``, and the loggers of
    ``logging.report_to``. ``resume_step``: the step a resumed job continues from (later lines are rewritten)."""

    def __init__(self, cfg: RLFleetConfig, series: dict[str, tuple[str, str]], resume_step: int | None,
                 per_generator: dict[str, str] | None = None, per_function: bool = False):
        out = Path(cfg.output_dir)
        run = out.resolve().name  # the `run` tag of the series
        self.log = MetricsLog(out, resume_step=resume_step)
        self.ray = RayMetrics(run, series, per_generator, per_function)
        self.reporters = Reporters(cfg.logging, out, run, cfg.model_dump(mode="json"), resume_step)

    def write(self, record: dict, samples: list[dict] = (), generators: dict[int, dict[str, float]] | None = None):
        self.log.write(record)
        self.ray.publish(record, generators)
        self.reporters.log(record, samples)

    def close(self) -> None:
        self.reporters.close()


def logger_problems(cfg: LoggingConfig) -> list[str]:
    """What keeps a logger of ``report_to`` from starting, found before any actor starts: W&B online without a key
    (wandb would stop the run at its login prompt)."""
    import netrc

    if "wandb" not in cfg.report_to or os.environ.get("WANDB_MODE", "online") in ("offline", "disabled", "dryrun"):
        return []
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_BASE_URL"):
        return []
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):  # where `wandb login` keeps the key
            return []
    except (OSError, netrc.NetrcParseError):
        pass
    return ["logging.report_to: wandb has no API key on this machine; run `wandb login`, set WANDB_API_KEY, or set "
            "WANDB_MODE=offline (the run is kept under output_dir/wandb; `wandb sync` uploads it later)"]


def samples_markdown(samples: list[dict]) -> str:
    """A Markdown table (TensorBoard's text panel renders it) of sample completions."""
    def cell(text: str) -> str:
        return " ".join(filter(None, text.replace("|", "\\|").splitlines()))  # any line break: \r, \x0b ...

    rows = [f"| {cell(str(s['prompt_id']))} | {s['reward']:.3f} | {cell(s['completion'])} |" for s in samples]
    return "\n".join(["| prompt | reward | completion |", "|---|---|---|", *rows])


# -- Ray application metrics -------------------------------------------------------------------------------------
# Published through ``ray.util.metrics``, so each node's Prometheus endpoint exports them with Ray's prefix
# (``ray_rlfleet_reward_mean`` ...), tagged with the run (the name of ``output_dir``). Every series of the job is set at
# every step, from the first. All are gauges, the cumulative totals too (``*_total``, ``fleet_added`` ...): Ray's
# Counter cannot hold 0 (``inc`` refuses it), so a healthy run would export no series and a chart would say "No data";
# and a total taken from the job's own state (the replay buffer's counts are checkpointed) survives a driver recovery.
# name -> (the metrics.jsonl key it carries, description)
RL_SERIES = {
    "rlfleet_step": ("step", "learner steps completed"),
    "rlfleet_reward_mean": ("reward/mean", "mean reward of the trained batch"),
    "rlfleet_reward_std": ("reward/std", "reward std of the trained batch"),
    "rlfleet_loss": ("loss", "total loss"),
    "rlfleet_kl": ("loss/kl", "mean k3 KL to the reference model (jobs with algorithm.beta > 0)"),
    "rlfleet_clip_frac": ("clip/frac", "share of clipped tokens"),
    "rlfleet_staleness_mean": ("staleness/mean", "policy versions between sampling and training"),
    "rlfleet_rollout_kl": ("rollout/kl", "KL(engine || learner) on the sampled tokens, k3 estimate: the rollout-train "
                           "mismatch"),
    "rlfleet_completion_length_mean": ("completions/mean_length", "mean completion length of the trained batch "
                                       "(tokens)"),
    "rlfleet_completion_length_max": ("completions/max_length", "longest completion of the trained batch (tokens)"),
    "rlfleet_completion_terminated_length_mean": ("completions/mean_terminated_length", "mean length of the trained "
                                                  "batch's completions that ended with EOS (0: none did)"),
    "rlfleet_completion_clipped_ratio": ("completions/clipped_ratio", "share of the trained batch's completions cut "
                                         "at generation.max_completion_length"),
    "rlfleet_replay_fresh_size": ("replay/fresh_size", "groups queued for training"),
    "rlfleet_replay_reservoir_size": ("replay/reservoir_size", "high-variance groups held for replay"),
    "rlfleet_replay_substituted_total": ("replay/substituted", "zero-variance groups replaced from the reservoir"),
    "rlfleet_reward_errors_total": ("errors/reward_total", "groups dropped because a reward or filter function failed"),
    "rlfleet_env_errors_total": ("errors/env_total", "groups dropped because the environment failed (multi-turn)"),
    "rlfleet_env_turns_per_episode": ("env/turns_per_episode", "model turns per episode (multi-turn)"),
    "rlfleet_sync_seconds": ("sync/seconds", "slowest weight load of the step on a generator"),
    "rlfleet_learner_step_seconds": ("time/learner_s", "learner compute seconds per step"),
    "rlfleet_learner_idle_frac": ("idle/learner_frac", "share of the step the learner waited for data"),
    "rlfleet_fleet_generators": ("fleet/generators", "generation actors running"),
    "rlfleet_fleet_added": ("fleet/added", "generation actors that joined while the job ran (cumulative)"),
    "rlfleet_fleet_removed": ("fleet/removed", "generation actors that left: scaled down, node lost, restarts used"),
    "rlfleet_generator_restarts": ("faults/generator_restarts", "generation actors restarted by Ray (cumulative)"),
    "rlfleet_recoveries": ("faults/recoveries", "restarts of the job's actors from a checkpoint (cumulative)"),
}
RL_GENERATOR_SERIES = {  # tagged by generator as well; the driver computes them for every running generator
    "rlfleet_gen_tokens_per_s": "generated tokens per second while busy",
    "rlfleet_generator_idle_frac": "share of the step the generator had no request",
}
DPO_SERIES = {
    "rlfleet_step": ("step", "learner steps completed"),
    "rlfleet_loss": ("loss", "DPO loss"),
    "rlfleet_dpo_accuracy": ("rewards/accuracies", "share of pairs whose chosen reward is higher"),
    "rlfleet_dpo_margin": ("rewards/margins", "mean chosen - rejected reward"),
    "rlfleet_dpo_eval_accuracy": ("eval/rewards/accuracies", "reward accuracy on the evaluation pairs (jobs with an eval split; "
                                  "from step 0, then every dpo.eval_steps)"),
    "rlfleet_recoveries": ("faults/recoveries", "restarts of the job's actors from a checkpoint (cumulative)"),
}


ONLINE_DPO_SERIES = {  # online DPO's instead of the clip share (algorithm.name: online_dpo)
    "rlfleet_dpo_accuracy": ("dpo/rewards/accuracies", "share of pairs whose chosen reward is higher"),
    "rlfleet_dpo_margin": ("dpo/rewards/margins", "mean chosen - rejected reward"),
    "rlfleet_dpo_pairs": ("dpo/pairs", "preference pairs in the step (online DPO)"),
}
EVAL_SERIES = {  # jobs with logging.eval_steps; set at each evaluation, held between them
    "rlfleet_eval_reward_mean": ("eval/reward/mean", "mean reward on the evaluation prompts (data.eval_dataset / "
                                 "data.eval_split; held-out unless data.eval_on_train)"),
}
REWARD_FUNCTION_SERIES = {  # rlfleet train: tagged by reward function as well (rewards/<function>/mean, /std)
    "mean": ("rlfleet_reward_function_mean", "mean reward of one reward function over the step's generated groups"),
    "std": ("rlfleet_reward_function_std", "reward std of one reward function over the step's generated groups"),
}
MULTI_TURN_SERIES = ("rlfleet_env_errors_total", "rlfleet_env_turns_per_episode")


def rl_series(beta: float, multi_turn: bool = False, online_dpo: bool = False, evaluation: bool = False
              ) -> dict[str, tuple[str, str]]:
    """The series an ``rlfleet train`` job exports: RL_SERIES, KL only when there is a reference model, the
    environment's only with one (``algorithm.environment``), online DPO's instead of the clip share and the rollout
    gap (its loss has no importance ratio), the held-out reward with evaluation (``logging.eval_steps``)."""
    series = {n: v for n, v in RL_SERIES.items()
              if (beta > 0 or n != "rlfleet_kl") and (multi_turn or n not in MULTI_TURN_SERIES)
              and not (online_dpo and n in ("rlfleet_clip_frac", "rlfleet_rollout_kl"))}
    return series | (ONLINE_DPO_SERIES if online_dpo else {}) | (EVAL_SERIES if evaluation else {})


def dpo_series(with_eval: bool) -> dict[str, tuple[str, str]]:
    return {n: v for n, v in DPO_SERIES.items() if with_eval or n != "rlfleet_dpo_eval_accuracy"}


class RayMetrics:
    """Publishes each step's record through ``ray.util.metrics``, tagged with the run's name. A series whose key a
    record lacks keeps its last value (the DPO held-out accuracy between evaluations)."""

    def __init__(self, run: str, series: dict[str, tuple[str, str]],
                 per_generator: dict[str, str] | None = None, per_function: bool = False):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.per_function = {stat: Gauge(name, description=d, tag_keys=("run", "function"))
                             for stat, (name, d) in (REWARD_FUNCTION_SERIES.items() if per_function else ())}
        self.gauges = {n: (key, Gauge(n, description=d, tag_keys=("run",))) for n, (key, d) in series.items()}
        self.per_generator = {n: Gauge(n, description=d, tag_keys=("run", "generator"))
                              for n, d in (per_generator or {}).items()}

    def publish(self, record: dict, generators: dict[int, dict[str, float]] | None = None) -> None:
        for key, gauge in self.gauges.values():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)
        for key, value in record.items():  # rewards/<function>/mean and /std
            parts = key.split("/")
            if (len(parts) == 3 and parts[0] == "rewards" and parts[2] in self.per_function
                    and isinstance(value, (int, float)) and math.isfinite(value)):
                self.per_function[parts[2]].set(float(value), tags={**self.tags, "function": parts[1]})
        for index, figures in (generators or {}).items():
            tags = {**self.tags, "generator": str(index)}
            for name, gauge in self.per_generator.items():
                gauge.set(figures[name], tags=tags)
