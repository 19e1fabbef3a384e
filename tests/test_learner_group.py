"""A learner group (issue 14): K processes in one torch.distributed group over gloo, each holding an FSDP2 shard of
the real tiny model, compute the update of one process on the whole batch.

Each case runs K spawned processes (the group, here without Ray: ``_spawn``) and one plain in-process learner (the
baseline) on the same batch, and compares the loss, the gradient norm, every parameter's gradient right before
each optimizer step (gathered whole), the metrics, and the parameters after the step. Parameters after AdamW are
compared where its update is well conditioned: Adam divides by |g|, so summation-order noise in gradients of size
~1e-9 flips their update (platform-notes, "Compare gradients ..."); the gradients themselves are compared everywhere.
The Ray side (rank 0 starting the others in the learner's placement group, recovery) is in the end-to-end tests
at the bottom.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlfleet.config import (AlgorithmConfig, BEMAConfig, DataConfig, DPOConfig, GenerationConfig, LearnerConfig,
                            ModelConfig)
from rlfleet.dpo.data import PreferencePair, load_preference_dataset, tokenize_preferences
from rlfleet.dpo.learner import DPOLearner
from rlfleet.learner import distributed as dist_
from rlfleet.learner.distributed import SINGLE, Rank, micro_batches
from rlfleet.learner.policy import PolicyLearner
from rlfleet.models import load_tokenizer

TEMPERATURE = 0.7


# ---------------------------------------------------------------------------------------------- harness


def _spawn(world: int, fn, *args):
    """``fn(rank, *args)`` on ``world`` spawned processes forming one gloo group; rank 0's result."""
    return dist_.spawn_group(world, _one_thread, fn, *args)[0]


def _one_thread(rank: Rank, fn, *args):
    torch.set_num_threads(1)
    return fn(rank, *args)


def _local(fn, *args):
    """The baseline: ``fn`` on one plain process, no process group."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(SINGLE, *args)
    finally:
        torch.set_num_threads(saved)


def _numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in state.items()}


def _record_grads(learner, model) -> list[dict[str, np.ndarray]]:
    """Every parameter's whole gradient right before each optimizer step (a collective in a group)."""
    grads: list[dict[str, np.ndarray]] = []
    learner.optimizer.register_step_pre_hook(lambda *_: grads.append(
        {n: dist_.full(p.grad).numpy().copy() for n, p in model.named_parameters() if p.grad is not None}))
    return grads


def assert_grads_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                       spread: dict[str, float] | None = None) -> None:
    """Equal up to float summation order (the tolerance of the micro-batching test in test_policy_learner.py).
    ``spread``: per parameter, how far the same process's gradients moved with only another summation order (see
    test_two_rank_dpo_with_bema_equals_one_process); the tolerance is at least twice that."""
    assert actual.keys() == expected.keys()
    for name, g in expected.items():
        atol = max(1e-5 * np.abs(g).max(), 2 * (spread or {}).get(name, 0.0))
        np.testing.assert_allclose(actual[name], g, rtol=1e-4, atol=atol, err_msg=name)


def assert_updates_close(after: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                         grads: list[dict[str, np.ndarray]], lr: float = 1e-3) -> None:
    """Parameters after the optimizer steps whose gradients are ``grads`` (from the same start): the updates agree
    to 0.1% of their size, lr per step, wherever Adam's bias-corrected first moment m = sum_i 0.1 * 0.9^(n-i) g_i /
    (1 - 0.9^n) is 1000 times the gradients' summation-order noise (assert_grads_close's atol) at every step n, so
    that noise moves
    Adam's scale-free update m / sqrt(v) by at most about 0.1% of lr; where m is tiny (the key projection's
    bias: its true gradient is 0 under softmax; successive gradients that cancel) noise decides it, and the
    updates may differ by at most 2 lr per step (a flipped update)."""
    compared = total = 0
    for name, p in expected.items():
        m, well = np.zeros_like(p), np.ones_like(p, dtype=bool)
        for k, g in enumerate(grads, start=1):  # every step's update well conditioned
            m = 0.9 * m + 0.1 * g.get(name, np.zeros_like(p))
            noise = 1e-5 * (np.abs(g[name]).max() if name in g else 0.0)  # assert_grads_close's atol
            well &= np.abs(m / (1 - 0.9 ** k)) > 1e3 * noise
        np.testing.assert_allclose(after[name][well], p[well], rtol=0, atol=1e-3 * lr * len(grads), err_msg=name)
        assert np.abs(after[name] - p).max() <= 2 * lr * len(grads) + 1e-6, name
        compared, total = compared + int(well.sum()), total + well.size
    assert compared > 0.5 * total  # not vacuous (measured: 60-90% of the entries; absent tokens have no gradient)


