"""`rlfleet train` end to end: real vLLM generation actors, replay actor and learner actor on a local Ray cluster.

One Ray cluster serves the module; each run starts its own actors (a generator's engine costs ~20 s to start).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.driver import train
from rlfleet.cluster.metrics import REQUIRED_KEYS, rl_series
from rlfleet.config import load_config
from tests.test_reporting import tensorboard_scalars, tensorboard_texts

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ALGORITHM_JOBS = ["grpo", "bnpo", "dr_grpo", "dapo_sync", "gspo", "gspo_token", "gfpo", "grpo_kl"]


def run(tmp_path: Path, job: str, *overrides: str) -> list[dict]:
    cfg = load_config(DEPLOY / f"{job}.yaml", [f"output_dir={tmp_path / job}", "logging.plot=false", *overrides])
    train(cfg)
    return [json.loads(line) for line in (tmp_path / job / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("job", ALGORITHM_JOBS)
def test_every_algorithm_config_trains(ray_cluster, tmp_path, job):
    records = run(tmp_path, job, "learner.max_steps=3", "checkpoint.save_steps=100")
    cfg = load_config(DEPLOY / f"{job}.yaml")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(k in r for k in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert math.isfinite(r["loss"]), r
        # every Ray series of the job has its value at every step, the first included (README: "from the first step")
        for name, (key, _) in rl_series(cfg.algorithm.beta).items():
            assert key in r and math.isfinite(r[key]), (name, key)
        assert r["staleness/max"] <= cfg.replay.max_staleness
        assert r["learner/sequences"] == cfg.learner.groups_per_step * cfg.group_size  # GFPO: k per group
    # weights reached the generators: the version advanced and later groups were sampled by newer weights
    assert [r["policy_version"] for r in records] == [1, 2, 3]
    assert any(r["sync/seconds"] > 0 for r in records)
    final = ckpt.latest_checkpoint(tmp_path / job)
    assert final is not None and final.name == "step-3"
    assert (final / "policy" / "model.safetensors").is_file()


@pytest.mark.parametrize("job, rise", [("cispo", 0.08), ("sapo", 0.05)])
def test_cispo_and_sapo_jobs_learn(ray_cluster, tmp_path, job, rise):
    """deploy/cispo.yaml (target_length) and deploy/sapo.yaml (char_count) as shipped, 100 steps: the mean reward of
    the last 20 steps exceeds that of the first 20 (measured: cispo 0.49 -> 0.64 at its learning rate of 2e-3, whose
    3e-3 had collapsed late on an AVX2-only CPU; sapo 0.010 -> 0.140), and every
    step has its required keys and Ray series."""
    records = run(tmp_path, job, "checkpoint.save_steps=100")
    cfg = load_config(DEPLOY / f"{job}.yaml")
    assert [r["step"] for r in records] == list(range(1, 101))
    for r in records:
        assert all(k in r for k in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        for name, (key, _) in rl_series(cfg.algorithm.beta).items():
            assert key in r and math.isfinite(r[key]), (name, key)
    first = sum(r["reward/mean"] for r in records[:20]) / 20
    last = sum(r["reward/mean"] for r in records[-20:]) / 20
    assert last > first + rise, (first, last)


@pytest.mark.parametrize("engine", ["batched", "continuous"])
def test_synchronous_mode_is_exactly_on_policy(ray_cluster, tmp_path, engine):
    """max_staleness 0: every batch was sampled by the weights being trained, so pi_theta / pi_behaviour is 1 up to
    the float error between vLLM's and the learner's forward passes (measured ~5e-7 in fp32). If a generator ever
    sampled with old weights, the ratio after the first step would move by the size of an update (~1e-1 here).
    The continuous engine too: its loop's log-probs, and the version its requests wait for."""
    records = run(tmp_path, "dapo_sync", "learner.max_steps=4", "replay.zero_variance=keep",
                  f"generation.engine={engine}")
    assert [r["staleness/max"] for r in records] == [0, 0, 0, 0]
    for r in records:
        assert abs(r["ratio/min"] - 1) < 1e-4 and abs(r["ratio/max"] - 1) < 1e-4, r
        assert r["clip/frac"] == 0.0


