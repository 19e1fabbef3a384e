"""PolicyLearner (component tier: in-process, the offline tiny model) and LearnerActor (ray tier).

Groups are synthetic: random byte-token prompts and completions (seeded ``torch.Generator``), with behaviour
log-probabilities computed independently of the learner's collation, one unpadded sequence at a time
(:func:`reference_logprobs`), so that on-policy ratios are 1.
"""

from __future__ import annotations

import dataclasses

import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, ModelConfig, RLFleetConfig
from rlfleet.learner.core import Learner
from rlfleet.learner.logprobs import _decoder_and_head, check_packing, completion_logprobs, pack_rows
from rlfleet.learner.policy import PolicyLearner, collate, combine_loss_metrics, importance_weights
from rlfleet.learner.trainee import lr_factor, move_optimizer_state
from rlfleet.models import FLOAT32_ATTENTION, PAD_ID, resolve_model_path
from rlfleet.types import Group
from rlfleet.transport.packed import unpack

TEMPERATURE = 0.7


def make_learner(algorithm: dict | None = None, learner: dict | None = None, dtype: str = "auto") -> Learner:
    return PolicyLearner(
        ModelConfig(dtype=dtype),
        AlgorithmConfig(**(algorithm or {})),
        LearnerConfig(**{"device": "cpu", "learning_rate": 1e-3, "max_grad_norm": None, **(learner or {})}),
        GenerationConfig(num_generations=4, generation_batch_size=8, max_completion_length=12,
                         temperature=TEMPERATURE),
        seed=0,
    )


@torch.no_grad()
def reference_logprobs(model, prompt: np.ndarray, completion: np.ndarray) -> np.ndarray:
    """log softmax(logits / T) of each completion token, one unpadded sequence, no collation involved."""
    ids = torch.as_tensor(np.concatenate([prompt, completion]), dtype=torch.long)[None]  # [1, P+L]
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float() / TEMPERATURE  # [L, V]
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0].numpy()  # [L]


def make_group(model, gen: torch.Generator, advantages, prompt_len: int, lengths, *, pad_to: int | None = None,
               truncated=None, policy_version: int = 0, rewards=None, prompt_id: str = "p") -> Group:
    """A group with random tokens and on-policy behaviour log-probs under ``model``."""
    n, lengths = len(advantages), np.asarray(lengths, dtype=np.int32)
    T = pad_to or int(lengths.max())
    prompt = torch.randint(0, 256, (prompt_len,), generator=gen).numpy().astype(np.int32)
    completions = np.zeros((n, T), dtype=np.int32)
    old = np.zeros((n, T), dtype=np.float32)
    for j, L in enumerate(lengths):
        completions[j, :L] = torch.randint(0, 256, (int(L),), generator=gen).numpy()
        old[j, :L] = reference_logprobs(model, prompt, completions[j, :L])
    rewards = np.asarray(advantages if rewards is None else rewards, dtype=np.float32)
    real = rewards[~np.isnan(rewards)]
    return Group(
        prompt_id=prompt_id,
        prompt_token_ids=prompt,
        completion_ids=completions,
        completion_lengths=lengths,
        behaviour_logprobs=old,
        rewards=rewards,
        advantages=np.asarray(advantages, dtype=np.float32),
        truncated=np.zeros(n, dtype=bool) if truncated is None else np.asarray(truncated),
        policy_version=policy_version,
        reward_std=float(real.std(ddof=1)) if real.size > 1 else 0.0,
    )


def two_groups(model, seed: int = 0) -> list[Group]:
    """8 sequences: prompts of 5 and 9 tokens, completions of 1..12 tokens, varied advantages."""
    gen = torch.Generator().manual_seed(seed)
    return [
        make_group(model, gen, [1.2, -0.4, 0.3, -1.1], 5, [7, 3, 12, 1]),
        make_group(model, gen, [-0.8, 0.9, 0.5, -0.6], 9, [4, 10, 6, 8]),
    ]


