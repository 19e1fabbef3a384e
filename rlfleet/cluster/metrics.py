"""Run outputs: ``metrics.jsonl`` (one object per learner step), progress on the terminal, the reward/loss plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

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


# Ray application metrics: exported on each node's Prometheus endpoint (prefixed `ray_`), hence in the dashboard's
# metrics view and in Grafana (deploy/grafana-dashboard.json). name -> (record key, description); all gauges.
RAY_GAUGES = {
    "rlfleet_step": ("step", "learner steps completed"),
    "rlfleet_reward_mean": ("reward/mean", "mean reward of the trained batch"),
    "rlfleet_reward_std": ("reward/std", "reward std of the trained batch"),
    "rlfleet_loss": ("loss", "total loss"),
    "rlfleet_kl": ("loss/kl", "mean k3 KL to the reference model"),
    "rlfleet_clip_frac": ("clip/frac", "share of clipped tokens"),
    "rlfleet_staleness_mean": ("staleness/mean", "policy versions between sampling and training"),
    "rlfleet_replay_fresh_size": ("replay/fresh_size", "groups queued for training"),
    "rlfleet_replay_reservoir_size": ("replay/reservoir_size", "high-variance groups held for replay"),
    "rlfleet_sync_seconds": ("sync/seconds", "slowest weight load of the step on a generator"),
    "rlfleet_learner_step_seconds": ("time/learner_s", "learner compute seconds per step"),
    "rlfleet_learner_idle_frac": ("idle/learner_frac", "share of the step the learner waited for data"),
    "rlfleet_fleet_generators": ("fleet/generators", "generation actors running"),
    "rlfleet_fleet_added": ("fleet/added", "generation actors that joined while the job ran (cumulative)"),
    "rlfleet_fleet_removed": ("fleet/removed", "generation actors that left: scaled down, node lost, restarts used"),
    "rlfleet_generator_restarts": ("faults/generator_restarts", "generation actors restarted by Ray (cumulative)"),
    "rlfleet_recoveries": ("faults/recoveries", "restarts of the job's actors from a checkpoint (cumulative)"),
    "rlfleet_dpo_accuracy": ("rewards/accuracies", "DPO: share of pairs whose chosen reward is higher"),
    "rlfleet_dpo_margin": ("rewards/margins", "DPO: mean chosen - rejected reward"),
    "rlfleet_dpo_eval_accuracy": ("eval/rewards/accuracies", "DPO: held-out reward accuracy"),
}
RAY_COUNTERS = {  # name -> (record key of the per-step increment, description)
    "rlfleet_replay_substituted": ("replay/substituted_step", "zero-variance groups replaced from the reservoir"),
    "rlfleet_reward_errors": ("errors/reward", "groups dropped because a reward or filter function failed"),
}
RAY_GENERATOR_GAUGES = {  # tagged by generator
    "rlfleet_gen_tokens_per_s": "generated tokens per second while busy",
    "rlfleet_generator_idle_frac": "share of the step the generator had no request",
}


class RayMetrics:
    """Publishes each step's record through ``ray.util.metrics``, tagged with the run's name."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run}
        self.gauges = {n: (k, Gauge(n, description=d, tag_keys=("run",))) for n, (k, d) in RAY_GAUGES.items()}
        self.counters = {n: (k, Counter(n, description=d, tag_keys=("run",))) for n, (k, d) in RAY_COUNTERS.items()}
        self.per_generator = {n: Gauge(n, description=d, tag_keys=("run", "generator"))
                              for n, d in RAY_GENERATOR_GAUGES.items()}

    def publish(self, record: dict, generators: dict[int, dict[str, float]]) -> None:
        for key, gauge in self.gauges.values():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)
        for key, counter in self.counters.values():
            value = record.get(key, 0)
            if value:
                counter.inc(float(value), tags=self.tags)
        for index, figures in generators.items():
            tags = {**self.tags, "generator": str(index)}
            for name, gauge in self.per_generator.items():
                if name in figures:
                    gauge.set(figures[name], tags=tags)