def test_synchronous_bfloat16_job_on_cpu_is_on_policy_within_bfloat16_error(ray_cluster, tmp_path):
    """model.dtype bfloat16 on CPU: the engine samples in bfloat16 with the weights the learner publishes in bfloat16,
    the learner computes under bfloat16 autocast (attention in float32). On policy, pi_theta / pi_behaviour stays
    within 0.03 of 1: measured within 0.008 (two bfloat16 forward passes by different kernels). Weights one version
    stale (max_staleness 1) were measured to move it to 0.3 and 2.7, and wrong bytes in the engine would move it
    further."""
    records = run(tmp_path, "dapo_sync", "learner.max_steps=3", "replay.zero_variance=keep", "model.dtype=bfloat16")
    assert [r["staleness/max"] for r in records] == [0, 0, 0]
    for r in records:
        assert abs(r["ratio/min"] - 1) < 0.03 and abs(r["ratio/max"] - 1) < 0.03, r
        assert math.isfinite(r["loss"])


@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_a_bfloat16_engine_beside_a_float32_learner_is_on_policy_within_its_rounding(ray_cluster, tmp_path,
                                                                                     transport):
    """generation.dtype: bfloat16 with the float32 learner (model.dtype auto on CPU), synchronous: the engine samples
    with the published weights rounded to bfloat16 (cast as they are packed), the learner computes in float32. The
    ratio pi_theta / pi_behaviour then stays within 0.03 of 1 (measured within 0.006: the rounding of the engine's
    weights and kernels), and it is not within 1e-4 (so the engine does run in bfloat16: a float32 engine gives 1
    within 1e-4, the test above). Weights one version stale were measured to move the ratio to 0.3 and beyond."""
    records = run(tmp_path, "dapo_sync", "learner.max_steps=3", "replay.zero_variance=keep",
                  "generation.dtype=bfloat16", f"cluster.weight_transport={transport}")
    assert [r["staleness/max"] for r in records] == [0, 0, 0]
    for r in records:
        assert abs(r["ratio/min"] - 1) < 0.03 and abs(r["ratio/max"] - 1) < 0.03, r
        assert math.isfinite(r["loss"])
    assert max(max(abs(r["ratio/min"] - 1), abs(r["ratio/max"] - 1)) for r in records) > 1e-4


def test_async_staleness_never_exceeds_bound(ray_cluster, tmp_path):
    records = run(tmp_path, "grpo", "learner.max_steps=8", "replay.max_staleness=2",
                  "generation.generation_batch_size=16", "learner.groups_per_step=2")
    assert max(r["staleness/max"] for r in records) <= 2
    # Asynchrony really happens: a synchronous implementation would train every group at staleness 0. Here the
    # next request is sent as soon as a generator delivers, before the learner has trained on what it delivered,
    # so most batches are one version old (bench/async_vs_sync.py measures how much overlap that buys).
    assert max(r["staleness/max"] for r in records) >= 1


@pytest.mark.parametrize("transport, kv", [("object_store", "keep"), ("broadcast", "recompute")])
def test_continuous_generation_trains_within_the_bound_on_the_oldest_token(ray_cluster, tmp_path, transport, kv):
    """generation.engine: continuous at max_staleness 1, weights loaded in flight through either transport: every
    step trains, every group's oldest token is within the bound, no token lags more than its group's oldest, and
    one group spans at most the versions the bound allows (S + 1 = 2, so a span of at most 1)."""
    records = run(tmp_path, "grpo", "learner.max_steps=6", "replay.max_staleness=1", "generation.engine=continuous",
                  f"generation.kv_on_update={kv}", f"cluster.weight_transport={transport}")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["policy_version"] for r in records] == list(range(1, 7))
    for r in records:
        assert math.isfinite(r["loss"])
        assert r["staleness/max"] <= 1 and r["staleness/token_max"] <= r["staleness/max"]
        assert r["staleness/token_mean"] <= r["staleness/max"] and r["staleness/version_span_max"] <= 1
        assert 1 <= r["completions/min_length"] <= r["completions/mean_length"] <= r["completions/max_length"] <= 24


def test_the_token_staleness_unit_trains_no_token_past_the_bound(ray_cluster, tmp_path):
    """replay.staleness_unit: token at max_staleness 1, one group of 2 a step, completions up to 200 tokens (group
    lengths vary widely): admission waits for no group in flight, so a long group is trained after later, shorter
    ones, two publications after it started (measured: 2 of 12 steps). Whatever the scheduling, no *trained* token
    lags more than 1 (the learner masks older ones and reports their share), every step trains some tokens, and a
    step masks tokens exactly when one of its groups' oldest token is past the bound. (Which steps those are depends
    on scheduling; the bound must hold at every one.)"""
    records = run(tmp_path, "grpo", "learner.max_steps=16", "replay.max_staleness=1", "generation.engine=continuous",
                  "generation.kv_on_update=recompute", "replay.staleness_unit=token", "learner.groups_per_step=1",
                  "generation.num_generations=2", "generation.generation_batch_size=4",
                  "generation.max_completion_length=200", "model.max_model_len=320")
    assert [r["step"] for r in records] == list(range(1, 17))
    for r in records:
        assert math.isfinite(r["loss"]) and r["learner/tokens"] > 0
        assert r["staleness/token_max"] <= 1 and r["staleness/token_mean"] <= r["staleness/token_max"]
        assert 0 <= r["staleness/masked_token_frac"] < 1
        assert (r["staleness/masked_groups"] > 0) == (r["staleness/masked_token_frac"] > 0)
        # a group whose oldest token is past the bound has that token masked, and only such a group has any
        assert (r["staleness/masked_token_frac"] > 0) == (r["staleness/max"] > 1)


