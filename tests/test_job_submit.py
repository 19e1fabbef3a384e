"""`ray job submit` against a real Ray head on loopback, as README's recipe does it.

The head is started once for the module with README's recipe, scripts/local_head.py (every Ray port on 127.0.0.1, a
fixed metrics export port, and a real Prometheus scraping it every second where Prometheus is installed) and stopped
at the end whatever happens: after a failed test, and after a start that failed or timed out part-way (`local_head.py
stop` finds every process the head started, however far the start got); the stop itself is checked. Token
authentication is disabled here only because the test does not exercise it (platform-notes); deploy/ keeps it on.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
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
    """README's recipe for a local head: scripts/local_head.py (Ray on loopback, with Prometheus where installed)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    # every port explicit: the defaults (e.g. the dashboard agent's 52365) may be held by another Ray on the machine,
    # and a head whose agent cannot bind never accepts jobs ("No available agent")
    ports = {name: free_port() for name in ("gcs", "dashboard", "metrics", "agent_http", "agent_grpc", "runtime_env",
                                           "client", "prometheus")}
    temp = tmp_path_factory.mktemp("ray")
    start = [sys.executable, str(ROOT / "scripts" / "local_head.py"), "start", f"--dir={temp}",
             f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}", f"--metrics-port={ports['metrics']}",
             f"--client-port={ports['client']}", f"--prometheus-port={ports['prometheus']}", "--scrape-interval=1s",
             "--num-cpus=4", "--json", "--",
             f"--dashboard-agent-listen-port={ports['agent_http']}",
             f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}"]
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        state = json.loads(started.stdout)
        yield {"env": env, "address": state["dashboard"], "metrics": ports["metrics"], "client": ports["client"],
               "dir": temp, "prometheus": state.get("prometheus")}
    finally:  # also after a start that failed or timed out part-way: stop finds what it did start
        stopped = subprocess.run([sys.executable, str(ROOT / "scripts" / "local_head.py"), "stop", f"--dir={temp}"],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def head_status(head) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "local_head.py"), "status", f"--dir={head['dir']}",
                          "--json"], env=head["env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def ray_cli(head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=head["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def submit(head, run: str, *entrypoint: str) -> str:
    """README's `ray job submit --no-wait`, with a submission id and metadata naming the run (what the Jobs page
    lists). While the head's job agent is still starting, Ray answers "No available agent to submit job, please try
    again later", so that answer (and only that one) is retried until a deadline."""
    submission_id = f"rlfleet-{run}-{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + 120
    while True:
        out = ray_cli(head, "job", "submit", "--address", head["address"], "--working-dir", ".", "--runtime-env",
                      "deploy/runtime_env.yaml", "--submission-id", submission_id, "--metadata-json",
                      json.dumps({"rlfleet.run": run}), "--no-wait", "--", *entrypoint, timeout=120)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert out.returncode == 0, out.stderr
    return submission_id


def job_logs(head, job_id: str) -> str:
    return ray_cli(head, "job", "logs", "--address", head["address"], job_id).stdout


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


def prometheus_query(head, query: str, at: float | None = None) -> list[dict]:
    params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
    url = f"{head['prometheus']}/api/v1/query?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def samples(head, name: str, run: str) -> list[tuple[float, float]]:
    """Every sample Prometheus holds of ``ray_<name>{run=...}`` over the last hour: (timestamp, value)."""
    result = prometheus_query(head, f'ray_{name}{{run="{run}"}}[1h]')
    return [(float(t), float(v)) for series in result for t, v in series["values"]]


def dashboard_queries() -> list[str]:
    """The PromQL of every panel of deploy/grafana-dashboard.json, with Grafana's variables filled in."""
    board = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_job_submit_trains(head, tmp_path):
    out_dir = tmp_path / "job"
    job_id = submit(head, "job", "python", "-m", "rlfleet.cli", "train", "deploy/quickstart.yaml",
                    "learner.max_steps=25", f"output_dir={out_dir}", "logging.plot=false")
    status = job_end(head, job_id, 300)
    logs = job_logs(head, job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 26))
    assert (out_dir / "checkpoints" / "step-25" / "COMPLETE").is_file()
    # the Jobs page names the run
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(head["address"]).get_job_info(job_id).metadata["rlfleet.run"] == "job"
    # the log the Jobs page shows: rlfleet's lines, without the known-benign engine and Ray warnings
    assert "rlfleet: step 25/25" in logs and "rlfleet: done at step 25" in logs
    for noise in ("Failed to load weights", "constructor arguments in the object store", "set_num_threads",
                  "Loading weights", "Loading safetensors checkpoint shards"):
        assert noise not in logs, noise
    assert not re.search(r"\bINFO \d\d-\d\d ", logs), "vLLM INFO lines in the job's log"  # vLLM's own format


