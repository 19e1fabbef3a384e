"""The RL job's step records: what they gather between two learner steps (:class:`StepWindow`, the generators'
figures) and where each goes (:class:`StepRecords`: metrics.jsonl with the Ray series and loggers, batches.jsonl,
the console's progress)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rlfleet.cluster.metrics import RL_GENERATOR_SERIES, MetricsLog, Progress, StepOutputs
from rlfleet.config import RLFleetConfig


@dataclass
class StepWindow:
    """Generation figures accumulated between two learner steps, per generator."""

    groups: int = 0
    reward_errors: int = 0
    reward_timeouts: int = 0  # of reward_errors: calls past algorithm.reward_timeout_s
    reward_lost: int = 0  # of reward_errors: calls lost with a reward worker that died
    reward_counts: dict[str, float] = field(default_factory=dict)  # reward/<function>/count/<what>
    function_sums: dict[str, list[float]] = field(default_factory=dict)  # function -> [n, sum, sum of squares]
    env_errors: int = 0
    dropped: int = 0
    multi_turn: bool = False  # the job has an environment
    env_s: float = 0.0
    busy_s: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    sync_s: list[float] = field(default_factory=list)
    engine_steps: int = 0  # continuous engines' steps (each samples a token of every running completion)
    engine_idle_s: float = 0.0  # continuous engines' loops waiting for work
    engine_load_s: float = 0.0  # continuous engines' loops loading weights between two steps
    engine_loads: int = 0

    def add(self, index: int, stats: dict) -> None:
        self.groups += int(stats.get("gen/groups", 0))
        self.reward_errors += int(stats.get("errors/reward", 0))
        self.reward_timeouts += int(stats.get("errors/reward_timeout", 0))
        self.reward_lost += int(stats.get("errors/reward_lost", 0))
        for key, value in stats.items():
            if key.startswith("reward/") and "/count/" in key:
                self.reward_counts[key] = self.reward_counts.get(key, 0.0) + value
            elif key.startswith("rewards/") and key.endswith("/n"):
                name = key[len("rewards/"):-len("/n")]
                sums = self.function_sums.setdefault(name, [0.0, 0.0, 0.0])
                for i, part in enumerate(("n", "sum", "sum_sq")):
                    sums[i] += float(stats.get(f"rewards/{name}/{part}", 0.0))
        self.env_errors += int(stats.get("errors/env", 0))
        self.env_s += float(stats.get("env/seconds", 0.0))
        self.dropped += int(stats.get("gen/dropped_groups", 0))
        # a continuous engine reports its own busy time (its requests overlap: their seconds would add up past it)
        busy = stats.get("engine/busy_s", stats.get("gen/seconds", 0.0))
        self.busy_s[index] = self.busy_s.get(index, 0.0) + float(busy)
        self.tokens[index] = self.tokens.get(index, 0) + int(stats.get("gen/tokens", 0))
        self.engine_steps += int(stats.get("engine/steps", 0))
        self.engine_idle_s += float(stats.get("engine/idle_s", 0.0))
        self.engine_load_s += float(stats.get("engine/load_s", 0.0))
        self.engine_loads += int(stats.get("sync/inflight_loads", 0))
        if "sync/seconds" in stats:
            self.sync_s.append(float(stats["sync/seconds"]))

    def function_rewards(self) -> dict[str, float]:
        """Each reward function's ``rewards/<function>/mean`` and ``/std`` (TRL's names; the std with Bessel's
        correction, as TRL's) over the samples of the window's groups."""
        out = {}
        for name, (n, total, total_sq) in self.function_sums.items():
            if n:
                mean = total / n
                out[f"rewards/{name}/mean"] = mean
                if n > 1:
                    out[f"rewards/{name}/std"] = max(0.0, (total_sq - n * mean * mean) / (n - 1)) ** 0.5
        return out

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
        # continuous engines: how full their steps were, and their loops' time out of steps: waiting for work and
        # loading weights (a request-batching engine's steps are not counted)
        engine = {"engine/steps": self.engine_steps, "engine/batch_mean": tokens / self.engine_steps,
                  "engine/idle_s": self.engine_idle_s, "engine/load_s": self.engine_load_s,
                  "engine/loads": self.engine_loads} if self.engine_steps else {}
        return env | engine | {
            "gen/groups": self.groups,
            "gen/active_generators": sum(1 for t in self.tokens.values() if t > 0),
            "gen/tokens": tokens,
            "time/gen_s": busy,
            "throughput/gen_tokens_per_s": tokens / busy if busy else 0.0,
            "idle/generator_frac": sum(g["rlfleet_generator_idle_frac"] for g in per_gen) / max(len(generators), 1),
            "errors/reward": self.reward_errors,
            "errors/reward_timeout": self.reward_timeouts,
            "errors/reward_lost": self.reward_lost,
            **self.reward_counts,
            **self.function_rewards(),
            "gen/dropped_groups": self.dropped,
            "sync/seconds": max(self.sync_s, default=0.0),
        }


class StepRecords:
    """One record per learner step, from the learner's result, the replay actor's figures, the window's and the
    job's own; ``resume_step``: the step a resumed job continues from (later lines are rewritten), None for a fresh
    run; ``replay``: the replay actor's figures at the start (its substitutions so far are not this run's)."""

    def __init__(self, cfg: RLFleetConfig, series: dict[str, tuple[str, str]], resume_step: int | None,
                 replay: dict[str, float]):
        self.multi_turn, self.groups_per_step = cfg.algorithm.environment is not None, cfg.learner.groups_per_step
        self.outputs = StepOutputs(cfg, series, resume_step, RL_GENERATOR_SERIES, per_function=True)
        self.batches = MetricsLog(cfg.output_dir, resume_step=resume_step, name="batches.jsonl")
        self.progress = Progress(cfg.learner.max_steps, cfg.logging.progress, cfg.logging.log_every,
                                 start=resume_step or 0)
        self.window = StepWindow(multi_turn=self.multi_turn)
        self.last: dict = {}
        self.t_step = time.perf_counter()
        self.substituted_before = replay["replay/substituted"]

    def write(self, step: int, version: int, result, replay: dict[str, float], generators: list[int], job: dict,
              now: float) -> dict:
        """Step ``step``'s record (trained into ``version``) from the learner's ``result``, ``replay`` (the
        replay actor's figures), the window of ``generators`` (the active ones) and ``job`` (the job's counters);
        written everywhere it goes. Returns it."""
        metrics = dict(result.metrics)
        wall_s, learner_s = now - self.t_step, metrics.pop("time/step_s")
        substituted_last = self.last.get("replay/substituted", self.substituted_before)
        record = {"step": step, **metrics, "policy_version": version, **replay,
                  "replay/size": replay["replay/fresh_size"] + replay["replay/reservoir_size"],
                  "replay/substituted_step": replay["replay/substituted"] - substituted_last,
                  **self.window.metrics(wall_s, generators), **job,
                  "time/step_s": wall_s, "time/learner_s": learner_s,
                  "idle/learner_frac": max(0.0, 1.0 - learner_s / wall_s), "learner/groups": self.groups_per_step}
        self.outputs.write(record, result.samples, self.window.per_generator(wall_s, generators))
        self.t_step, self.window, self.last = now, StepWindow(multi_turn=self.multi_turn), record
        self.batches.write({"step": step, "policy_version": version, "prompt_record_ids": result.prompt_record_ids})
        self.progress.update(record)
        return record

    def close(self) -> None:
        self.outputs.close()