def test_multi_turn_episodes_train_on_the_continuous_engine(ray_cluster, tmp_path):
    """deploy/multi_turn.yaml on generation.engine: continuous: every episode runs on its own, weights load between
    its turns, and the oldest-token bound holds over the whole episode (a group spans at most S + 1 = 2 versions).
    Every episode has its three turns and no environment call failed."""
    records = run(tmp_path, "multi_turn", "learner.max_steps=6", "generation.engine=continuous")
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert r["env/turns_per_episode"] == 3.0 and r["errors/env_total"] == 0 and 0 < r["env/token_frac"] < 1
        assert r["staleness/max"] <= 1 and r["staleness/token_max"] <= r["staleness/max"]
        assert r["staleness/version_span_max"] <= 1 and math.isfinite(r["loss"])


def test_lora_adapters_load_in_flight_on_the_continuous_engine(ray_cluster, tmp_path):
    """deploy/lora.yaml on generation.engine: continuous: each publication (an adapter) replaces the engine's one
    adapter in place between two engine steps, completions in flight kept; every step trains within the
    oldest-token bound (whether a load lands mid-group here is the scheduler's affair: tests/test_lora.py places
    one there and checks every token's log-prob against its own adapter)."""
    records = run(tmp_path, "lora", "learner.max_steps=8", "generation.engine=continuous")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["policy_version"] for r in records] == list(range(1, 9))
    for r in records:
        assert math.isfinite(r["loss"]) and r["staleness/max"] <= 1
        assert r["staleness/token_max"] <= r["staleness/max"] and r["staleness/version_span_max"] <= 1


def test_several_generation_actors_share_the_work(ray_cluster, tmp_path):
    records = run(tmp_path, "grpo", "learner.max_steps=6", "cluster.num_generators=2", "replay.max_staleness=2",
                  "generation.generation_batch_size=16", "learner.groups_per_step=2")
    assert [r["step"] for r in records] == list(range(1, 7))
    # Both engines are given work: idle generators are served least recently used first, and the first admission
    # (window (2 + 1) * 2 = 6 groups, 2 per request) reaches both. (Which one delivers the groups a given step
    # trains on is up to the scheduler, so that is not asserted: the old assertion failed on a clean clone.)
    assert records[0]["gen/requests/0"] >= 1 and records[0]["gen/requests/1"] >= 1
    assert records[-1]["gen/requests/0"] + records[-1]["gen/requests/1"] >= 6 * 2 / 2  # 6 steps x 2 groups
    assert max(r["staleness/max"] for r in records) <= 2


def test_request_order_trains_the_prompts_in_the_order_requested_across_generators(ray_cluster, tmp_path):
    """replay.consume_order: request with two generators at max_staleness 1 (admission then counts no request in
    flight, so both generate side by side). Whichever generator finishes first, the groups reach the learner in the
    order their requests were made: the prompts of the trained batches (batches.jsonl) are exactly the prompt
    stream's first ones, in its order (no group is dropped in this job: zero_variance keep, no faults). In arrival
    order that holds only when the generators happen to finish in turn."""
    from rlfleet.data import PromptStream, load_prompt_dataset

    records = run(tmp_path, "grpo", "learner.max_steps=6", "cluster.num_generators=2",
                  "replay.consume_order=request", "generation.generation_batch_size=16", "learner.groups_per_step=2")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert max(r["staleness/max"] for r in records) <= 1
    # (replay/held is not asserted: when the last record is written a later request may already wait for one still
    # generating, which is up to the scheduler)
    assert records[-1]["replay/ignored_deliveries"] == 0
    assert records[-1]["gen/requests/0"] >= 1 and records[-1]["gen/requests/1"] >= 1
    cfg = load_config(tmp_path / "grpo" / "config.json")
    stream = PromptStream(load_prompt_dataset(cfg.data, cfg.data.split, seed=cfg.seed), seed=cfg.seed,
                          shuffle=cfg.data.shuffle)
    trained = [pid for line in (tmp_path / "grpo" / "batches.jsonl").read_text().splitlines()
               for pid in json.loads(line)["prompt_record_ids"]]
    assert len(trained) == 6 * 2
    assert trained == [r["prompt_id"] for r in stream.next_batch(len(trained))]