def test_prometheus_charts_a_running_job_then_job_stop_checkpoints(head, tmp_path):
    """A real Prometheus (scripts/local_head.py) scrapes rlfleet's series from the head while a job runs; each value
    it holds is one the job wrote to metrics.jsonl at some step; every query of deploy/grafana-dashboard.json
    answers; every port of the head listens on loopback. Then `ray job stop` leaves a final checkpoint."""
    from rlfleet.cluster.metrics import (EVAL_SERIES, MULTI_TURN_SERIES, ONLINE_DPO_SERIES, REWARD_FUNCTION_SERIES,
                                         RL_GENERATOR_SERIES, rl_series)

    if head["prometheus"] is None:
        pytest.skip("prometheus is not installed (scripts/setup.sh --test installs it with apt-get)")
    run, out_dir = "charted", tmp_path / "charted"
    job_id = submit(head, run, "python", "-m", "rlfleet.cli", "train", "deploy/quickstart.yaml",
                    "learner.max_steps=100000", "checkpoint.save_steps=100000", f"output_dir={out_dir}",
                    "logging.plot=false")
    series = {**rl_series(beta=0.0), **{n: (None, d) for n, d in RL_GENERATOR_SERIES.items()},
              **{n: (None, d) for n, d in REWARD_FUNCTION_SERIES.values()}}  # tagged by function

    def every_series_scraped():
        if job_status(head, job_id) in ("FAILED", "STOPPED", "SUCCEEDED"):
            pytest.fail(job_logs(head, job_id)[-3000:])
        steps = samples(head, "rlfleet_step", run)
        # 3 scrapes of every series (1 s apart while the job runs, which is until we stop it): rate() and increase()
        # in the dashboard's queries need 2 samples in their window
        return (steps and max(v for _, v in steps) >= 3
                and all(len(samples(head, name, run)) >= 3 for name in series))

    wait_for(every_series_scraped, 300, "Prometheus to hold 3 scrapes of every rlfleet series of the run")
    # every process of the head (GCS, raylet, agents, workers, the job's driver, Prometheus) listens on loopback
    listening = head_status(head)["listening"]
    assert {s["port"] for s in listening} >= {int(head["address"].rsplit(":", 1)[1]), head["metrics"]}
    assert head["client"] in {s["port"] for s in listening}  # Ray's client server: on loopback, and stop finds it
    assert [s for s in listening if s["ip"].removeprefix("::ffff:") not in ("127.0.0.1", "::1")] == []

    assert ray_cli(head, "job", "stop", "--address", head["address"], job_id, timeout=180).returncode == 0
    assert job_end(head, job_id, 180) == "STOPPED"
    checkpoints = sorted((out_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert checkpoints, "ray job stop must leave a final checkpoint; the job's log ends:\n" + job_logs(head, job_id)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    step = json.loads((checkpoints[-1].parent / "driver.json").read_text())["step"]
    assert step >= 3 and step == records[-1]["step"]

    # Prometheus's values are the job's own: each sample equals the series' key at some step (exactly: a float64
    # travels unchanged from the gauge through Ray's exporter to Prometheus)
    for name, (key, _) in series.items():
        values = {v for _, v in samples(head, name, run)}
        assert values, name
        if key is None:  # per generator: computed from the step's window, not a metrics.jsonl key
            assert all(math.isfinite(v) and v >= 0 for v in values), (name, values)
            continue
        written = {float(r[key]) for r in records}
        assert values <= written, (name, sorted(values - written)[:5])
    assert {v for _, v in samples(head, "rlfleet_reward_errors_total", run)} == {0.0}  # a healthy run: 0, exported

    # every panel of the Grafana dashboard finds data for this run (names and PromQL checked by Prometheus itself)
    at = max(t for t, _ in samples(head, "rlfleet_step", run))
    exported = {f"ray_{name}" for name in series}
    for expr in dashboard_queries():
        if not set(re.findall(r"ray_rlfleet_\w+", expr)) <= exported:
            # beta = 0: no KL series; the DPO panels are for `rlfleet dpo` and online DPO jobs, the environment's for
            # multi-turn, the held-out reward's for jobs with evaluation
            assert set(re.findall(r"ray_rlfleet_\w+", expr)) <= {"ray_rlfleet_kl", "ray_rlfleet_dpo_eval_accuracy",
                                                                 *(f"ray_{n}" for n in ONLINE_DPO_SERIES),
                                                                 *(f"ray_{n}" for n in EVAL_SERIES),
                                                                 *(f"ray_{n}" for n in MULTI_TURN_SERIES)}, expr
            continue
        query = expr.replace("$run", run).replace("$__rate_interval", "1m").replace("$__range", "1h")
        assert prometheus_query(head, query, at), query

    # the actors are gone
    actors = ray_cli(head, "list", "actors", "--address", head["address"], "--filter", "state=ALIVE", "--format",
                     "json")
    assert actors.returncode == 0, actors.stderr
    alive = [] if actors.stdout.startswith("No resource") else json.loads(actors.stdout)  # the CLI's empty answer
    assert [a for a in alive if (a.get("name") or "").startswith("rlfleet")] == []


def test_job_submit_runs_dpo(head, tmp_path):
    out_dir = tmp_path / "dpo"
    job_id = submit(head, "dpo", "python", "-m", "rlfleet.cli", "dpo", "deploy/dpo_quickstart.yaml",
                    "learner.max_steps=6", f"output_dir={out_dir}", "logging.plot=false")
    status = job_end(head, job_id, 300)
    assert status == "SUCCEEDED", ray_cli(head, "job", "logs", "--address", head["address"], job_id).stdout[-3000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6
    assert (out_dir / "bema" / "config.json").is_file()  # the BEMA-averaged weights in Hugging Face format
