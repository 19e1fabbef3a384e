"""Foreseeable failures end cleanly, through the real command line in a subprocess: one message, an exit code that
says which kind, no traceback (issue 21)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet.cli import EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_STOPPED, main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "deploy" / "quickstart.yaml")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
ENV.pop("RAY_ADDRESS", None)


def rlfleet(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlfleet.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout_s)


def string_reward(prompts, completions, **kwargs):
    """A broken reward function: strings instead of numbers."""
    return ["good"] * len(completions)


class BrokenTool:
    """A broken environment: its tool crashes on every call."""

    def __init__(self, **kwargs):  # the job's scripted-user replies, unused
        pass

    def setup_state(self, record):
        return {}

    def is_completed(self, messages, state):
        return False

    def env_response(self, messages, state):
        raise ConnectionError("tool server unreachable")


def test_a_broken_yaml_names_its_line_and_column(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("learner:\n  max_steps: 3\n   lr: [1\n")
    assert main(["config", str(job)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    # line 3 is "   lr: [1": its ':' (3 spaces, then "lr") is the 6th character, where YAML finds the problem
    assert f"config file '{job}', line 3, column 6: not valid YAML: mapping values are not allowed here" in err, err


def test_an_oversubscribed_local_fleet_is_refused_before_ray_starts(tmp_path):
    """64 generators on this machine: refused with the numbers (cores: 65 needed; memory: the estimate) before any
    Ray process starts (the driver announces a local cluster before it starts one)."""
    done = rlfleet("train", QUICKSTART, f"output_dir={tmp_path}", "cluster.num_generators=64", timeout_s=300)
    assert done.returncode == EXIT_BAD_INPUT, done.stdout + done.stderr
    assert "needs 65 CPUs to start (learner 1 + 64 generators x 1) but this machine has" in done.stderr
    assert "GiB of memory to start (learner" in done.stderr and "lower cluster.num_generators" in done.stderr
    assert "starting a local Ray cluster" not in done.stdout and "Traceback" not in done.stdout + done.stderr


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("after_line", ["starting a local Ray cluster", "starting 1 generation actor(s)"])
def test_ctrl_c_during_start_up_is_one_line_and_no_traceback(tmp_path, after_line):
    """SIGINT right after the driver says it is connecting, or starting the engines (which take seconds): the run
    ends with one line naming what was interrupted and exit 130, or, had start-up already finished, with its final
    checkpoint and exit 0; never a traceback, never two stop messages."""
    proc = subprocess.Popen([sys.executable, "-m", "rlfleet.cli", "train", QUICKSTART, f"output_dir={tmp_path}",
                             "logging.plot=false"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if after_line in line:
                proc.send_signal(signal.SIGINT)
                break
        output = "".join(lines) + proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert any(after_line in line for line in lines), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    stops = [line for line in output.splitlines() if line.startswith("rlfleet: stop")]
    assert len(stops) == 1, output[-3000:]
    if proc.returncode == EXIT_STOPPED:
        assert "stopped while" in stops[0] and "nothing was trained" in stops[0], stops
    else:
        assert proc.returncode == 0 and "writing a final checkpoint" in stops[0], (proc.returncode, stops)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_failing_reward_functions_stop_the_run_with_one_message(tmp_path):
    done = rlfleet("train", QUICKSTART, f"output_dir={tmp_path}", "logging.plot=false",
                   "algorithm.reward_funcs=[tests.test_cli_failures:string_reward]")
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_RUN_FAILED, output[-3000:]
    assert "the run stopped: reward or group-filter functions failed on" in done.stderr, output[-3000:]
    assert "Fix the function, or raise the limit" in done.stderr
    assert "string_reward failed: ValueError" in output  # the generator names the function and its error once
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_a_reward_function_that_never_returns_ends_at_its_timeout(tmp_path):
    """Every call hangs: each ends at algorithm.reward_timeout_s (its worker killed and started again), its groups are
    dropped and counted, and past max_reward_error_frac the run stops with one message instead of hanging."""
    done = rlfleet("train", QUICKSTART, f"output_dir={tmp_path}", "logging.plot=false",
                   "algorithm.reward_funcs=[tests.worker_rewards:hang_always]", "algorithm.reward_timeout_s=1")
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_RUN_FAILED, output[-3000:]
    assert "the run stopped: reward or group-filter functions failed on" in done.stderr, output[-3000:]
    assert "reward function hang_always failed: no answer within algorithm.reward_timeout_s=1 s" in output
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_a_failing_environment_stops_the_run_past_the_error_share(tmp_path):
    """Every episode's environment fails: each group is dropped and counted, and past max_reward_error_frac of the
    groups (16 at least) the run stops with one message, no traceback."""
    done = rlfleet("train", str(ROOT / "deploy" / "multi_turn.yaml"), f"output_dir={tmp_path}", "logging.plot=false",
                   "algorithm.environment=tests.test_cli_failures:BrokenTool")
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_RUN_FAILED, output[-3000:]
    assert "the run stopped: reward or group-filter functions or the environment failed on" in done.stderr, output
    assert "the environment: " in done.stderr and "Fix the function or the environment" in done.stderr
    assert "BrokenTool failed an episode: is_completed / env_response: ConnectionError: tool server unreachable" \
        in output  # the generator names the environment and its error once
    assert output.count("tool server unreachable") == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