# ---------------------------------------------------------------------------------------------- GRPO


def _policy_learner(rank: Rank, algorithm: dict, learner: dict, model: dict | None = None) -> PolicyLearner:
    return PolicyLearner(
        ModelConfig(**{"dtype": "float32", **(model or {})}), AlgorithmConfig(**algorithm),
        LearnerConfig(**{"device": "cpu", "learning_rate": 1e-3, "max_grad_norm": 1.0, **learner}),
        GenerationConfig(num_generations=4, generation_batch_size=8, max_completion_length=12,
                         temperature=TEMPERATURE),
        rank=rank)


def _policy_case(rank: Rank, algorithm: dict, learner: dict, groups, checkpoint: str | None = None,
                 model_cfg: dict | None = None) -> dict:
    model = _policy_learner(rank, algorithm, learner, model_cfg)
    grads = _record_grads(model, model.model)
    metrics = model.train_step(groups)
    out = {"metrics": metrics, "grads": list(grads), "after": _numpy(dist_.full_state_dict(model.model)),
           "published": _numpy(model.state_dict())}
    if checkpoint is not None:  # save, then a fresh group loads it and takes the next step like the original
        model.save(checkpoint)
        resumed = _policy_learner(rank, algorithm, learner, model_cfg)
        resumed.load(checkpoint)
        out["next"] = (model.train_step(groups)["loss"], resumed.train_step(groups)["loss"])
        out["next_params"] = (_numpy(dist_.full_state_dict(model.model)), _numpy(dist_.full_state_dict(resumed.model)))
    return out


@pytest.fixture(scope="module")
def groups():
    from tests.test_policy_learner import make_learner, two_groups

    return two_groups(make_learner().model)


