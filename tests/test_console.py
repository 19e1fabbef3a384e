"""What a person sees: the quickstart through the real command line in a subprocess, its console counted line by
line. rlfleet's own progress, a rate over recent steps, no engine chatter (issue 18)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from rlfleet.cluster import metrics
from rlfleet.cluster.metrics import Progress, window_rate
from tests.test_cli_failures import ENV, QUICKSTART, ROOT

PROGRESS = re.compile(r"^rlfleet: step (\d+)/(\d+)  reward (\d\.\d{3}) \((?:step \d+|steps \d+-\d+)\)  "
                      r"length (\d+\.\d)  loss (-?\d+\.\d{4})  staleness (\d\.\d\d)  (\d+\.\d) groups/s  (\d+\.\d\d) s/step  "
                      r"eta (\d+)m(\d\d)s$")


def test_window_rate_by_hand():
    """Marks (t=10 s, step 5, 20 groups) ... (t=14 s, step 9, 36 groups): 16 groups in 4 s = 4 groups/s, 4 s over
    4 steps = 1 s/step; a cumulative average from t=0 would say 36 / 14 = 2.6."""
    assert window_rate([(10.0, 5, 20), (12.0, 7, 28), (14.0, 9, 36)]) == (4.0, 1.0)
    assert window_rate([(10.0, 5, 20)]) is None and window_rate([]) is None


def test_plain_lines_every_log_every_steps_and_warnings_stand_out(monkeypatch, capsys):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    progress = Progress(total=4, mode="plain", every=2, window=2)
    for step in range(1, 5):
        progress.update({"step": step, "reward/mean": 0.25 * step, "loss": -0.25, "staleness/mean": 1.0,
                         "learner/groups": 4, "completions/mean_length": 2.0 * step})
        if step == 3:
            metrics.warn("rlfleet-generator-0 died")
    lines = capsys.readouterr().out.splitlines()
    # the reward of steps 1-2: (0.25 + 0.5) / 2; their completion length: (2 + 4) / 2
    assert lines[0] == ("rlfleet: step 2/4  reward 0.375 (steps 1-2)  length 3.0  loss -0.2500  staleness 1.00  4.0 groups/s  "
                        "1.00 s/step  eta 0m02s")
    assert lines[1] == "rlfleet: WARNING: rlfleet-generator-0 died"
    assert PROGRESS.match(lines[2]) and len(lines) == 3
    assert "reward 0.875 (steps 3-4)  length 7.0" in lines[2]  # (0.75 + 1.0) / 2, (6 + 8) / 2: the window moved on


def test_window_reward_and_trailing_mean_by_hand():
    assert metrics.window_reward([(7, 0.5)]) == "0.500 (step 7)"
    assert metrics.window_reward([(3, 0.2), (4, 0.4), (6, 0.9)]) == "0.500 (steps 3-6)"  # step 5 had no reward
    assert metrics.window_reward([]) == "nan"
    assert metrics.trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert metrics.trailing_mean([2.0, 4.0, 9.0], 5) == [2.0, 3.0, 5.0]


def test_the_step_record_has_each_reward_functions_mean_and_std_by_hand():
    """Two requests' stats for function f: samples [1, 2, 3] and [5] (n 3 + 1, sum 6 + 5, sum of squares 14 + 25):
    mean 11 / 4 = 2.75, std sqrt((39 - 4 * 2.75^2) / 3) = sqrt(8.75 / 3) = 1.707825 (Bessel, as TRL's); g has one
    sample: a mean and no std."""
    from rlfleet.cluster.records import StepWindow

    window = StepWindow()
    window.add(0, {"rewards/f/n": 3.0, "rewards/f/sum": 6.0, "rewards/f/sum_sq": 14.0, "rewards/g/n": 1.0,
                   "rewards/g/sum": 0.5, "rewards/g/sum_sq": 0.25})
    window.add(1, {"rewards/f/n": 1.0, "rewards/f/sum": 5.0, "rewards/f/sum_sq": 25.0})
    record = window.metrics(1.0, [0, 1])
    assert record["rewards/f/mean"] == 2.75 and record["rewards/f/std"] == pytest.approx(1.707825, abs=1e-6)
    assert record["rewards/g/mean"] == 0.5 and "rewards/g/std" not in record
    assert not [k for k in record if k.endswith(("/n", "/sum", "/sum_sq"))]


def test_the_continuous_engines_mean_batch_is_tokens_over_steps():
    """Two continuous engines' stats: 300 + 100 tokens in 20 + 30 engine steps: a mean batch of 400 / 50 = 8; their
    loops' idle and load seconds and loads add up; a window of request-batching engines (no steps counted) has none
    of these keys."""
    from rlfleet.cluster.records import StepWindow

    window = StepWindow()
    window.add(0, {"gen/tokens": 300.0, "engine/steps": 20.0, "engine/busy_s": 0.1, "engine/idle_s": 0.25,
                   "engine/load_s": 0.5, "sync/inflight_loads": 1.0})
    window.add(1, {"gen/tokens": 100.0, "engine/steps": 30.0, "engine/busy_s": 0.1, "engine/idle_s": 0.125,
                   "engine/load_s": 0.25, "sync/inflight_loads": 2.0})
    record = window.metrics(1.0, [0, 1])
    assert record["engine/steps"] == 50 and record["engine/batch_mean"] == 8.0
    assert (record["engine/idle_s"], record["engine/load_s"], record["engine/loads"]) == (0.375, 0.75, 3)
    batched = StepWindow()
    batched.add(0, {"gen/tokens": 300.0, "gen/seconds": 0.2})
    assert not {"engine/steps", "engine/batch_mean", "engine/idle_s", "engine/load_s", "engine/loads"
                } & set(batched.metrics(1.0, [0]))


def test_the_bar_is_ended_before_a_line(monkeypatch, capsys):
    err = io.StringIO()
    monkeypatch.setattr(metrics.sys, "stderr", err)
    progress = Progress(total=10, mode="bar")
    progress.update({"step": 1, "reward/mean": 0.5, "loss": 0.0, "learner/groups": 4})
    metrics.console("rlfleet-generator-1 joined the fleet")
    assert err.getvalue().startswith("\r[###") and err.getvalue().endswith("\n")
    assert capsys.readouterr().out == "rlfleet: rlfleet-generator-1 joined the fleet\n"


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_quickstart_console_and_learning(tmp_path):
    """README's main job, 120 steps, as a user runs it. The reward on target_length rises as the model learns to stop
    (measured: ~0.47 over the first 20 steps, ~0.72 over the last). The console holds rlfleet's lines only (start-up,
    one progress line per 10 steps, the end): no vLLM INFO line, no "Failed to load weights", no torch NUMA note, no
    traceback; under 25 lines in all (about 500 before issue 18)."""
    out = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "rlfleet.cli", "train", QUICKSTART, f"output_dir={out}",
                           "learner.max_steps=120", "logging.plot=false"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    progress = [m for m in map(PROGRESS.match, lines) if m]
    assert [int(m[1]) for m in progress] == list(range(10, 121, 10)) and all(m[2] == "120" for m in progress)
    assert all(float(m[7]) > 0 for m in progress)
    foreign = [line for line in lines if not line.startswith("rlfleet: ")]
    assert not foreign and len(lines) < 25, lines  # torch's NUMA note in the engine's process included
    assert not [line for line in lines if re.search(r"\bINFO\b|Failed to load weights|Traceback", line)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["reward/mean"] for r in records}
    lengths = {r["step"]: r["completions/mean_length"] for r in records}
    for line in lines:  # the console's reward and completion length are the means of the steps it names
        if m := re.search(r"reward (\d\.\d{3}) \(steps (\d+)-(\d+)\)  length (\d+\.\d)", line):
            steps = range(int(m[2]), int(m[3]) + 1)
            assert float(m[1]) == pytest.approx(np.mean([by_step[k] for k in steps]), abs=5e-4), line
            assert float(m[4]) == pytest.approx(np.mean([lengths[k] for k in steps]), abs=0.05), line
    first = np.mean([r["reward/mean"] for r in records[:20]])
    last = np.mean([r["reward/mean"] for r in records[-20:]])
    assert last > first + 0.1, (first, last)


def test_a_kill_landing_in_a_finalizer_prints_nothing_and_other_finalizer_errors_still_print():
    """An actor's process after quiet_kill_in_finalizers(): a SystemExit raised inside a __del__ (what Ray's SIGTERM
    handler does when a kill lands while an ActorHandle is released) prints no traceback, so none reaches the job's
    console; a ValueError raised in a __del__ is still printed. Run in a process of its own (the hook is global)."""
    script = """
import gc
from rlfleet.errors import quiet_kill_in_finalizers

class Killed:
    def __del__(self):
        raise SystemExit(1)

class Broken:
    def __del__(self):
        raise ValueError("a real finalizer bug")

quiet_kill_in_finalizers()
Killed(); Broken(); gc.collect()
print("still running")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "still running", proc.stderr
    assert "SystemExit" not in proc.stderr and "Killed.__del__" not in proc.stderr
    assert "ValueError: a real finalizer bug" in proc.stderr and "Broken.__del__" in proc.stderr