def test_resume_continues_step_count_and_buffer(ray_cluster, tmp_path):
    """Also: logging.report_to: [tensorboard] over both runs shows every step once, with metrics.jsonl's values."""
    first = run(tmp_path, "gspo_token", "learner.max_steps=4", "checkpoint.save_steps=2",
                "logging.report_to=[tensorboard]")
    saved = ckpt.latest_checkpoint(tmp_path / "gspo_token")
    driver_state = json.loads((saved / "driver.json").read_text())
    replay_meta = json.loads((saved / "replay.json").read_text())
    assert driver_state["step"] == 4 and driver_state["policy_version"] == 4
    resumed = run(tmp_path, "gspo_token", "learner.max_steps=6", "checkpoint.save_steps=2", "checkpoint.resume=true",
                  "logging.report_to=[tensorboard]")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl kept the first run's lines
    assert resumed[:4] == first
    assert [r["policy_version"] for r in resumed[4:]] == [5, 6]
    # the buffer came back: its counters continue from the checkpoint's instead of restarting at zero. (Whether a new
    # group arrives before step 5's record is up to the scheduler: with the next request queued behind the running
    # one, step 5 may train on groups the checkpoint already held. A counter restarted at zero would hold only groups
    # admitted since the resume, at most (5 + 1 + 1) * 4 - 16 = 12 by step 5's record: the bound at version 5 less
    # the 16 trained. The checkpoint's count is at least those 16 sampled groups.)
    assert resumed[4]["replay/added"] >= replay_meta["counts"]["added"] >= first[-1]["replay/sampled"] == 16
    assert resumed[4]["replay/sampled"] == first[-1]["replay/sampled"] + 4  # one more batch of groups_per_step
    assert json.loads((ckpt.latest_checkpoint(tmp_path / "gspo_token") / "driver.json").read_text())["step"] == 6
    # the checkpoint holds the replay state after step 4: its batches, plus the groups of the requests in flight at
    # the end, which the final checkpoint waits for (nothing generated is lost)
    assert replay_meta["counts"]["sampled"] == first[-1]["replay/sampled"]
    assert replay_meta["counts"]["added"] >= first[-1]["replay/added"]
    scalars = tensorboard_scalars(tmp_path / "gspo_token" / "tensorboard")
    for key in ("reward/mean", "loss", "staleness/mean", "replay/added"):
        assert scalars[key] == pytest.approx({r["step"]: r[key] for r in resumed}, rel=1e-6), key  # float32 in TB
    samples = tensorboard_texts(tmp_path / "gspo_token" / "tensorboard")
    assert sorted(samples) == [1, 2, 3, 4, 5, 6]  # log_every 1: the batch's first completions at every step
    assert all(len(text.splitlines()) == 2 + 4 for text in samples.values())  # header + one row per group (4)


def test_multi_turn_job_learns_async_and_resumes(ray_cluster, tmp_path):
    """deploy/multi_turn.yaml: three-turn char_count episodes with a scripted user, async with staleness 1. The
    random model writes the target letter in ~1 of 256 bytes; the reward (its share over the model's turns) rises
    (measured: 0.003 over steps 1-10, ~0.1 over steps 51-100), across a resume from the step-40 checkpoint."""
    cfg = load_config(DEPLOY / "multi_turn.yaml")
    first = run(tmp_path, "multi_turn", "learner.max_steps=40", "checkpoint.save_steps=20")
    assert [r["step"] for r in first] == list(range(1, 41))
    for r in first:
        assert r["env/turns_per_episode"] == 3.0  # the user always answers: every episode has max_turns turns
        assert r["errors/env"] == 0 and r["errors/env_total"] == 0 and r["staleness/max"] <= 1
        assert 0 < r["env/token_frac"] < 1 and r["env/seconds"] >= 0
        for name, (key, _) in rl_series(cfg.algorithm.beta, multi_turn=True).items():
            assert key in r and math.isfinite(r[key]), (name, key)
    resumed = run(tmp_path, "multi_turn", "learner.max_steps=80", "checkpoint.save_steps=20", "checkpoint.resume=true")
    assert [r["step"] for r in resumed] == list(range(1, 81)) and resumed[:40] == first
    assert [r["policy_version"] for r in resumed[40:]] == list(range(41, 81))
    early = sum(r["reward/mean"] for r in resumed[:10]) / 10
    late = sum(r["reward/mean"] for r in resumed[-20:]) / 20
    assert late > early + 0.04, (early, late)