def _compare(group: dict, one: dict, keys=("loss", "grad_norm"), spread: list[dict] | None = None) -> None:
    for key in keys:
        assert group["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5), key
    assert len(group["grads"]) == len(one["grads"])
    for k, (g, e) in enumerate(zip(group["grads"], one["grads"])):
        assert_grads_close(g, e, spread[k] if spread else None)
    assert_updates_close(group["after"], one["after"], one["grads"])
    metric_keys = {k for k in one["metrics"] if not k.startswith("time/")}
    assert metric_keys == {k for k in group["metrics"] if not k.startswith("time/")}
    for key in metric_keys:
        assert group["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6, nan_ok=True), key


@pytest.mark.slow
def test_two_ranks_dapo_token_level_and_checkpoint_round_trip(groups, tmp_path):
    """dapo normalisation, token-level ratios, micro-batches of 3 (rank 0: rows 0-3, rank 1: rows 4-7); then the
    sharded checkpoint: a fresh 2-rank group that loads it takes the same next step."""
    algorithm, learner = {"loss_type": "dapo"}, {"micro_batch_size": 3}
    one = _local(_policy_case, algorithm, learner, groups)
    two = _spawn(2, _policy_case, algorithm, learner, groups, str(tmp_path / "ckpt"))
    _compare(two, one)
    for name, value in one["after"].items():  # what generators get: the whole policy, as one process has it
        np.testing.assert_array_equal(two["published"][name], two["after"][name])
    assert two["next"][0] == two["next"][1]
    for name in two["next_params"][0]:
        np.testing.assert_array_equal(two["next_params"][0][name], two["next_params"][1][name], err_msg=name)
    files = sorted(p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*"))
    assert {"learner/optimizer-rank0-of-2.safetensors", "learner/optimizer-rank1-of-2.safetensors",
            "learner/scheduler.json", "policy/model.safetensors", "learner/learner.json"} <= set(files)
    from rlfleet.models import load_causal_lm  # the policy is a whole Hugging Face model, loadable alone
    saved = load_causal_lm(str(tmp_path / "ckpt" / "policy"), torch.float32, "cpu", False).state_dict()
    assert set(saved) == set(one["after"])
    for name, value in saved.items():  # written after the first step: the policy then
        np.testing.assert_array_equal(value.numpy(), two["after"][name], err_msg=name)


@pytest.mark.slow
def test_two_ranks_with_a_lora_adapter_equal_one_process(groups, tmp_path):
    """model.lora on a learner group: the adapter's gradients, the update, the published adapter and the KL to the
    base (the adapter disabled) are those of one process; the base never moves; the adapter checkpoint resumes."""
    algorithm, learner, model = {"loss_type": "dapo", "beta": 0.04}, {"micro_batch_size": 3}, {"lora": {"r": 4}}
    one = _local(_policy_case, algorithm, learner, groups, None, model)
    two = _spawn(2, _policy_case, algorithm, learner, groups, str(tmp_path / "ckpt"), model)
    for key in ("loss", "grad_norm", "loss/kl"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-9), key
    for g, e in zip(two["grads"], one["grads"]):
        assert_grads_close(g, e)
    assert all(".lora_" in name for name in one["grads"][0])  # only the adapter trains
    # B moved (A's first gradient is 0: B starts at 0); the base weights are the same, untouched, on both
    b_names = [n for n in one["after"] if ".lora_B." in n]
    assert_updates_close({n: two["after"][n] for n in b_names}, {n: one["after"][n] for n in b_names}, one["grads"])
    for name in (n for n in one["after"] if ".lora_" not in n):
        np.testing.assert_array_equal(two["after"][name], one["after"][name], err_msg=name)
    assert two["published"].keys() == one["published"].keys() and all(".lora_" in k for k in one["published"])
    for name, value in one["published"].items():
        np.testing.assert_allclose(two["published"][name], value, rtol=0, atol=1e-6, err_msg=name)
    assert two["next"][0] == two["next"][1]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (tmp_path / "ckpt" / "policy").iterdir()}


@pytest.mark.slow
def test_two_ranks_grpo_sequence_token_two_iterations_with_reference_and_chunked_logprobs(groups):
    """grpo normalisation (per-sequence means over the whole batch's sequences), GSPO-token ratios, mu = 2 with
    capped importance weights, and beta > 0: the reference model is sharded too. Log-probs in chunks of 5 positions
    (the chunked pass calls the decoder and the output layer itself: FSDP must gather the root's parameters for it
    as for forward)."""
    algorithm = {"loss_type": "grpo", "importance_sampling_level": "sequence_token", "num_iterations": 2,
                 "importance_sampling_cap": 3.0, "beta": 0.04}
    learner = {"micro_batch_size": 2, "logprob_chunk_tokens": 5}
    one = _local(_policy_case, algorithm, learner, groups)
    two = _spawn(2, _policy_case, algorithm, learner, groups)
    _compare(two, one)


@pytest.mark.slow
def test_three_ranks_with_a_filler_micro_batch(groups):
    """8 rows on 3 ranks in micro-batches of 2: rank 2 holds rows 6-7 only and runs a filler pass (loss x 0) to
    meet the others' collectives; sequence-level ratios; packed micro-batches on the ranks, padded on the baseline."""
    assert [m.real for m in micro_batches(8, 2, Rank(2, 3))] == [True, False]
    algorithm = {"loss_type": "dapo", "importance_sampling_level": "sequence"}
    one = _local(_policy_case, algorithm, {"micro_batch_size": 2}, groups)
    three = _spawn(3, _policy_case, algorithm, {"micro_batch_size": 2, "pack_sequences": True}, groups)
    _compare(three, one)


def test_micro_batches_cover_every_row_once_and_align_the_ranks():
    """Pure: every row of the batch is trained by exactly one rank, and every rank runs the same number of passes."""
    for rows in range(1, 12):
        for world in range(1, 5):
            for size in range(1, 5):
                plans = [micro_batches(rows, size, Rank(r, world)) for r in range(world)]
                covered = sorted(i for plan in plans for m in plan if m.real for i in range(m.start, m.stop))
                assert covered == list(range(rows))
                assert len({len(plan) for plan in plans}) == 1
                assert all(0 < m.stop - m.start <= size for plan in plans for m in plan)
    assert micro_batches(5, 2) == [dist_.MicroBatch(0, 2), dist_.MicroBatch(2, 4), dist_.MicroBatch(4, 5)]


# ---------------------------------------------------------------------------------------------- DPO


def _dpo_pairs(n: int) -> list[PreferencePair]:
    ds = tokenize_preferences(load_preference_dataset(DataConfig(dataset="builtin:prefs"), "train"),
                              load_tokenizer("builtin:tiny"), max_length=64)
    return [PreferencePair.from_record(r) for r in ds.select(range(n))]


def _dpo_learner(rank: Rank, micro_batch_size: int = 4) -> DPOLearner:
    return DPOLearner(ModelConfig(dtype="float32"),
                      DPOConfig(beta=0.5, max_length=64, bema=BEMAConfig(update_freq=1, ref_model_update_freq=1)),
                      LearnerConfig(device="cpu", learning_rate=1e-3, max_steps=20, micro_batch_size=micro_batch_size,
                                    logprob_chunk_tokens=64), rank=rank)  # chunks: some micro-batches have more


def _dpo_case(rank: Rank, pairs: list[PreferencePair], checkpoint: str | None = None,
              micro_batch_size: int = 4) -> dict:
    learner = _dpo_learner(rank, micro_batch_size)
    grads = _record_grads(learner, learner.model)
    steps = [learner.train_step(pairs[i * 6:(i + 1) * 6]) for i in range(2)]  # 6 pairs: 3 + 3, micro 2 pairs
    ref = _numpy({n: dist_.full(p.detach()) for n, p in learner.ref_model.named_parameters()})
    bema = {n: dist_.full(dist_.like_shard(w, dict(learner.model.named_parameters())[n])).numpy().copy()
            for n, w in learner.bema.weights().items()}
    out = {"metrics": steps[-1], "first": steps[0], "grads": list(grads),
           "after": _numpy(dist_.full_state_dict(learner.model)),
           "ref": ref, "bema": bema, "eval": learner.evaluate(pairs[12:19])}
    if checkpoint is not None:
        learner.save(checkpoint)
        learner.save_bema(checkpoint + "-bema")
        resumed = _dpo_learner(rank)
        resumed.load(checkpoint)
        out["next"] = (learner.train_step(pairs[:6])["loss"], resumed.train_step(pairs[:6])["loss"])
    return out


@pytest.mark.slow
def test_two_rank_dpo_with_bema_equals_one_process(tmp_path):
    """Two DPO steps with BEMA updating the (sharded) reference after each: loss, gradients, parameters, the
    reference and the BEMA weights equal one process's; evaluation of 7 pairs (rank 1 gets 3 and a filler pass)
    agrees; a sharded checkpoint resumes to the same next step; save_bema writes the whole BEMA model.

    The second step's gradients are taken at parameters one AdamW step moved, which amplifies summation-order noise
    (platform notes): one process with micro-batches of 2 pairs instead of 4, the same math in another order, moves
    them by up to 2e-5 of their largest value on an AMD EPYC (1e-6 at the first step), above assert_grads_close's
    1e-5, and the two ranks differ from one process by as much. So each gradient's tolerance is at least twice that
    process's own spread, measured here; a wrong update of a shard moves them by orders of magnitude more."""
    pairs = _dpo_pairs(19)
    one = _local(_dpo_case, pairs)
    other_order = _local(_dpo_case, pairs, None, 2)
    spread = [{name: float(np.abs(other_order["grads"][k][name] - g).max()) for name, g in step.items()}
              for k, step in enumerate(one["grads"])]
    two = _spawn(2, _dpo_case, pairs, str(tmp_path / "ckpt"))
    _compare(two, one, spread=spread)
    _compare({**two, "metrics": two["first"], "grads": two["grads"][:1], "after": one["after"]},
             {**one, "metrics": one["first"], "grads": one["grads"][:1]})
    for name, value in one["ref"].items():
        np.testing.assert_allclose(two["ref"][name], value, rtol=1e-5, atol=2e-3 + 1e-6, err_msg=name)
    for name, value in one["bema"].items():
        np.testing.assert_allclose(two["bema"][name], value, rtol=1e-5, atol=2e-3 + 1e-6, err_msg=name)
    for key, value in one["eval"].items():
        assert two["eval"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert two["next"][0] == two["next"][1]
    assert (tmp_path / "ckpt" / "learner" / "reference-rank1-of-2.safetensors").exists()
    from rlfleet.models import load_causal_lm
    saved = load_causal_lm(str(tmp_path / "ckpt-bema"), torch.float32, "cpu", False).state_dict()
    np.testing.assert_allclose(saved["model.norm.weight"].numpy(), two["bema"]["model.norm.weight"], rtol=1e-6)


def test_resuming_with_another_group_size_is_refused(tmp_path):
    """A checkpoint of a 2-rank group cannot be loaded by one rank: the error names both sizes and the fix."""
    (tmp_path / "optimizer-rank0-of-2.safetensors").write_bytes(b"")
    (tmp_path / "optimizer-rank1-of-2.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"learner_workers=1.*optimizer-rank0-of-2.*resume with the learner_workers"):
        dist_.check_shards(tmp_path, "optimizer", SINGLE)
    with pytest.raises(ValueError, match=r"learner_workers=3"):
        dist_.check_shards(tmp_path, "optimizer", Rank(0, 3))
    dist_.check_shards(tmp_path, "optimizer", Rank(1, 2))


# ---------------------------------------------------------------------------------------------- jobs on Ray

REPO = Path(__file__).resolve().parents[1]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_rl_job_with_two_learner_ranks_is_on_policy_and_resumes(ray_cluster, tmp_path):
    """``cluster.learner_workers: 2`` on the synchronous job: rank 0 starts rank 1 in the learner's placement group,
    and the weights they publish are what the generators sample with: with max_staleness 0 the ratio
    pi_learner / pi_behaviour stays 1 up to float error at every step (a generator holding other weights than the
    sharded learner's would move it by an update's size, ~1e-1). Then the run resumes from its sharded checkpoint
    and continues."""
    from rlfleet.cluster import checkpoint as ckpt
    from rlfleet.cluster.driver import train
    from rlfleet.config import load_config

    overrides = [f"output_dir={tmp_path}", "logging.plot=false", "cluster.learner_workers=2",
                 "replay.zero_variance=keep", "checkpoint.save_steps=2"]
    train(load_config(REPO / "deploy" / "dapo_sync.yaml", overrides + ["learner.max_steps=4"]))
    first = _records(tmp_path)
    assert [r["staleness/max"] for r in first] == [0, 0, 0, 0]
    for r in first:
        assert abs(r["ratio/min"] - 1) < 1e-4 and abs(r["ratio/max"] - 1) < 1e-4, r
    saved = ckpt.latest_checkpoint(tmp_path) / "learner"
    assert {"optimizer-rank0-of-2.safetensors", "optimizer-rank1-of-2.safetensors"} <= {p.name for p in saved.iterdir()}

    train(load_config(REPO / "deploy" / "dapo_sync.yaml", overrides + ["learner.max_steps=6",
                                                                       "checkpoint.resume=true"]))
    resumed = _records(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6] and resumed[:4] == first
    assert [r["policy_version"] for r in resumed[4:]] == [5, 6]
    for r in resumed[4:]:
        assert abs(r["ratio/min"] - 1) < 1e-4 and abs(r["ratio/max"] - 1) < 1e-4, r


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_reward_rises_with_two_learner_ranks(ray_cluster, tmp_path):
    """The quickstart job with a 2-rank learner learns as the single learner does (test_train_e2e's
    test_reward_rises_on_builtin_task: reward on target_length starts near 0.46 and rises as the model learns to
    stop)."""
    from rlfleet.cluster.driver import train
    from rlfleet.config import load_config

    train(load_config(REPO / "deploy" / "quickstart.yaml", [
        f"output_dir={tmp_path}", "logging.plot=false", "cluster.learner_workers=2", "learner.max_steps=120"]))
    records = _records(tmp_path)
    first = sum(r["reward/mean"] for r in records[:20]) / 20
    last = sum(r["reward/mean"] for r in records[-20:]) / 20
    assert last > first + 0.1, (first, last)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_a_dead_learner_rank_recovers_the_job(ray_cluster, tmp_path):
    """Rank 1 killed mid-run: rank 0's collective fails at once (gloo sees the closed connection), rank 0 names the
    dead rank, and the job recovers from its latest checkpoint like after a learner loss: a new group, every step
    logged once, the recovery counted. Ended by a stop request, not by a step count that might race the kill."""
    import ray

    from rlfleet.config import load_config
    from tests.test_faults import run_killing

    def rank1() -> str:
        [name] = [a for a in ray.util.list_named_actors() if a.startswith("rlfleet-learner-rank1-")]
        return name

    cfg = load_config(REPO / "deploy" / "quickstart.yaml", [
        f"output_dir={tmp_path}", "logging.plot=false", "cluster.learner_workers=2", "learner.max_steps=100000",
        "checkpoint.save_steps=3"])
    records = run_killing(cfg, tmp_path, rank1, after_records=4)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["faults/recoveries"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_dpo_job_with_two_learner_ranks_learns_and_resumes(ray_cluster, tmp_path):
    """deploy/dpo_quickstart.yaml with a 2-rank learner (BEMA sharded like the parameters): held-out accuracy rises
    from near chance as with one learner (test_dpo's end-to-end test), BEMA events at the scheduled steps, and the
    sharded checkpoint resumes."""
    from rlfleet.cluster.dpo_job import train_dpo
    from rlfleet.config import load_config

    overrides = [f"output_dir={tmp_path}", "logging.log_every=20", "logging.plot=false", "cluster.learner_workers=2"]
    assert train_dpo(load_config(REPO / "deploy" / "dpo_quickstart.yaml", overrides))["step"] == 60
    records = _records(tmp_path)
    evals = {r["step"]: r for r in records if "eval/policy_accuracy" in r}
    assert evals[60]["eval/policy_accuracy"] >= max(0.8, evals[0]["eval/policy_accuracy"] + 0.3)
    assert [r["step"] for r in records if r.get("bema/ref_updated")] == [20, 40, 60]
    step_dir = tmp_path / "checkpoints" / "step-60"
    for name in ("learner/optimizer-rank1-of-2.safetensors", "learner/reference-rank1-of-2.safetensors",
                 "learner/bema-rank1-of-2.safetensors", "policy/model.safetensors"):
        assert (step_dir / name).is_file(), name
    resumed = train_dpo(load_config(REPO / "deploy" / "dpo_quickstart.yaml",
                                    overrides + ["checkpoint.resume=true", "learner.max_steps=62"]))
    assert resumed["step"] == 62
    assert [r["step"] for r in _records(tmp_path)] == list(range(63))


def test_learner_options_make_threads_beyond_the_cpus_wait_passively():
    from rlfleet.learner.actor import learner_options
    from rlfleet.config import ClusterConfig

    # its own cores: OpenMP's default waiting (spinning a while) is kept; no runtime_env of its own
    assert learner_options(ClusterConfig(learner_num_cpus=2)) == {"num_cpus": 2, "num_gpus": 0}
    assert learner_options(ClusterConfig(learner_num_cpus=2, learner_threads=2)) == {"num_cpus": 2, "num_gpus": 0}
    # borrowing: 3 threads on 2 CPUs, 2 on 0.5
    for cpus, threads in ((2, 3), (0.5, 2)):
        options = learner_options(ClusterConfig(learner_num_cpus=cpus, learner_threads=threads))
        assert options["runtime_env"] == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}} and options["num_cpus"] == cpus


def test_gathered_weights_stream_one_tensor_at_a_time_and_keep_tied_ones_to_their_last_name():
    """``dist_.gathered`` (what a colocated engine reads) yields :func:`full_state_dict`'s pairs in order, each made
    as it is asked for: once the reader moves on, the tensor it had is gone, except a tied one (the embedding and
    ``lm_head``), which stays until its second name. One rank, cast to bfloat16, so every tensor is a new one."""
    import gc
    import weakref

    import torch

    from rlfleet.learner import distributed as dist_
    from rlfleet.models import load_causal_lm, resolve_model_path

    model = load_causal_lm(resolve_model_path("builtin:tiny"), torch.float32)
    whole = dist_.full_state_dict(model, torch.bfloat16)
    refs, names = [], []
    for name, tensor in dist_.gathered(model, torch.bfloat16):
        assert torch.equal(tensor, whole[name]), name
        refs.append(weakref.ref(tensor))
        names.append(name)
        del tensor
        gc.collect()
        alive = [n for n, r in zip(names[:-1], refs[:-1]) if r() is not None]
        # only the tied embedding, read under its first name, may outlive its turn (until lm_head.weight)
        assert alive in ([], ["model.embed_tokens.weight"]), (name, alive)
    assert names == list(whole)
    assert "lm_head.weight" in names and names.index("lm_head.weight") > names.index("model.embed_tokens.weight")