def captured_grads(learner: PolicyLearner) -> list[dict[str, torch.Tensor]]:
    """Registers a hook that records every parameter's gradient right before each optimizer step."""
    grads: list[dict[str, torch.Tensor]] = []
    learner.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append(
            {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
        )
    )
    return grads


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to float summation order: rtol 1e-4, and atol 1e-5 of the tensor's largest entry (entries that
    nearly cancel carry absolute rounding of the tensor's scale, not their own)."""
    assert actual.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(actual[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


def params(learner: PolicyLearner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------------


def test_collate_left_pads_prompts_right_pads_completions():
    """Prompts [1,2] (rows 0, 1) and [7,8,9] (row 2): P = 3; completion lengths [3, 1, 2]: T = 3.

    Row 0 = [pad, 1, 2, 3, 4, 5]; row 1 = [pad, 1, 2, 6, pad, pad]; row 2 = [7, 8, 9, 10, 11, pad].
    Positions = cumsum(attention) - 1, clamped at 0: row 0 [0,0,1,2,3,4], row 1 [0,0,1,2,2,2], row 2 [0,1,2,3,4,4].
    mask = [[1,1,1],[1,0,0],[1,1,0]]; with mask_truncated_completions and row 0 truncated, row 0 becomes 0.
    """
    g1 = Group("a", np.array([1, 2], np.int32), np.array([[3, 4, 5], [6, 0, 0]], np.int32), np.array([3, 1], np.int32),
               np.array([[-1, -2, -3], [-4, 0, 0]], np.float32), np.array([1, 0], np.float32),
               np.array([0.5, -0.5], np.float32), np.array([True, False]), policy_version=0)
    g2 = Group("b", np.array([7, 8, 9], np.int32), np.array([[10, 11, 0, 0]], np.int32), np.array([2], np.int32),
               np.array([[-5, -6, 0, 0]], np.float32), np.array([1], np.float32), np.array([0.0], np.float32),
               np.array([False]), policy_version=0)
    b = collate([g1, g2], pad_id=PAD_ID)
    p = PAD_ID
    assert b.input_ids.tolist() == [[p, 1, 2, 3, 4, 5], [p, 1, 2, 6, p, p], [7, 8, 9, 10, 11, p]]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert b.position_ids.tolist() == [[0, 0, 1, 2, 3, 4], [0, 0, 1, 2, 2, 2], [0, 1, 2, 3, 4, 4]]
    assert b.completion_ids.tolist() == [[3, 4, 5], [6, p, p], [10, 11, p]]
    assert b.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b.behaviour_logprobs.tolist() == [[-1, -2, -3], [-4, 0, 0], [-5, -6, 0]]
    assert b.advantages.tolist() == [0.5, -0.5, 0.0]
    assert collate([g1, g2], pad_id=PAD_ID, mask_truncated_completions=True).mask.tolist() == [
        [0, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert [(mb.size, real) for mb, real in b.split(2)] == [(2, True), (1, True)]


def test_importance_weights_token_and_sequence():
    """old - behaviour on the mask: row 0 [0.5, 0, (pad)], row 1 [2, 0, 0].

    token, cap 3:    row 0 [e^0.5, 1, 1] = [1.648721, 1, 1]; row 1 [min(e^2 = 7.389, 3), 1, 1] = [3, 1, 1].
    sequence, cap 3: row 0 e^(0.5) = 1.648721 on every position; row 1 min(e^2, 3) = 3.
    token, cap 1.5:  row 0 [1.5, 1, 1].
    """
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    beh = torch.tensor([[-1.5, -2.0, 5.0], [-3.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    e = math.exp(0.5)
    torch.testing.assert_close(importance_weights(old, beh, mask, "token", 3.0),
                               torch.tensor([[e, 1.0, 1.0], [3.0, 1.0, 1.0]]))
    for level in ("sequence", "sequence_token"):
        torch.testing.assert_close(importance_weights(old, beh, mask, level, 3.0),
                                   torch.tensor([[e, e, e], [3.0, 3.0, 3.0]]))
    torch.testing.assert_close(importance_weights(old, beh, mask, "token", 1.5)[0], torch.tensor([1.5, 1.0, 1.0]))


def test_lr_factor_schedules():
    """warmup 2, max_steps 10: steps 0, 1 give 0/2, 1/2. After warmup progress = (step - 2) / 8.

    constant: 1. linear: step 6 -> 1 - 4/8 = 0.5, step 10 -> 0. cosine: step 4 -> 0.5 (1 + cos(pi/4)) = 0.853553,
    step 6 -> 0.5 (1 + cos(pi/2)) = 0.5, step 10 -> 0.
    """
    assert [lr_factor(s, "constant", 2, 10) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert [lr_factor(s, "linear", 2, 10) for s in (1, 2, 6, 10)] == [0.5, 1.0, 0.5, 0.0]
    assert lr_factor(4, "cosine", 2, 10) == pytest.approx(0.853553, abs=1e-6)
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5, abs=1e-12)
    assert lr_factor(10, "cosine", 2, 10) == pytest.approx(0.0, abs=1e-12)


def test_combine_loss_metrics():
    """Two micro-batches with 3 and 1 valid tokens, one pass: loss/policy sums (0.2 + 0.1 = 0.3); ratio/mean is
    token-weighted ((3 * 1.0 + 1 * 2.0) / 4 = 1.25); ratio/min, ratio/max ignore NaN (min(0.9) , max(1.1)).
    Two passes of the same records: loss/policy (0.3 + 0.3) / 2 = 0.3, means unchanged."""
    records = [({"loss/policy": 0.2, "ratio/mean": 1.0, "ratio/min": 0.9, "ratio/max": 1.1}, 3.0),
               ({"loss/policy": 0.1, "ratio/mean": 2.0, "ratio/min": math.nan, "ratio/max": math.nan}, 1.0)]
    expected = {"loss/policy": 0.3, "ratio/mean": 1.25, "ratio/min": 0.9, "ratio/max": 1.1}
    assert combine_loss_metrics(records, 1) == pytest.approx(expected)
    assert combine_loss_metrics(records * 2, 2) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------------
# The learner
# ----------------------------------------------------------------------------------------------------------------


def test_padding_does_not_change_logprobs():
    """Collated log-probs equal those of each sequence run alone (reference_logprobs, no padding at all).

    A group whose completions are padded to 20 columns and batched with a group of a 2x longer prompt gives the
    same log-probs as the group collated alone: positions count real tokens only and padded keys are masked.
    """
    learner = make_learner()
    gen = torch.Generator().manual_seed(1)
    short = make_group(learner.model, gen, [1.0, -1.0], 4, [5, 2])
    long_prompt = make_group(learner.model, gen, [1.0, -1.0], 11, [9, 3])
    padded = make_group(learner.model, torch.Generator().manual_seed(1), [1.0, -1.0], 4, [5, 2], pad_to=20)
    np.testing.assert_array_equal(padded.completion_ids[:, :5], short.completion_ids)
    with torch.no_grad():
        alone = completion_logprobs(learner.model, collate([short], PAD_ID), TEMPERATURE)  # [2, 5]
        mixed = completion_logprobs(learner.model, collate([padded, long_prompt], PAD_ID), TEMPERATURE)  # [4, 9]
    for j, L in enumerate(short.completion_lengths):
        torch.testing.assert_close(alone[j, :L], torch.from_numpy(short.behaviour_logprobs[j, :L]), rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[j, :L], alone[j, :L], rtol=0, atol=1e-5)
    for j, L in enumerate(long_prompt.completion_lengths):
        torch.testing.assert_close(mixed[2 + j, :L], torch.from_numpy(long_prompt.behaviour_logprobs[j, :L]),
                                   rtol=0, atol=1e-5)


def test_chunked_logprobs_equal_the_whole_computation():
    """learner.logprob_chunk_tokens: the output layer and log-softmax on 5 positions at a time (96 positions, so
    chunks cross rows and the last is short) give the whole [B, T, V] computation's log-probs (1e-6: only the
    matmul's blocking differs) and, through activation checkpointing, its gradient."""
    learner = make_learner()
    batch = collate(two_groups(learner.model), PAD_ID)
    weights = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for chunk in (0, 5):
        learner.model.zero_grad()
        logprobs = completion_logprobs(learner.model, batch, TEMPERATURE, chunk)  # [8, 12]
        (logprobs * weights * batch.mask).sum().backward()
        results.append((logprobs.detach(), {n: p.grad.clone() for n, p in learner.model.named_parameters()}))
    (whole, g_whole), (chunked, g_chunked) = results
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert max(g.abs().max().item() for g in g_whole.values()) > 1e-3  # a real gradient
    assert_grads_close(g_chunked, g_whole)
    with torch.no_grad():  # the no-grad path (proximal / reference log-probs) skips checkpointing
        torch.testing.assert_close(completion_logprobs(learner.model, batch, TEMPERATURE, 7), whole, rtol=0,
                                   atol=1e-6)


def test_pack_rows_first_fit_decreasing_by_hand():
    """Lengths 5, 9, 3, 7, 2 into rows of 9, longest first: 9 fills a row; 7 opens a row (2 left); 5 opens a row (4
    left); 3 goes with the 5 (the 7's row has 2); 2 goes with the 7. A sequence longer than the rows gets its own."""
    assert pack_rows([5, 9, 3, 7, 2], 9) == [[1], [3, 4], [0, 2]]
    assert pack_rows([10, 2, 3], 5) == [[0], [2, 1]]
    assert pack_rows([4, 4], 100) == [[0, 1]]


@pytest.mark.parametrize("chunk", [0, 5])
def test_packed_logprobs_equal_the_padded_computation(chunk):
    """learner.pack_sequences: two_groups' 8 rows (prompts of 5 and 9 tokens, completions of 1..12; 107 real tokens:
    4 x 5 + 4 x 9 prompt + 51 completion) packed into rows no longer than the padded batch's (21 tokens), positions
    restarting per sequence, no attention mask. Each sequence must attend only to itself, so the log-probs and
    gradients equal the padded batch's (1e-5: attention over a differently shaped mask sums in another order); with
    whole or chunked logits. If Hugging Face did not keep the sequences apart, later sequences would see earlier
    ones (measured: 0.53 off with a full attention mask over one packed row)."""
    learner = make_learner()
    batch = collate(two_groups(learner.model), PAD_ID)
    assert int(batch.attention_mask.sum()) == 107 and batch.input_ids.shape == (8, 21)  # 168 padded
    seen = []
    hook = learner.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    weights = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for pack in (False, True):
        learner.model.zero_grad()
        logprobs = completion_logprobs(learner.model, batch, TEMPERATURE, chunk, pack)  # [8, 12]
        (logprobs * weights * batch.mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
        results.append((logprobs.detach() * batch.mask, grads))
    hook.remove()
    # the packed pass: lengths 12 8 17 6 13 19 15 17 in rows of 21, first fit, longest first: 19 | 17 | 17 | 15 + 6 |
    # 13 + 8 | 12
    assert seen[0] == (8, 21) and seen[-1] == (6, 21)
    (padded, g_padded), (packed, g_packed) = results
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert_grads_close(g_packed, g_padded)
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(learner.model, batch, TEMPERATURE, chunk, True) * batch.mask,
                                   padded, rtol=0, atol=1e-5)
    # a model whose logits are not exactly head(hidden) is packed into one row and its logits built at the
    # completion positions (this model ignores the soft-capping field: the values stay the padded ones)
    learner.model.config.final_logit_softcapping = 30.0
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(learner.model, batch, TEMPERATURE, chunk, True) * batch.mask,
                                   padded, rtol=0, atol=1e-5)


def test_packing_is_refused_for_a_model_whose_packed_sequences_see_each_other(monkeypatch):
    """check_packing passes the tiny model (Hugging Face keeps its packed sequences apart) and refuses it, naming
    learner.pack_sequences, once the packed-sequence detection is switched off: its attention is then plain causal
    over the packed row, as in a model that builds its own mask. A learner with pack_sequences checks at start."""
    import transformers.masking_utils as masking

    learner = make_learner()
    check_packing(learner.model)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match="learner.pack_sequences: .* does not keep packed sequences apart"):
        check_packing(learner.model)
    with pytest.raises(ValueError, match="set learner.pack_sequences: false"):
        make_learner(learner={"pack_sequences": True})
    make_learner(learner={"pack_sequences": False})


def test_the_preflight_refuses_packing_for_such_a_model_before_any_actor_starts(monkeypatch, tmp_path):
    """The preflight runs check_packing on a miniature of the model (one layer, small widths, the model's own
    attention code): the tiny model passes, and with the packed-sequence detection switched off ``rlfleet train``'s
    and ``rlfleet dpo``'s preflights refuse it, naming the field; a config with packing off is not checked. A
    Qwen2-MoE config of about 14B parameters (written here, no weights) has a miniature of under a million."""
    import transformers
    import transformers.masking_utils as masking

    from rlfleet.cluster.preflight import ConfigError, miniature_model, packing_problems, preflight, preflight_dpo

    packed = RLFleetConfig(learner={"pack_sequences": True})
    assert packing_problems(packed) == []
    transformers.Qwen2MoeConfig().save_pretrained(tmp_path)
    assert sum(p.numel() for p in miniature_model(str(tmp_path)).parameters()) < 1_000_000
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    (problem,) = packing_problems(packed)
    assert problem.startswith("learner.pack_sequences: Qwen2ForCausalLM does not keep packed sequences apart")
    assert packing_problems(RLFleetConfig()) == []
    for check in (preflight, preflight_dpo):
        with pytest.raises(ConfigError, match="learner.pack_sequences"):
            check(packed, fetch=False)


def test_packed_train_step_gives_the_padded_gradient():
    results = []
    for pack in (False, True):
        learner = make_learner(learner={"pack_sequences": pack, "micro_batch_size": 3})
        grads = captured_grads(learner)
        m = learner.train_step(two_groups(learner.model))
        results.append((m["loss"], grads[0]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert_grads_close(results[1][1], results[0][1])


def test_chunked_logprobs_train_step_matches_and_soft_capped_models_are_computed_whole():
    results = []
    for chunk in (0, 7):
        learner = make_learner({"loss_type": "dapo"}, {"logprob_chunk_tokens": chunk})
        grads = captured_grads(learner)
        metrics = learner.train_step(two_groups(learner.model))
        results.append((grads[0], metrics))
    (g0, m0), (g7, m7) = results
    assert_grads_close(g7, g0)
    assert m7["loss"] == pytest.approx(m0["loss"], abs=1e-6)
    # a model whose logits are not exactly head(hidden) (Gemma-2's soft-capping) is never split
    learner = make_learner()
    assert _decoder_and_head(learner.model) is not None
    learner.model.config.final_logit_softcapping = 30.0
    assert _decoder_and_head(learner.model) is None


def test_on_policy_step_has_unit_ratio_updates_weights_and_reports_metrics():
    """Behaviour log-probs from the same weights: ratio 1 everywhere (|1 - r| <= 1e-5), nothing clipped.

    Batch statistics, by hand: rewards [1, NaN, 3, 2 | 2, 2] -> scored [1, 3, 2, 2, 2]: mean 2, unbiased std
    sqrt((1 + 1 + 0 + 0 + 0) / 4) = 0.707107; group 2 has zero std -> frac_reward_zero_std 1/2. Learner at
    version 5, groups from versions 3 and 5 -> staleness [2, 0]: mean 1, max 2; version 6 after one step.
    Tokens: 3 + 4 + 2 + 5 + 6 + 1 = 21.
    """
    learner = make_learner()
    gen = torch.Generator().manual_seed(2)
    groups = [
        make_group(learner.model, gen, [-1.0, 0.0, 1.0, 0.0], 6, [3, 4, 2, 5], policy_version=3,
                   rewards=[1.0, math.nan, 3.0, 2.0]),
        make_group(learner.model, gen, [0.5, -0.5], 3, [6, 1], policy_version=5, rewards=[2.0, 2.0]),
    ]
    learner.policy_version = 5
    before = params(learner)
    m = learner.train_step(groups)
    assert learner.ref_model is None
    assert abs(m["ratio/mean"] - 1) <= 1e-5 and abs(m["ratio/min"] - 1) <= 1e-5 and abs(m["ratio/max"] - 1) <= 1e-5
    assert m["clip/frac"] == 0.0
    assert m["reward/mean"] == pytest.approx(2.0)
    assert m["reward/std"] == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert m["frac_reward_zero_std"] == 0.5
    assert (m["staleness/mean"], m["staleness/max"]) == (1.0, 2.0)
    assert (m["learner/tokens"], m["learner/sequences"]) == (21.0, 6.0)
    assert m["policy_version"] == 6.0 and learner.policy_version == 6 and learner.step == 1
    assert m["lr"] == 1e-3 and m["grad_norm"] > 0 and m["time/step_s"] > 0 and math.isfinite(m["loss"])
    after = params(learner)
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batch_size_does_not_change_gradient(loss_type):
    """micro_batch_size 1 and 8 over the same 8 sequences give the same gradient and loss.

    Derivation: every micro-batch loss is aggregate(rows) / N with the same step normaliser N (B for grpo, the
    step's token count for dapo), and aggregate is a sum over rows (grpo: of row means; dapo: of tokens), so the
    micro-batch losses sum to the full-batch loss and their accumulated gradients to its gradient. A row's
    log-probs do not depend on the rows batched with it (padding invariance above), so only float summation order
    differs. Gradients are compared before the optimizer step (no clipping).
    """
    results = []
    for micro_batch_size in (1, 8):
        learner = make_learner({"loss_type": loss_type}, {"micro_batch_size": micro_batch_size})
        grads = captured_grads(learner)
        metrics = learner.train_step(two_groups(learner.model))
        results.append((grads[0], metrics))
    (g1, m1), (g8, m8) = results
    assert max(g.abs().max().item() for g in g8.values()) > 1e-4  # a real gradient, not an empty comparison
    assert_grads_close(g1, g8)
    # On-policy (ratio 1) with advantages that sum to zero, the loss is exactly 0 in exact arithmetic and ~1e-7
    # in fp32 (summation order): compare it absolutely; a relative comparison of two rounding residues (as here
    # before) fails on a change of BLAS kernel. The gradients above carry the invariance.
    assert m1["loss"] == pytest.approx(m8["loss"], abs=1e-6)
    assert m1["loss/policy"] == pytest.approx(m8["loss/policy"], abs=1e-6)


def test_equal_rewards_give_zero_gradient_and_unchanged_weights():
    """Zero advantages, beta 0: L_t = -min(w * 0, clip(w) * 0) = 0 for every w, so every gradient is exactly 0;
    AdamW with g = 0 and no weight decay moves nothing (m = v = 0, update 0 / (0 + eps) = 0)."""
    learner = make_learner()
    gen = torch.Generator().manual_seed(3)
    groups = [make_group(learner.model, gen, [0.0] * 4, 5, [3, 6, 2, 4], rewards=[1.0] * 4)]
    grads = captured_grads(learner)
    before = params(learner)
    m = learner.train_step(groups)
    assert all(torch.count_nonzero(g) == 0 for g in grads[0].values()) and len(grads[0]) == len(before)
    assert m["grad_norm"] == 0.0 and m["loss"] == 0.0 and m["frac_reward_zero_std"] == 1.0
    after = params(learner)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_beta_loads_frozen_reference_and_kl_is_zero_at_first_step():
    """beta > 0: the reference is a frozen copy of the initial weights, so at step 0 ref == policy and
    KL_t = exp(0) - 0 - 1 = 0. After a step the policy moved and the reference did not."""
    learner = make_learner({"beta": 0.04})
    assert learner.ref_model is not None
    assert not any(p.requires_grad for p in learner.ref_model.parameters())
    groups = two_groups(learner.model)
    m = learner.train_step(groups)
    assert abs(m["loss/kl"]) <= 1e-7
    ref, policy = learner.ref_model.state_dict(), learner.model.state_dict()
    assert any(not torch.equal(ref[n], policy[n]) for n in policy)
    assert learner.train_step(groups)["loss/kl"] > 0


def test_mask_truncated_completions_equals_dropping_those_rows():
    """dapo: a masked row adds 0 to the token sum and its tokens are not in N, so the gradient equals that of the
    batch without the row. The row has a large advantage, so including it would change the gradient."""
    learner = make_learner({"mask_truncated_completions": True})
    gen = torch.Generator().manual_seed(4)
    full = make_group(learner.model, gen, [2.0, -0.5, 0.7], 5, [12, 4, 6], truncated=[True, False, False])
    kept = Group(full.prompt_id, full.prompt_token_ids, full.completion_ids[1:, :6], full.completion_lengths[1:],
                 full.behaviour_logprobs[1:, :6], full.rewards[1:], full.advantages[1:], full.truncated[1:], 0)
    grads = captured_grads(learner)
    m_full = learner.train_step([full])
    other = make_learner()
    other_grads = captured_grads(other)
    m_kept = other.train_step([kept])
    assert m_full["learner/tokens"] == m_kept["learner/tokens"] == 10.0
    assert_grads_close(grads[0], other_grads[0])
    unmasked = make_learner()
    unmasked_grads = captured_grads(unmasked)
    unmasked.train_step([full])
    assert any(not torch.allclose(unmasked_grads[0][n], grads[0][n], rtol=1e-2) for n in grads[0])


def test_the_token_unit_trains_exactly_the_tokens_within_the_bound():
    """``replay.staleness_unit: token`` at max_staleness 1, trained at version 3: tokens sampled at version 1 are
    left out of the loss, those at 2 and 3 train. The gradient equals that of a learner of the group unit trained
    on the same groups with those tokens masked by hand (``loss_mask``: an independent path through collate), for
    the token-mean (dapo) and the per-sequence (grpo) normalisations; and it differs from training every token, so
    the mask matters. Each completion's first 3 tokens are version 1, then 2, then 3 (a row of 1 token: version 1,
    nothing of it trains)."""
    for loss_type in ("dapo", "grpo"):
        def learner(token: bool):
            out = make_learner({"loss_type": loss_type})
            out.objective.token_staleness = 1 if token else None
            out.policy_version = 3
            return out

        base = two_groups(make_learner().model)
        versioned, by_hand = [], []
        for g in base:
            t = g.completion_ids.shape[1]
            versions = np.minimum(1 + np.arange(t) // 3, 3)[None, :].repeat(g.size, 0).astype(np.int32)  # [n, T]
            versioned.append(dataclasses.replace(g, policy_version=1, token_versions=versions))
            by_hand.append(dataclasses.replace(g, policy_version=1, token_versions=versions,
                                               loss_mask=versions >= 2))
        token, hand, every = learner(True), learner(False), learner(False)
        grads, hand_grads, every_grads = captured_grads(token), captured_grads(hand), captured_grads(every)
        m = token.train_step(versioned)
        m_hand = hand.train_step(by_hand)
        every.train_step(versioned)
        masked = sum(int((g.model_token_mask & (g.versions < 2)).sum()) for g in versioned)
        assert m["learner/tokens"] == m_hand["learner/tokens"] == 51 - masked
        assert m["staleness/masked_token_frac"] == pytest.approx(masked / 51) and m["staleness/token_max"] == 1.0
        assert_grads_close(grads[0], hand_grads[0])
        assert any(not torch.allclose(every_grads[0][n], grads[0][n], rtol=1e-2) for n in grads[0])


def test_num_iterations_two_uses_capped_importance_weights():
    """mu = 2: two optimizer steps (version 0 -> 2) on one batch. "old" is the learner's own log-probs, so the
    truncated IS weight is min(exp(old - behaviour), 3). Row 0's behaviour log-probs are lowered by 0.5 per token:
    weight e^0.5 = 1.648721 on its 7 tokens, 1 on the other 44 (token level; two_groups has 23 + 28 = 51 tokens).
    Token mean, the same in both passes: (7 * 1.648721 + 44) / 51 = 1.089040."""
    learner = make_learner({"num_iterations": 2})
    groups = two_groups(learner.model)
    groups[0].behaviour_logprobs[0, :7] -= 0.5
    grads = captured_grads(learner)
    m = learner.train_step(groups)
    # two optimizer steps, one published version: staleness is counted in weight publications
    assert len(grads) == 2 and learner.policy_version == 1 and m["policy_version"] == 1.0
    assert learner.step == 1 and learner.optimizer.state[next(learner.model.parameters())]["step"] == 2
    assert m["is_weight/mean"] == pytest.approx(1.089040, abs=1e-5)
    assert m["ratio/min"] <= 1.0 <= m["ratio/max"] and m["ratio/max"] > 1.0 + 1e-4  # pass 2 moved off ratio 1


def test_rollout_correction_on_policy_changes_nothing_and_reports_no_gap():
    """Engine log-probs equal to the learner's: r = 1 on every token, so truncation weighs 1 and the base's value is
    the engine's; the gradient equals the uncorrected step's, rollout/kl is 0 and nothing is truncated."""
    plain, corrected = make_learner(), make_learner({"rollout_correction": "truncate",
                                                     "rollout_correction_level": "sequence"})
    grads = [captured_grads(plain), captured_grads(corrected)]
    m_plain = plain.train_step(two_groups(plain.model))
    m = corrected.train_step(two_groups(corrected.model))
    assert_grads_close(grads[1][0], grads[0][0])
    for metrics in (m, m_plain):  # the gap is reported with or without the correction
        assert metrics["rollout/kl"] == pytest.approx(0.0, abs=1e-6)
        assert metrics["rollout/ratio/min"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["rollout/ratio/max"] == pytest.approx(1.0, abs=1e-5)
    assert m["rollout/truncated_frac"] == 0.0 and "rollout/truncated_frac" not in m_plain


def test_rollout_mask_drops_the_tokens_the_engine_overrated():
    """Row 0's engine log-probs raised by 0.5 per token: r = e^-0.5 = 0.606531 on its 7 tokens, below the band
    [0.9, 1.1], so mask mode weighs them 0: the step's gradient is that of the same batch with row 0's advantage 0
    and exact log-probs (the normaliser, dapo's token count, keeps its 7 tokens). masked_frac = 7 / 51."""
    masked = make_learner({"rollout_correction": "mask", "rollout_correction_min": 0.9,
                           "rollout_correction_max": 1.1})
    plain = make_learner()
    grads = [captured_grads(masked), captured_grads(plain)]
    groups = two_groups(masked.model)
    groups[0].behaviour_logprobs[0, :7] += 0.5
    m = masked.train_step(groups)
    expected = two_groups(plain.model)
    expected[0].advantages[0] = 0.0
    plain.train_step(expected)
    assert_grads_close(grads[0][0], grads[1][0])
    assert m["rollout/masked_frac"] == pytest.approx(7 / 51)
    assert m["rollout/ratio/min"] == pytest.approx(math.exp(-0.5), abs=1e-5)
    assert m["rollout/kl"] == pytest.approx(7 * (math.exp(-0.5) - 1 + 0.5) / 51, abs=1e-5)


def test_gradient_checkpointing_gives_the_same_gradient():
    """Checkpointing recomputes the same forward in backward: same gradient up to float rounding."""
    results = []
    for checkpointing in (False, True):
        learner = make_learner(learner={"gradient_checkpointing": checkpointing})
        grads = captured_grads(learner)
        learner.train_step(two_groups(learner.model))
        results.append(grads[0])
    assert_grads_close(results[1], results[0])


def test_save_load_round_trip(tmp_path):
    """A fresh learner that loads a checkpoint has the same weights, Adam moments, schedule position and
    versions, so its next step is bit-identical to the original's next step."""
    cfg = {"lr_scheduler_type": "linear", "warmup_steps": 1, "max_steps": 4}
    a = make_learner(learner=cfg)
    groups = two_groups(a.model)
    a.train_step(groups)  # lr factor 0 (warmup step 0)
    a.train_step(groups)  # lr factor 1
    a.save(tmp_path / "ckpt")
    b = make_learner(learner=cfg)
    b.load(tmp_path / "ckpt")
    assert (b.policy_version, b.step) == (2, 2)
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 3)
    ma, mb = a.train_step(groups), b.train_step(groups)
    assert ma["lr"] == mb["lr"] and ma["loss"] == mb["loss"]
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_offloading_the_optimizer_moves_both_moments_of_every_parameter_and_nothing_on_the_host():
    """move_optimizer_state moves AdamW's exp_avg and exp_avg_sq of every parameter (to the meta device here: this
    machine has no second one) and leaves ``step`` where AdamW keeps it. A learner on the host with
    learner.offload_optimizer has nothing to move: its steps are bit-identical to one without."""
    a, b = make_learner(), make_learner(learner={"offload_optimizer": True})
    assert a.trainee.offload_optimizer is False and b.trainee.offload_optimizer is False
    groups = two_groups(a.model)
    for _ in range(2):
        ma, mb = a.train_step(groups), b.train_step(groups)
        assert ma["loss"] == mb["loss"]
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    state = a.optimizer.state
    trained = [p for p in a.model.parameters() if p.requires_grad]
    assert len(state) == len(trained) and all(set(state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in trained)
    move_optimizer_state(a.optimizer, torch.device("meta"))
    for p in trained:
        assert state[p]["exp_avg"].device.type == "meta" and state[p]["exp_avg_sq"].device.type == "meta"
        assert state[p]["exp_avg"].shape == p.shape and state[p]["step"].device.type == "cpu"


def test_weights_load_strictly_into_a_fresh_hf_model():
    """weights() has every state_dict name (tied lm_head included, sharing the embedding's CPU copy), loads with
    strict=True into a fresh model, gives the same logits, and is a snapshot that later steps do not change."""
    learner = make_learner()
    groups = two_groups(learner.model)
    learner.train_step(groups)
    w = learner.weights()
    assert w.keys() == learner.model.state_dict().keys()
    assert all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32 for t in w.values())
    assert w["lm_head.weight"].data_ptr() == w["model.embed_tokens.weight"].data_ptr()
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path("builtin:tiny")))
    fresh.load_state_dict(w, strict=True)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, learner.model(input_ids=ids).logits,
                                   rtol=0, atol=0)
    snapshot = {n: t.clone() for n, t in w.items()}
    learner.train_step(groups)
    assert all(torch.equal(snapshot[n], w[n]) for n in w)


def test_bfloat16_compute_keeps_float32_master_weights():
    """model.dtype bfloat16: parameters stay float32 (AdamW updates of ~lr would round away in bfloat16), the
    forward runs under bfloat16 autocast, the reference model and weights() are bfloat16, and a step at TRL's
    lr 1e-6 moves every parameter tensor."""
    learner = make_learner({"beta": 0.04}, {"learning_rate": 1e-6}, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in learner.ref_model.parameters())
    before = params(learner)
    m = learner.train_step(two_groups(learner.model))
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    after = params(learner)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert {t.dtype for t in learner.weights().values()} == {torch.bfloat16}


def test_bfloat16_learner_on_cpu_runs_attention_in_float32_with_its_padding_mask(monkeypatch):
    """model.dtype bfloat16 on CPU: the policy's and the reference's attention run in float32 (SDPA sees float32
    q, k, v with autocast off; torch's bfloat16 CPU flash-attention backward is slow, RESULTS 2e), everything else
    under bfloat16 autocast. On left-padded prompts the log-probs stay within bfloat16's error of an unpadded float32
    forward pass of each sequence: 0.02, four times what the stock bfloat16 SDPA path was measured at (0.005). With the
    padding mask lost, padded rows were measured 0.25-0.72 off. A float32 learner keeps transformers' SDPA."""
    assert make_learner().model.config._attn_implementation == "sdpa"
    learner = make_learner({"beta": 0.04}, dtype="bfloat16")
    assert learner.model.config._attn_implementation == FLOAT32_ATTENTION
    assert learner.ref_model.config._attn_implementation == FLOAT32_ATTENTION
    groups = two_groups(learner.model)  # prompts of 5 and 9 tokens: the first group's rows are left-padded
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    learner.train_step(groups)
    layers = learner.model.config.num_hidden_layers
    assert len(seen) == 2 * layers  # reference and policy, each layer once
    assert set(seen) == {(torch.float32, torch.float32, torch.float32, False)}
    batch = collate(groups, PAD_ID)
    with torch.no_grad():
        logprobs = learner.trainee.logprobs(learner.model, batch, TEMPERATURE)  # [8, T]
    rows = [(g, j) for g in groups for j in range(len(g.completion_lengths))]
    for row, (g, j) in enumerate(rows):
        n = g.completion_lengths[j]
        expected = reference_logprobs(learner.model, g.prompt_token_ids, g.completion_ids[j, :n])
        assert np.abs(logprobs[row, :n].numpy() - expected).max() < 0.02, row


def test_repeated_steps_raise_the_logprob_of_the_positive_advantage_completion():
    """Learning sanity: advantages [+1.5, -0.5, -0.5, -0.5] on a fixed group, behaviour log-probs refreshed from
    the current policy each step (on-policy). Ten Adam steps at lr 1e-3 raise the positive completion's summed
    log-prob and lower the mean of the others'."""
    learner = make_learner()
    gen = torch.Generator().manual_seed(5)
    group = make_group(learner.model, gen, [1.5, -0.5, -0.5, -0.5], 6, [8, 8, 8, 8])

    def seq_logprobs() -> np.ndarray:
        prompt = group.prompt_token_ids
        return np.array([reference_logprobs(learner.model, prompt, c).sum() for c in group.completion_ids])

    start = seq_logprobs()
    for _ in range(10):
        group.behaviour_logprobs[:] = [reference_logprobs(learner.model, group.prompt_token_ids, c)
                                       for c in group.completion_ids]
        learner.train_step([group])
    end = seq_logprobs()
    assert end[0] > start[0] + 1.0
    assert end[1:].mean() < start[1:].mean()


# ----------------------------------------------------------------------------------------------------------------
# Ray: LearnerActor against a ReplayActor
# ----------------------------------------------------------------------------------------------------------------


def actor_config(tmp_path, **cluster) -> RLFleetConfig:
    """The learner actor tests' job: 2 groups of 4 per step, tiny model, the given ``cluster`` fields."""
    return RLFleetConfig(
        output_dir=str(tmp_path),
        generation=GenerationConfig(num_generations=4, generation_batch_size=8, max_completion_length=12,
                                    temperature=TEMPERATURE),
        learner=LearnerConfig(device="cpu", learning_rate=1e-3, max_grad_norm=None, groups_per_step=2),
        replay={"max_staleness": 4},
        cluster=cluster,
    )


@pytest.mark.ray
def test_learner_actor_pulls_from_replay_and_publishes_weights(ray_cluster, tmp_path):
    """The learner actor samples its batch from the replay actor and trains on it (version 0 -> 1; its loss, taken
    before the update, equals the same step's loss in-process) and publishes its weights in the same call (a handle
    holding one object ref, so the driver gets the ref, not the tensors) whose value equals the actor's weights, read back here
    from its Hugging Face checkpoint; publish_weights() alone gives the same bytes. With an empty replay actor, train_step returns None after its timeout."""
    import ray

    from rlfleet.learner.actor import make_learner_actor
    from rlfleet.replay.actor import make_replay_actor

    cfg = actor_config(tmp_path, learner_threads=2)
    replay = make_replay_actor(cfg.replay, seed=0, name="test-policy-learner-replay")
    learner = make_learner_actor(cfg, "test-policy-learner-replay", num_cpus=0)
    # cluster.learner_threads: Ray gives an actor of no CPU OMP_NUM_THREADS=1; the learner takes the 2 asked for
    assert ray.get(learner.__ray_call__.remote(lambda self: torch.get_num_threads()), timeout=60) == 2
    # ... more threads than its CPU: OpenMP's threads sleep at barriers (set in the worker's environment at its start)
    assert ray.get(learner.__ray_call__.remote(lambda self: os.environ.get("OMP_WAIT_POLICY")), timeout=60) == "PASSIVE"
    assert ray.get(learner.train_step.remote(0.2), timeout=60) is None
    local = make_learner()
    groups = two_groups(local.model)
    ray.get(replay.add.remote(groups), timeout=60)
    result = ray.get(learner.train_step.remote(30.0), timeout=120)
    metrics, handle = result.metrics, result.weights
    assert result.prompt_record_ids == [g.prompt_id for g in groups]  # the learner reports the batch it took
    assert metrics["policy_version"] == 1.0 and metrics["learner/sequences"] == 8.0
    local_metrics = local.train_step(groups)
    assert metrics["loss"] == pytest.approx(local_metrics["loss"], rel=1e-5)
    assert ray.get(learner.version.remote(), timeout=60) == 1
    assert handle.version == 1 and isinstance(handle.payload, ray.ObjectRef)  # the step published its weights
    again = ray.get(learner.publish_weights.remote(), timeout=60)
    assert again.version == 1 and np.array_equal(ray.get(again.payload).buffer, ray.get(handle.payload).buffer)
    published = unpack(ray.get(handle.payload, timeout=60))
    ray.get(learner.save.remote(str(tmp_path / "ckpt")), timeout=60)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "policy").state_dict()
    assert published.keys() == saved.keys()
    assert all(torch.equal(published[n], saved[n]) for n in saved)
    initial = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny")).state_dict()
    assert any(not torch.equal(published[n], initial[n]) for n in initial)


@pytest.mark.ray
def test_learner_actor_with_auto_threads_reports_and_switches_them(ray_cluster, tmp_path):
    """cluster.learner_threads: auto in the actor: it starts on the threads of its CPUs (learner_num_cpus: 1, whatever
    the process inherited), with passive OpenMP waits (it may borrow), reports the threads of each step as
    ``learner/threads``, and applies its rule's decisions (after its first step, one window with no wait: every core
    of its node). The waits of real steps depend on timing, so the window is given to its rule here; the rule is
    tested in tests/test_learner_threads.py."""
    import ray

    from rlfleet.learner.actor import make_learner_actor
    from rlfleet.learner.threads import WINDOW, node_cores
    from rlfleet.replay.actor import make_replay_actor

    if node_cores() < 2:
        pytest.skip("one core: nothing to borrow")
    cfg = actor_config(tmp_path, learner_threads="auto")
    replay = make_replay_actor(cfg.replay, seed=0, name="test-auto-threads-replay")
    learner = make_learner_actor(cfg, "test-auto-threads-replay", num_cpus=0)
    in_actor = lambda fn: ray.get(learner.__ray_call__.remote(fn), timeout=60)  # noqa: E731
    assert in_actor(lambda self: (torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"))) == (1, "PASSIVE")
    ray.get(replay.add.remote(two_groups(make_learner().model)), timeout=60)
    result = ray.get(learner.train_step.remote(30.0), timeout=120)
    assert result.metrics["learner/threads"] == 1.0
    in_actor(lambda self: [self.threads.observe(0.0, 1.0) for _ in range(WINDOW)])
    assert in_actor(lambda self: torch.get_num_threads()) == node_cores()


def test_batch_metrics_per_token_staleness_and_completion_lengths():
    """Trained at version 5. Group a: policy_version 3, tokens [[3, 4, 4], [4, 5, pad]] with lengths [3, 2];
    group b: version 5 throughout, lengths [1, 2], the second truncated. Per-group staleness: 5 - 3 = 2 and 0
    (mean 1, max 2). Per model token: lags [2, 1, 1, 1, 0] and [0, 0, 0] -> mean 5 / 8, max 2. Span: 5 - 3 = 2.
    Lengths [3, 2, 1, 2]: mean 2, min 1, max 3; one of four truncated, so those that ended with EOS are [3, 2, 1]:
    mean 2, min 1, max 3; a batch where none ended has 0 for them (TRL's convention)."""
    from rlfleet.learner.policy import batch_metrics

    def group(version, lengths, truncated, token_versions=None):
        n, t = len(lengths), 3
        return Group(prompt_id="p", prompt_token_ids=np.arange(2, dtype=np.int32),
                     completion_ids=np.ones((n, t), np.int32), completion_lengths=np.array(lengths, np.int32),
                     behaviour_logprobs=np.zeros((n, t), np.float32), rewards=np.array([0.0, 1.0], np.float32),
                     advantages=np.array([-1.0, 1.0], np.float32), truncated=np.array(truncated),
                     policy_version=version, reward_std=0.7, token_versions=token_versions)

    a = group(3, [3, 2], [False, False], np.array([[3, 4, 4], [4, 5, 3]], np.int32))
    b = group(5, [1, 2], [False, True])
    m = batch_metrics([a, b], policy_version=5)
    assert m["staleness/mean"] == 1.0 and m["staleness/max"] == 2.0
    assert m["staleness/token_mean"] == pytest.approx(5 / 8) and m["staleness/token_max"] == 2.0
    assert m["staleness/version_span_max"] == 2.0
    assert (m["completions/mean_length"], m["completions/min_length"], m["completions/max_length"]) == (2, 1, 3)
    assert m["completions/clipped_ratio"] == 0.25
    assert (m["completions/mean_terminated_length"], m["completions/min_terminated_length"],
            m["completions/max_terminated_length"]) == (2, 1, 3)
    assert m["staleness/masked_token_frac"] == 0.0 and m["staleness/masked_groups"] == 0.0
    # the token unit at max_staleness 1 (fresh from version 4): a's version-3 token goes (its pad's 3 never
    # counted), so 7 tokens train with lags [1, 1, 1, 0] and [0, 0, 0]: mean 3 / 7, max 1; 1 of 8 masked, in 1 group
    t = batch_metrics([a, b], policy_version=5, fresh_from=4)
    assert t["staleness/token_mean"] == pytest.approx(3 / 7) and t["staleness/token_max"] == 1.0
    assert t["staleness/masked_token_frac"] == pytest.approx(1 / 8) and t["staleness/masked_groups"] == 1.0
    assert t["staleness/max"] == 2.0  # the group's oldest token, trained or not
    cut = batch_metrics([group(5, [3, 3], [True, True])], policy_version=5)
    assert cut["completions/clipped_ratio"] == 1.0 and cut["completions/mean_length"] == 3
    assert (cut["completions/mean_terminated_length"], cut["completions/max_terminated_length"]) == (0, 0)
