"""Run outputs: ``metrics.jsonl`` (one object per learner step), progress on the terminal, the reward/loss plot."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
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


class Progress:
    """A one-line bar on an interactive terminal, plain log lines otherwise."""

    def __init__(self, total: int, mode: str = "auto", every: int = 1, start: int = 0):
        self.total, self.every, self.start_step = total, every, start
        self.bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.t0 = time.perf_counter()
        self.groups = 0

    def update(self, record: dict) -> None:
        step = record["step"]
        self.groups += int(record.get("learner/groups", 0))
        rate = self.groups / max(time.perf_counter() - self.t0, 1e-9)
        reward = record.get("reward/mean")
        reward_s = "nan" if reward is None or not math.isfinite(reward) else f"{reward:.3f}"
        text = (f"step {step}/{self.total}  reward {reward_s}  loss {record.get('loss', float('nan')):.4f}  "
                f"staleness {record.get('staleness/mean', 0):.2f}  {rate:.2f} groups/s")
        if self.bar:
            done = int(30 * step / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {text}")
            sys.stderr.flush()
            if step >= self.total:
                sys.stderr.write("\n")
        elif step % self.every == 0 or step >= self.total:
            print(f"rlfleet: {text}", flush=True)


def plot(records: list[dict], path: str | Path, keys: tuple[str, ...] = ("reward/mean", "loss")) -> Path | None:
    """Save a PNG with one panel per key against the step."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
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
            self.wandb.log(scalars, step=step)

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
                 per_generator: dict[str, str] | None = None):
        out = Path(cfg.output_dir)
        run = out.resolve().name  # the `run` tag of the series
        self.log = MetricsLog(out, resume_step=resume_step)
        self.ray = RayMetrics(run, series, per_generator)
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
    "rlfleet_dpo_eval_accuracy": ("eval/rewards/accuracies", "held-out reward accuracy (jobs with an eval split; "
                                  "from step 0, then every dpo.eval_steps)"),
    "rlfleet_recoveries": ("faults/recoveries", "restarts of the job's actors from a checkpoint (cumulative)"),
}


MULTI_TURN_SERIES = ("rlfleet_env_errors_total", "rlfleet_env_turns_per_episode")


def rl_series(beta: float, multi_turn: bool = False) -> dict[str, tuple[str, str]]:
    """The series an ``rlfleet train`` job exports: all of RL_SERIES, KL only when there is a reference model, the
    environment's only with one (``algorithm.environment``)."""
    return {n: v for n, v in RL_SERIES.items()
            if (beta > 0 or n != "rlfleet_kl") and (multi_turn or n not in MULTI_TURN_SERIES)}


def dpo_series(with_eval: bool) -> dict[str, tuple[str, str]]:
    return {n: v for n, v in DPO_SERIES.items() if with_eval or n != "rlfleet_dpo_eval_accuracy"}


class RayMetrics:
    """Publishes each step's record through ``ray.util.metrics``, tagged with the run's name. A series whose key a
    record lacks keeps its last value (the DPO held-out accuracy between evaluations)."""

    def __init__(self, run: str, series: dict[str, tuple[str, str]],
                 per_generator: dict[str, str] | None = None):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {n: (key, Gauge(n, description=d, tag_keys=("run",))) for n, (key, d) in series.items()}
        self.per_generator = {n: Gauge(n, description=d, tag_keys=("run", "generator"))
                              for n, d in (per_generator or {}).items()}

    def publish(self, record: dict, generators: dict[int, dict[str, float]] | None = None) -> None:
        for key, gauge in self.gauges.values():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)
        for index, figures in (generators or {}).items():
            tags = {**self.tags, "generator": str(index)}
            for name, gauge in self.per_generator.items():
                gauge.set(figures[name], tags=tags)
