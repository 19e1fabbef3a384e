"""`ray job submit` against a real Ray head on loopback, as README's recipe does it.

The head is started once for the module with `ray start --head` (dashboard and job server on 127.0.0.1, a fixed
Prometheus metrics port) and stopped at the end whatever happens. Token authentication is disabled here only because
the test does not exercise it (platform-notes); deploy/ keeps it on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    # every port explicit: the defaults (e.g. the dashboard agent's 52365) may be held by another Ray on the machine,
    # and a head whose agent cannot bind never accepts jobs ("No available agent")
    ports = {name: free_port() for name in ("gcs", "dashboard", "metrics", "agent_http", "agent_grpc", "runtime_env")}
    temp = tmp_path_factory.mktemp("ray")
    start = [str(BIN / "ray"), "start", "--head", f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={ports['dashboard']}", f"--metrics-export-port={ports['metrics']}",
             f"--dashboard-agent-listen-port={ports['agent_http']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
             f"--runtime-env-agent-port={ports['runtime_env']}", "--num-cpus=4",
             f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{ports['dashboard']}", "metrics": ports["metrics"]}
    finally:
        stop_head(temp)


def stop_head(temp: Path) -> None:
    """Stop this head's processes only (`ray stop` would stop every Ray on the machine): those whose command line
    names the head's temp dir (gcs, raylet, dashboard, workers)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp) in part for part in p.info["cmdline"] or []):
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()


def ray_cli(head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=head["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def submit(head, *entrypoint: str) -> str:
    """`ray job submit --no-wait`; while the head's job agent is still starting, Ray answers "No available agent to
    submit job, please try again later", so that answer (and only that one) is retried until a deadline."""
    deadline = time.monotonic() + 120
    while True:
        out = ray_cli(head, "job", "submit", "--address", head["address"], "--working-dir", ".", "--runtime-env",
                      "deploy/runtime_env.yaml", "--no-wait", "--", *entrypoint, timeout=120)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert out.returncode == 0, out.stderr
    job_id = next(line.split("'")[1] for line in out.stdout.splitlines() if "submitted successfully" in line)
    return job_id


def job_status(head, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(head["address"]).get_job_status(job_id).value)


def job_end(head, job_id: str, timeout_s: float) -> str:
    return wait_for(lambda: (s := job_status(head, job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s, timeout_s,
                    f"job {job_id} to end")


def wait_for(predicate, timeout_s: float, what: str):
    """Poll an observable condition until it holds or the deadline passes (bounded; not a sleep around a race)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_job_submit_trains_and_exports_metrics(head, tmp_path):
    out_dir = tmp_path / "job"
    job_id = submit(head, "python", "-m", "rlfleet.cli", "train", "deploy/quickstart.yaml", "learner.max_steps=25",
                    f"output_dir={out_dir}", "logging.plot=false")
    # rlfleet's Ray metrics reach the head's Prometheus endpoint (what the dashboard and Grafana read) while it runs
    def metrics_or_end():
        if job_status(head, job_id) in ("FAILED", "STOPPED"):
            pytest.fail(ray_cli(head, "job", "logs", "--address", head["address"], job_id).stdout[-3000:])
        text = scrape(head["metrics"])
        return "ray_rlfleet_reward_mean" in text and text

    text = wait_for(metrics_or_end, 300, "ray_rlfleet_reward_mean on the metrics endpoint")
    assert 'run="job"' in text
    for name in ("ray_rlfleet_loss", "ray_rlfleet_staleness_mean", "ray_rlfleet_replay_fresh_size",
                 "ray_rlfleet_gen_tokens_per_s", "ray_rlfleet_learner_idle_frac"):
        assert name in text, name
    status = job_end(head, job_id, 300)
    assert status == "SUCCEEDED", ray_cli(head, "job", "logs", "--address", head["address"], job_id).stdout[-3000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 26))
    assert (out_dir / "checkpoints" / "step-25" / "COMPLETE").is_file()


def test_job_stop_leaves_a_final_checkpoint(head, tmp_path):
    out_dir = tmp_path / "stopped"
    job_id = submit(head, "python", "-m", "rlfleet.cli", "train", "deploy/quickstart.yaml", "learner.max_steps=100000",
                    "checkpoint.save_steps=100000", f"output_dir={out_dir}", "logging.plot=false")
    metrics = out_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 300, "three learner steps")
    assert ray_cli(head, "job", "stop", "--address", head["address"], job_id, timeout=180).returncode == 0
    assert job_end(head, job_id, 180) == "STOPPED"
    checkpoints = sorted((out_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert checkpoints, ("ray job stop must leave a final checkpoint; the job's log ends:\n" +
                         ray_cli(head, "job", "logs", "--address", head["address"], job_id).stdout[-3000:])
    step = json.loads((checkpoints[-1].parent / "driver.json").read_text())["step"]
    assert step >= 3 and step == json.loads(metrics.read_text().splitlines()[-1])["step"]
    # the actors are gone
    actors = ray_cli(head, "list", "actors", "--address", head["address"], "--filter", "state=ALIVE", "--format",
                     "json")
    assert actors.returncode == 0, actors.stderr
    alive = [] if actors.stdout.startswith("No resource") else json.loads(actors.stdout)  # the CLI's empty answer
    assert [a for a in alive if (a.get("name") or "").startswith("rlfleet")] == []


def test_job_submit_runs_dpo(head, tmp_path):
    out_dir = tmp_path / "dpo"
    job_id = submit(head, "python", "-m", "rlfleet.cli", "dpo", "deploy/dpo_quickstart.yaml", "learner.max_steps=6",
                    f"output_dir={out_dir}", "logging.plot=false")
    status = job_end(head, job_id, 300)
    assert status == "SUCCEEDED", ray_cli(head, "job", "logs", "--address", head["address"], job_id).stdout[-3000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6
    assert (out_dir / "bema" / "config.json").is_file()  # the BEMA-averaged weights in Hugging Face format
