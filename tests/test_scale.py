"""``rlfleet scale`` against a running job: the fleet shrinks (draining, nothing lost) and grows on request.

Generation here uses the fixed-latency stand-in engine (``bench/standin.py``) inside rlfleet's own generation
actors: what is under test is the pool, the control actor and the command line, not generation (the elastic test
runs the same pool with real vLLM engines). The job runs in its own namespace, as under ``ray job submit``, so the
command line finds it by name from another process.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlfleet.cluster.runtime import job_namespace
from rlfleet.config import load_config
from tests.conftest import ray_test_env
from tests.test_elastic import prompt_ledger
from tests.test_faults import records_of, stop_and_join, train_in_thread, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
JOB = "scaletest"


@pytest.fixture(scope="module")
def job_cluster():
    import ray

    with ray_test_env():
        ray.init(num_cpus=4, include_dashboard=False, namespace=job_namespace(JOB))
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


def rlfleet_scale(address: str, generators: int, job: str = JOB) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlfleet.cli", "scale", "--address", address, "--job", job,
                           "--generators", str(generators)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_rlfleet_scale_shrinks_and_grows_a_running_job(job_cluster, tmp_path):
    from bench.standin import fixed_latency

    cfg = load_config(ROOT / "deploy" / "grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", f"cluster.job_name={JOB}", "learner.max_steps=100000",
        "checkpoint.save_steps=100000", "logging.plot=false", "cluster.num_generators=2",
        "replay.zero_variance=keep", "replay.max_staleness=2", "generation.generation_batch_size=16",
        "learner.groups_per_step=2", "learner.micro_batch_size=16"])
    out = tmp_path / "run"

    missing = rlfleet_scale(job_cluster, 1, job="no-such-job")
    assert missing.returncode == 2 and "no running rlfleet job named 'no-such-job'" in missing.stderr, missing

    thread, result = train_in_thread(cfg, engine_factory=fixed_latency(0.2))
    try:
        wait_for(lambda: len(records_of(out)) >= 2 or not thread.is_alive(), 300, "two steps on two generators")
        assert thread.is_alive(), result
        assert records_of(out)[-1]["fleet/generators"] == 2

        done = rlfleet_scale(job_cluster, 1)
        assert done.returncode == 0 and "asked for 1 generator(s)" in done.stdout, done
        wait_for(lambda: records_of(out)[-1]["fleet/generators"] == 1 or not thread.is_alive(), 300,
                 "the fleet to shrink to one")
        shrunk_at = len(records_of(out))

        done = rlfleet_scale(job_cluster, 3)  # 4 CPUs: the learner and three generators
        assert done.returncode == 0, done
        wait_for(lambda: records_of(out)[-1]["fleet/generators"] == 3 or not thread.is_alive(), 300,
                 "the fleet to grow to three")
        assert thread.is_alive(), result
    finally:
        stop_and_join(thread)
    assert "error" not in result, result.get("error")

    records = records_of(out)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert records[shrunk_at - 1]["fleet/removed"] == 1  # scaled down: removed, not lost
    last = records[-1]
    assert (last["fleet/added"], last["fleet/removed"], last["fleet/generators"]) == (2 + 2, 1, 3)
    assert last["faults/lost_groups"] == 0  # draining lets a busy generator finish its request
    assert max(r["staleness/max"] for r in records) <= 2

    ledger = prompt_ledger(cfg, out)
    assert ledger["to_reissue"] == []
    assert Counter(ledger["trained"]) + Counter(ledger["queued"]) == Counter(ledger["issued"])


def test_closing_the_control_actor_answers_its_waiting_call(job_cluster):
    """The driver keeps a next_request call waiting on rlfleet-control; at the job's end close_control answers it, so
    the call ends as a finished task rather than one killed in flight (a "Failed" task on the dashboard of a run that
    went well). Without close it would still be waiting when the actor is killed."""
    import ray

    from rlfleet.cluster.control import close_control, start_control

    control = start_control()
    try:
        waiting = control.next_request.remote(0)
        assert ray.wait([waiting], timeout=0.5)[1] == [waiting]  # no request yet: it waits
        close_control(control)
        assert ray.get(waiting, timeout=30) == (0, {})  # answered, not killed
    finally:
        ray.kill(control, no_restart=True)
