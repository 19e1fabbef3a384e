"""DPOLearner (component tier: in-process, the offline tiny model) and ``rlfleet dpo`` end to end (ray + slow tier).

Batches come from ``builtin:prefs`` (tokenized once per module). BEMA schedules below use TRL's absolute step t
(1 after the first optimizer step): BEMA updates at t > tau with (t - tau) % phi == 0, the reference takes the BEMA
weights at t >= tau_ref with (t - tau_ref) % phi_ref == 0 (reference/trl-algorithms.md section 5).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlfleet.cluster.metrics import dpo_series
from rlfleet.config import BEMAConfig, DataConfig, DPOConfig, LearnerConfig, ModelConfig, load_config
from rlfleet.dpo.learner import DPOLearner, collate_pairs, sequence_logprobs
from tests.test_reporting import tensorboard_scalars
from rlfleet.models import FLOAT32_ATTENTION, PAD_ID, VOCAB_SIZE, load_causal_lm, load_tokenizer
from rlfleet.dpo.data import PreferencePair, load_preference_dataset, tokenize_preferences

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pairs() -> list[PreferencePair]:
    ds = tokenize_preferences(load_preference_dataset(DataConfig(dataset="builtin:prefs"), "train"),
                              load_tokenizer("builtin:tiny"), max_length=64)
    return [PreferencePair.from_record(r) for r in ds.select(range(96))]


def batches(pairs: list[PreferencePair], n: int, size: int = 8) -> list[list[PreferencePair]]:
    return [pairs[i * size : (i + 1) * size] for i in range(n)]


def make_learner(bema: dict | None = None, dtype: str = "float32", model=None, beta: float = 0.5,
                 **learner) -> DPOLearner:
    """``bema``: BEMAConfig fields (None disables BEMA); ``learner``: LearnerConfig fields."""
    return DPOLearner(
        ModelConfig(dtype=dtype),
        DPOConfig(beta=beta, max_length=64, bema=BEMAConfig(**bema) if bema is not None else None),
        LearnerConfig(**{"device": "cpu", "learning_rate": 1e-3, "max_steps": 20, "micro_batch_size": 16, **learner}),
        model=model,
    )


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------- collation


def test_collate_pairs_layout_truncation_and_empty_prompt():
    """Pairs (prompt, chosen, rejected): A = ([1, 2], [3], [4, 5]), B = ([6], [7, 8, 9], [10]), C = ([], [11, 12],
    [13]); max_length 3, pad 0. Rows: chosen A, B, C then rejected A, B, C. A's rejected is cut to 3 - 2 = 1 token
    ([4]) and B's chosen to 3 - 1 = 2 ([7, 8]); C's empty prompt takes its completion's first token as context
    ([11] | [12] and [13] | []).
    P = 2, T = 2: row = [pad] * (2 - len(ctx)) + ctx + completion + [pad] * (2 - len(completion))."""
    pairs = [PreferencePair([1, 2], [3], [4, 5]), PreferencePair([6], [7, 8, 9], [10]),
             PreferencePair([], [11, 12], [13])]
    b = collate_pairs(pairs, pad_id=0, max_length=3)
    assert b.num_pairs == 3
    assert b.input_ids.tolist() == [[1, 2, 3, 0], [0, 6, 7, 8], [0, 11, 12, 0],
                                     [1, 2, 4, 0], [0, 6, 10, 0], [0, 13, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 0],
                                          [1, 1, 1, 0], [0, 1, 1, 0], [0, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2], [0, 0, 1, 2], [0, 0, 1, 1],
                                        [0, 1, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert b.completion_ids.tolist() == [[3, 0], [7, 8], [12, 0], [4, 0], [10, 0], [0, 0]]
    assert b.mask.tolist() == [[1, 0], [1, 1], [1, 0], [1, 0], [1, 0], [0, 0]]
    with pytest.raises(ValueError, match="dpo.max_length=2"):
        collate_pairs([PreferencePair([1, 2], [3], [4])], pad_id=0, max_length=2)


def test_sequence_logprobs_equal_unpadded_sums(tiny_model_path, pairs):
    """Independent computation: each (prompt + completion) alone, unpadded; logp = sum over the completion positions
    of log_softmax(logits[t - 1])[token t]. Padding, batching and computing the logits 3 positions at a time
    (learner.logprob_chunk_tokens) or packing the rows without padding (learner.pack_sequences) must not change it (fp32,
    1e-5)."""
    model = load_causal_lm(tiny_model_path).eval()
    sample = pairs[:5]
    with torch.no_grad():
        got = sequence_logprobs(model, collate_pairs(sample, PAD_ID, 64))  # [10]
        chunked = sequence_logprobs(model, collate_pairs(sample, PAD_ID, 64), chunk_tokens=3)  # [10]
        packed = [sequence_logprobs(model, collate_pairs(sample, PAD_ID, 64), chunk_tokens=c, pack=True)
                  for c in (0, 3)]
        expected = []
        for completions in ([p.chosen_ids for p in sample], [p.rejected_ids for p in sample]):
            for p, c in zip(sample, completions):
                ids = torch.tensor([p.prompt_token_ids + c])
                logp = model(input_ids=ids).logits[0].log_softmax(-1)  # [L, V]
                expected.append(sum(logp[len(p.prompt_token_ids) - 1 + k, tok].item() for k, tok in enumerate(c)))
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert chunked.tolist() == pytest.approx(expected, abs=1e-5)
    for values in packed:
        assert values.tolist() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------- the DPO step


class Bigram(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are ``table[current token]``: log-probs can be done by hand."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(VOCAB_SIZE, VOCAB_SIZE))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = self.table[input_ids]  # [B, S, V]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_dpo_step_hand_case_on_a_bigram_model():
    """One pair, prompt [1], chosen [2], rejected [3]; beta 0.1, AdamW lr 0.1, no weight decay, V = 260.

    Step 1: table = 0, so every log-prob is -log 260 = -5.560682 for policy and reference: Delta = 0, loss = log 2 =
    0.693147, rewards 0, margin 0, accuracy 0 (a tie is not a win). Only row 1 (the last prompt token predicts the
    completion; the prompt itself is not scored) gets a gradient: dL/dlogp_c = -beta sigmoid(0) = -0.05, dL/dlogp_r =
    +0.05, d logp_y / d table[1, j] = [j = y] - 1/260, so grad[1, 2] = -0.05, grad[1, 3] = +0.05, the 1/260 terms
    cancel; grad norm = 0.05 sqrt 2 = 0.0707107. Adam's first step moves each by lr * g / (|g| + eps) = -0.1 sign(g).
    Step 2, same pair: table[1] = (+0.1 at 2, -0.1 at 3, 0 elsewhere), lse = log(258 + e^0.1 + e^-0.1) = 5.5607201;
    logp_c = 0.1 - lse = -5.4607201, logp_r = -5.6607201; the reference is still 0 (-5.5606816):
    rewards c = 0.1 (0.1 - 3.849286e-5) = 0.00999615, r = -0.01000385, margin 0.02, loss = log(1 + e^-0.02) =
    0.6831972, accuracy 1. The gradient is again +-beta sigmoid(-0.02) = +-0.0495000 at (1, 3) / (1, 2) (the softmax
    terms cancel between chosen and rejected), grad norm 0.0495000 sqrt 2 = 0.0700036.
    """
    learner = make_learner(model=Bigram(), beta=0.1, learning_rate=0.1, max_grad_norm=None)
    pair = [PreferencePair([1], [2], [3])]
    m1 = learner.train_step(pair)
    assert m1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m1["rewards/chosen"] == 0 and m1["rewards/rejected"] == 0 and m1["rewards/accuracies"] == 0
    assert m1["logps/chosen"] == pytest.approx(-5.560682, abs=1e-5)
    assert m1["grad_norm"] == pytest.approx(0.0707107, abs=1e-6)
    table = learner.model.table.detach()
    assert table[1, 2].item() == pytest.approx(0.1, abs=1e-6) and table[1, 3].item() == pytest.approx(-0.1, abs=1e-6)
    assert (table != 0).sum().item() == 2

    m2 = learner.train_step(pair)
    assert m2["loss"] == pytest.approx(0.6831972, abs=1e-6)
    assert m2["rewards/chosen"] == pytest.approx(0.00999615, abs=1e-7)
    assert m2["rewards/rejected"] == pytest.approx(-0.01000385, abs=1e-7)
    assert m2["rewards/margins"] == pytest.approx(0.02, abs=1e-7) and m2["rewards/accuracies"] == 1.0
    assert m2["logps/chosen"] == pytest.approx(-5.4607201, abs=1e-5)
    assert m2["logps/rejected"] == pytest.approx(-5.6607201, abs=1e-5)
    assert m2["grad_norm"] == pytest.approx(0.0495000 * math.sqrt(2), abs=1e-6)
    assert torch.equal(learner.ref_model.table, torch.zeros(VOCAB_SIZE, VOCAB_SIZE))  # no BEMA: frozen reference
    assert m2["step"] == 2 and "bema/updated" not in m2


def test_micro_batches_give_the_same_loss_and_gradient(pairs):
    """6 pairs in one micro-batch (12 sequences) vs six of one pair (micro_batch_size 2): every micro-batch is divided
    by the step's 6 pairs, so the losses sum to the same value and the gradients to the same gradient."""
    grads = []
    losses = []
    for micro in (12, 2):
        learner = make_learner(micro_batch_size=micro)
        learner.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: grads.append({n: p.grad.clone() for n, p in learner.trainable().items()}))
        losses.append(learner.train_step(pairs[:6])["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-5, msg=name)


def test_evaluate_at_the_start_and_without_side_effects(pairs):
    """Policy = reference: every margin is 0 in exact arithmetic, so eval/loss = log 2; evaluating changes no parameter
    and no step. In floating point the two forward passes may round differently (seen: 1e-6 in a log-prob on one
    CPU, from the same weights at another address), so margins are compared to 0 within 1e-5 and the accuracy (the
    share of margins > 0, here the sign of rounding noise) is not asserted; before, it was, and it failed there."""
    learner = make_learner(bema=dict(update_freq=1, ref_model_update_freq=1))
    before = params(learner.model)
    out = learner.evaluate(pairs[:10])
    assert out["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out["eval/rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert out["eval/rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert 0 <= out["eval/policy_accuracy"] <= 1
    assert_same(params(learner.model), before)
    assert learner.step == 0


# ---------------------------------------------------------------------------------------------- BEMA reference


SCHEDULE = dict(update_freq=2, update_after=1, ref_model_update_freq=3, ref_model_update_after=2)


def test_reference_changes_exactly_at_scheduled_steps_and_equals_bema(pairs):
    """tau=1, phi=2: BEMA updates at t = 3, 5, 7, 9. tau_ref=2, phi_ref=3: the reference loads the BEMA weights at
    t = 2, 5, 8. At t=2 no BEMA update has happened (the snapshot at tau=1 leaves the output at the initial weights),
    so the reference changes at t = 5 and 8 only, and then equals the BEMA weights exactly (fp32 throughout)."""
    learner = make_learner(bema=SCHEDULE)
    ref = params(learner.ref_model)
    changed, updated, loaded = [], [], []
    for t, batch in enumerate(batches(pairs, 9), start=1):
        m = learner.train_step(batch)
        updated += [t] * int(m["bema/updated"])
        loaded += [t] * int(m["bema/ref_updated"])
        now = params(learner.ref_model)
        if any(not torch.equal(now[n], ref[n]) for n in now):
            changed.append(t)
            assert_same({n: now[n] for n in learner.bema.weights()}, learner.bema.weights())
        ref = now
    assert (updated, loaded, changed) == ([3, 5, 7, 9], [2, 5, 8], [5, 8])
    assert learner.bema.num_updates == 4


def test_bema_weights_are_never_written_into_the_policy(pairs):
    """Until the reference first changes (after step 5's optimizer step) the policy's trajectory cannot depend on BEMA,
    so after 5 steps the policy with BEMA equals the policy without it, bit for bit; and it differs from the BEMA
    weights loaded into the reference at t=5."""
    with_bema, without = make_learner(bema=SCHEDULE), make_learner(bema=None)
    for batch in batches(pairs, 5):
        with_bema.train_step(batch)
        without.train_step(batch)
    assert_same(params(with_bema.model), params(without.model))
    bema = with_bema.bema.weights()
    assert not torch.equal(bema["model.norm.weight"], with_bema.model.model.norm.weight.detach())


def test_reference_matches_trl_bema_callback(pairs):
    """TRL 1.16's ref-model BEMACallback (trl.experimental.bema_for_ref_model) observes our learner's policy after each
    of 9 optimizer steps (on_step_end with global_step = t) and updates its own copy of the initial model as reference;
    with the same knobs (gamma 1.5 so that t enters, the schedule above) its reference must equal ours bit for bit after
    every step."""
    pytest.importorskip("trl")
    from transformers import TrainerState
    from trl.experimental.bema_for_ref_model import BEMACallback

    kw = dict(SCHEDULE, ema_power=0.5, bias_power=0.2, multiplier=1.5)
    learner = make_learner(bema=dict(kw, lag=10.0))
    trl_ref = copy.deepcopy(learner.model).eval()
    initial = params(trl_ref)
    callback = BEMACallback(lag=10, update_ref_model=True, **kw)
    callback.on_train_begin(None, TrainerState(global_step=0), None, model=learner.model)
    for t, batch in enumerate(batches(pairs, 9), start=1):
        learner.train_step(batch)
        callback.on_step_end(None, TrainerState(global_step=t), None, model=learner.model, ref_model=trl_ref)
        assert_same(params(learner.ref_model), params(trl_ref))
    assert not torch.equal(params(trl_ref)["model.norm.weight"], initial["model.norm.weight"])  # not vacuous


def test_fp32_bema_buffers_with_a_bf16_model(pairs):
    """model.dtype bfloat16: the reference is bf16, the policy keeps fp32 master weights, BEMA's buffers are fp32 and
    keep values that bf16 cannot represent; after the reference update at t=2 it equals the BEMA weights rounded to
    bf16."""
    learner = make_learner(bema=dict(update_freq=1, ref_model_update_freq=2), dtype="bfloat16")
    for batch in batches(pairs, 2):
        learner.train_step(batch)
    ref = dict(learner.ref_model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in ref.values())
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    weights = learner.bema.weights()
    for name, value in weights.items():
        assert value.dtype == learner.bema.ema[name].dtype == learner.bema.theta0[name].dtype == torch.float32
        assert torch.equal(ref[name], value.to(torch.bfloat16)), name
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in learner.bema.ema.values())
    # on CPU the attention of both runs in float32 (rlfleet.models.float32_attention_on_cpu)
    assert learner.model.config._attn_implementation == FLOAT32_ATTENTION
    assert learner.ref_model.config._attn_implementation == FLOAT32_ATTENTION


def test_frozen_parameters(tiny_model_path, pairs):
    """Freeze the (tied) embeddings and one MLP matrix: the optimizer and BEMA hold only the trainable parameters
    (TRL's callback raises here), frozen parameters stay at their initial values in policy and reference, and the
    reference's trainable parameters equal the BEMA weights after the update at t=3."""
    model = load_causal_lm(tiny_model_path)
    frozen = {"model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight"}
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].mlp.gate_proj.weight.requires_grad_(False)
    initial = params(model)
    learner = make_learner(model=model, bema=dict(update_freq=1, ref_model_update_freq=3))
    trainable = set(initial) - frozen
    assert set(learner.bema.theta0) == trainable == set(learner.trainable())
    assert sum(len(g["params"]) for g in learner.optimizer.param_groups) == len(trainable)
    for batch in batches(pairs, 3):
        learner.train_step(batch)
    policy, ref, weights = params(learner.model), params(learner.ref_model), learner.bema.weights()
    for name in frozen:
        assert torch.equal(policy[name], initial[name]) and torch.equal(ref[name], initial[name]), name
    assert_same({n: ref[n] for n in trainable}, weights)
    assert not torch.equal(policy["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])


# ---------------------------------------------------------------------------------------------- checkpoints


def test_resume_restores_everything_exactly(tmp_path, pairs):
    """6 steps straight vs 3 steps, save, a fresh learner loads, 3 more steps. BEMA phi=2 and ref phi=2 (updates at
    2, 4, 6, so the save at t=3 holds a BEMA state between updates), a linear lr schedule with warmup: policy,
    reference, BEMA state, optimizer state, lr and the last step's metrics must be identical."""
    kw = dict(bema=dict(update_freq=2, ref_model_update_freq=2), lr_scheduler_type="linear", warmup_steps=2,
              max_steps=6)
    steps = batches(pairs, 6)
    straight = make_learner(**kw)
    for batch in steps:
        last = straight.train_step(batch)
    first = make_learner(**kw)
    for batch in steps[:3]:
        first.train_step(batch)
    first.save(tmp_path / "ckpt")
    resumed = make_learner(**kw)
    resumed.load(tmp_path / "ckpt")
    assert resumed.step == 3
    for batch in steps[3:]:
        resumed_last = resumed.train_step(batch)

    assert_same(params(resumed.model), params(straight.model))
    assert_same(params(resumed.ref_model), params(straight.ref_model))
    (t_a, meta_a), (t_b, meta_b) = resumed.bema.state_dict(), straight.bema.state_dict()
    assert meta_a == meta_b and meta_a["num_updates"] == 3
    assert_same(t_a, t_b)
    opt_a, opt_b = resumed.optimizer.state_dict(), straight.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for i in opt_b["state"]:
        assert_same(opt_a["state"][i], opt_b["state"][i])
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    drop = {"time/step_s"}
    assert {k: v for k, v in resumed_last.items() if k not in drop} == {k: v for k, v in last.items() if k not in drop}


def test_save_bema_writes_the_bema_weights_in_hf_format(tmp_path, pairs):
    learner = make_learner(bema=dict(update_freq=1, ref_model_update_freq=100))
    for batch in batches(pairs, 2):
        learner.train_step(batch)
    learner.save_bema(tmp_path / "bema")
    loaded = dict(load_causal_lm(str(tmp_path / "bema")).named_parameters())
    for name, value in learner.bema.weights().items():
        assert torch.equal(loaded[name].detach(), value), name
    assert not torch.equal(loaded["model.norm.weight"].detach(), learner.model.model.norm.weight.detach())
    assert load_tokenizer(str(tmp_path / "bema")).eos_token == "<|im_end|>"
    assert not torch.equal(learner.ref_model.model.norm.weight, learner.bema.weights()["model.norm.weight"])


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.ray
@pytest.mark.slow
def test_rlfleet_dpo_end_to_end_with_resume(ray_cluster, tmp_path):
    """deploy/dpo_quickstart.yaml (60 steps of 8 pairs, beta 0.5, BEMA phi=5, ref phi=20, checkpoints every 30) on a
    local Ray cluster. At step 0 the policy prefers the chosen completion for a share of held-out pairs near chance;
    after training it must prefer it for at least 80% and at least 0.3 more than at the start, and the implicit-reward
    accuracy against the BEMA reference must exceed 0.6 (at the start, policy = reference: margins 0). BEMA events at
    exactly the scheduled steps. Then resume to 65 steps: it continues at 61 and the metrics log holds each step
    once."""
    from rlfleet.cluster.dpo_job import train_dpo

    overrides = [f"output_dir={tmp_path}", "logging.log_every=20", "logging.report_to=[tensorboard]"]
    summary = train_dpo(load_config(REPO / "deploy" / "dpo_quickstart.yaml", overrides))
    assert summary["step"] == 60
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/policy_accuracy" in r}
    assert sorted(evals) == [0, 10, 20, 30, 40, 50, 60]
    start, end = evals[0], evals[60]
    assert start["eval/rewards/margins"] == pytest.approx(0, abs=1e-5)  # policy = reference (see above)
    assert end["eval/policy_accuracy"] >= max(0.8, start["eval/policy_accuracy"] + 0.3)
    assert end["eval/rewards/accuracies"] > 0.6
    trained = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in trained if r["bema/updated"]] == list(range(5, 61, 5))
    assert [r["step"] for r in trained if r["bema/ref_updated"]] == [20, 40, 60]
    for step in (30, 60):
        ckpt = tmp_path / "checkpoints" / f"step-{step}"
        assert (ckpt / "COMPLETE").is_file() and json.loads((ckpt / "driver.json").read_text())["step"] == step
        for name in ("policy/model.safetensors", "learner/optimizer.safetensors", "learner/reference.safetensors",
                     "learner/bema.safetensors", "learner/bema.json", "learner/scheduler.json"):
            assert (ckpt / name).is_file(), name
    assert (tmp_path / "bema" / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert (tmp_path / "dpo.png").is_file()

    resumed = train_dpo(load_config(REPO / "deploy" / "dpo_quickstart.yaml",
                                    overrides + ["checkpoint.resume=true", "learner.max_steps=65"]))
    assert resumed["step"] == 65
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(66))
    # every Ray series of the job is in every trained step's record; TensorBoard holds what metrics.jsonl holds,
    # over both runs, each step once
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records[1:]:
        assert all(key in r for name, (key, _) in dpo_series(True).items() if "eval" not in name), r
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == pytest.approx({r["step"]: r["loss"] for r in records[1:]}, rel=1e-6)  # float32
    assert scalars["eval/rewards/accuracies"] == pytest.approx(
        {r["step"]: r["eval/rewards/accuracies"] for r in records if "eval/rewards/accuracies" in r}, rel=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["last"]["bema/updated"] == 1.0  # 65 = 13 * 5


@pytest.mark.ray
@pytest.mark.slow
def test_rlfleet_dpo_recovers_from_a_killed_learner(ray_cluster, tmp_path):
    """The DPO job shares rlfleet train's lifecycle: a learner killed mid-run is recreated from the latest checkpoint
    (every 3 steps here), training continues from there with each step logged once, and the recovery is counted.
    The run is ended by a stop request to its rlfleet-control actor, not by a step count that might race the kill."""
    from rlfleet.cluster.checkpoint import latest_checkpoint
    from tests.test_faults import run_killing

    cfg = load_config(REPO / "deploy" / "dpo_quickstart.yaml", [
        f"output_dir={tmp_path}", "learner.max_steps=100000", "checkpoint.save_steps=3", "logging.plot=false",
        "logging.log_every=1000"])
    records = run_killing(cfg, tmp_path, "rlfleet-dpo-learner", after_records=5, dpo=True)  # 4 steps + step 0
    assert [r["step"] for r in records] == list(range(len(records)))  # step 0 is the held-out baseline
    assert records[-1]["faults/recoveries"] == 1
    saved = json.loads((latest_checkpoint(tmp_path) / "driver.json").read_text())
    assert saved["step"] == records[-1]["step"]
