"""rlfleet.learner.losses: the clipped policy loss (all loss types x importance-sampling levels) and DPO.

Hand-derived cases follow reference/trl-algorithms.md section 7 (cases 3, 4, 5, 6, 7, 12, 14). The TRL
comparisons call TRL 1.16's own ``GRPOTrainer._compute_loss`` / ``DPOTrainer._compute_loss`` code unbound, on a
stand-in ``self`` that supplies the log-probs (no model, no trainer construction, one process, GA = 1).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlfleet.generation.scoring import group_advantages
from rlfleet.config import AlgorithmConfig
from rlfleet.learner.losses import LossResult, PolicyLoss, dpo_loss, loss_normalizer, make_policy_loss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LEVELS = ["token", "sequence", "sequence_token"]


def _loss(loss_type="grpo", level="token", **knobs) -> PolicyLoss:
    return make_policy_loss(AlgorithmConfig(loss_type=loss_type, importance_sampling_level=level, **knobs))


def _single_tokens(w: list[float], adv: list[float]):
    """One token per row with ratio w: logprobs = log w (leaf), old = 0, mask all ones."""
    logprobs = torch.tensor(w).log().unsqueeze(1).requires_grad_()  # [B, 1]
    return logprobs, torch.zeros_like(logprobs), torch.tensor(adv), torch.ones_like(logprobs, dtype=torch.bool)


def _random_batch(seed: int, lengths=(7, 3, 0, 5, 1, 6), T: int = 7):
    """Random right-padded batch (row 2 fully masked); garbage (large values) beyond each row's length."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    logprobs = -3 * torch.rand(B, T, generator=g)
    batch = dict(
        logprobs=logprobs,
        proximal_logprobs=logprobs + 0.3 * torch.randn(B, T, generator=g),
        advantages=torch.randn(B, generator=g),
        mask=mask,
        ref_logprobs=logprobs + 0.2 * torch.randn(B, T, generator=g),
        is_weights=0.5 + torch.rand(B, T, generator=g),
    )
    for key in ("logprobs", "proximal_logprobs", "ref_logprobs", "is_weights"):
        batch[key] = torch.where(mask, batch[key], 50.0 * torch.randn(B, T, generator=g))
    return batch


def _run(loss_fn, batch, normalizer, **overrides) -> tuple[LossResult, torch.Tensor]:
    """Evaluate the loss with a fresh leaf for logprobs; returns the result and d loss / d logprobs."""
    b = {**batch, **overrides}
    logprobs = b.pop("logprobs").clone().requires_grad_()
    out = loss_fn(logprobs, normalizer=normalizer, **b)
    out.loss.backward()
    return out, logprobs.grad


# ---------------------------------------------------------------------------------------------- normalisation


def test_case3_normalisation_per_loss_type():
    """Case 3: per-token L = [[1, 2, 3, .], [4, ., ., .]], m = [[1,1,1,0],[1,0,0,0]], max_completion_length 4.
    With w = 1 and per-token advantages A = -L the surrogate is -min(A, A) = L.
    grpo: (6/3 + 4/1)/2 = 3.0; bnpo = dapo: 10/4 = 2.5; dr_grpo: 10/(2*4) = 1.25.
    Normalisers: grpo B = 2, bnpo/dapo N = 4, dr_grpo 2*4 = 8."""
    L = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    expected = {"grpo": (3.0, 2.0), "bnpo": (2.5, 4.0), "dapo": (2.5, 4.0), "dr_grpo": (1.25, 8.0)}
    for loss_type, (value, norm) in expected.items():
        assert loss_normalizer(loss_type, mask, 4) == norm
        out = _loss(loss_type)(torch.zeros(2, 4), torch.zeros(2, 4), -L, mask, norm)
        assert out.loss.item() == pytest.approx(value, abs=1e-6), loss_type


def test_normalizer_of_empty_mask_is_at_least_one_token():
    """No valid token: bnpo/dapo divide by max(0, 1) = 1; grpo still divides by B = 2."""
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert loss_normalizer("dapo", mask, 3) == 1.0 and loss_normalizer("grpo", mask, 3) == 2.0


# ---------------------------------------------------------------------------------------------- clipping


def test_case4_clipping_values_and_zero_gradient_when_clipped():
    """Case 4, eps = 0.2, eps_high = 0.28, rows (w, A), normaliser B = 4 (grpo), per-row loss -min(wA, clip(w)A):
    (1.5,+1): -min(1.5, 1.28) = -1.28 clipped;  (0.5,-1): -min(-0.5, -0.8) = 0.8 clipped;
    (0.5,+1): -min(0.5, 0.8) = -0.5;            (1.5,-1): -min(-1.5, -1.28) = 1.5.
    d/dlogp of -wA is -wA (dw/dlogp = w), /4: grads (0, 0, -0.125, 0.375); loss = (-1.28+0.8-0.5+1.5)/4 = 0.13."""
    logprobs, old, adv, mask = _single_tokens([1.5, 0.5, 0.5, 1.5], [1.0, -1.0, 1.0, -1.0])
    out = _loss(epsilon=0.2, epsilon_high=0.28)(logprobs, old, adv, mask, 4.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.13, abs=1e-6)
    np.testing.assert_allclose(logprobs.grad.squeeze(1), [0.0, 0.0, -0.125, 0.375], atol=1e-6)


def test_case4_delta_caps_the_unclipped_ratio_with_zero_gradient():
    """delta = 1.4, (w, A) = (1.5, -1): -min(min(1.5, 1.4) * -1, 1.28 * -1) = 1.4; the cap is flat -> grad 0."""
    logprobs, old, adv, mask = _single_tokens([1.5], [-1.0])
    out = _loss(epsilon=0.2, epsilon_high=0.28, delta=1.4)(logprobs, old, adv, mask, 1.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(1.4, abs=1e-6)
    assert logprobs.grad.item() == 0.0


def test_clip_and_ratio_metrics_are_token_fractions():
    """Rows of case 4 (eps 0.2 / 0.28): low clip = (0.5, -1) -> 1/4; high = (1.5, +1) -> 1/4; either 2/4.
    ratio mean (1.5+0.5+0.5+1.5)/4 = 1, min 0.5, max 1.5; is weights (1, 2, 3, 2) -> mean 2."""
    logprobs, old, adv, mask = _single_tokens([1.5, 0.5, 0.5, 1.5], [1.0, -1.0, 1.0, -1.0])
    m = _loss(epsilon=0.2, epsilon_high=0.28)(
        logprobs, old, adv, mask, 4.0, is_weights=torch.tensor([1.0, 2.0, 3.0, 2.0])
    ).metrics
    assert m["clip/low_frac"] == 0.25 and m["clip/high_frac"] == 0.25 and m["clip/frac"] == 0.5
    assert m["ratio/mean"] == pytest.approx(1.0) and m["ratio/min"] == pytest.approx(0.5)
    assert m["ratio/max"] == pytest.approx(1.5) and m["is_weight/mean"] == pytest.approx(2.0)
    assert all(isinstance(v, float) for v in m.values())


# ---------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize(
    ("ref", "logp", "kl", "grad"), [(-1.0, -1.2, 0.0214028, -0.2214028), (-1.2, -1.0, 0.0187308, 0.1812692)]
)
def test_case5_k3_kl_value_and_gradient(ref, logp, kl, grad):
    """Case 5, beta = 1, A = 0 (no policy term): d = ref - logp; KL = e^d - d - 1.
    d = 0.2: e^0.2 - 1.2 = 0.0214028; d = -0.2: e^-0.2 - 0.8 = 0.0187308.
    dKL/dlogp = -e^d + 1: 1 - e^0.2 = -0.2214028; 1 - e^-0.2 = 0.1812692."""
    logprobs = torch.tensor([[logp]], requires_grad=True)
    ref_logprobs = torch.tensor([[ref]])
    out = _loss(beta=1.0)(logprobs, logprobs.detach(), torch.zeros(1), torch.ones(1, 1), 1.0, ref_logprobs=ref_logprobs)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(kl, abs=1e-6)
    assert out.metrics["loss/kl"] == pytest.approx(kl, abs=1e-6) and out.metrics["loss/policy"] == 0.0
    assert logprobs.grad.item() == pytest.approx(grad, abs=1e-6)


def test_kl_is_scaled_by_beta_and_needs_ref_logprobs():
    """beta = 0.5, one token with d = 0.2: loss = 0.5 * 0.0214028 = 0.0107014; loss/kl reports KL without beta."""
    lp = torch.tensor([[-1.2]])
    out = _loss(beta=0.5)(lp, lp, torch.zeros(1), torch.ones(1, 1), 1.0, ref_logprobs=torch.tensor([[-1.0]]))
    assert out.loss.item() == pytest.approx(0.0107014, abs=1e-6)
    assert out.metrics["loss/kl"] == pytest.approx(0.0214028, abs=1e-6)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        _loss(beta=0.5)(lp, lp, torch.zeros(1), torch.ones(1, 1), 1.0)


# ---------------------------------------------------------------------------------------------- IS weights


def test_is_weights_scale_the_policy_term_only_and_are_detached():
    """One unclipped token, w = 1.1, A = 1, beta = 1, KL(d = 0.2) = 0.0214028, rho = 2 (given with grad).
    loss = -2 * 1.1 + 0.0214028 = -2.1785972; d/dlogp = -2*1.1 + (1 - e^0.2) = -2.4214028; rho gets no grad.
    Per-sequence rho of shape [B] broadcasts over tokens: same result."""
    for rho in (torch.tensor([[2.0]], requires_grad=True), torch.tensor([2.0], requires_grad=True)):
        lp = torch.tensor([[math.log(1.1)]], requires_grad=True)
        ref = lp.detach() + 0.2
        out = _loss(beta=1.0)(
            lp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), 1.0, ref_logprobs=ref, is_weights=rho
        )
        out.loss.backward()
        assert out.loss.item() == pytest.approx(-2.1785972, abs=1e-6)
        assert lp.grad.item() == pytest.approx(-2.4214028, abs=1e-6)
        assert rho.grad is None


# ---------------------------------------------------------------------------------------------- GSPO


def test_case6_gspo_sequence_ratio_and_clipping():
    """Case 6: l = (0.1, -0.2, 0.4, pad 0.7), m = (1, 1, 1, 0): mean l = 0.3/3 = 0.1, s = e^0.1 = 1.105171.
    eps = 3e-4, eps_high = 4e-4. A = +1: -min(1.105171, 1.0004) = -1.0004, clipped -> zero gradient.
    A = -1: -min(-1.105171, -1.0004) = 1.105171, unclipped: d/dlogp_t = s/3 = 0.368390 on valid tokens."""
    old = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    for level in ("sequence", "sequence_token"):
        loss_fn = _loss("grpo", level, epsilon=3e-4, epsilon_high=4e-4)
        for adv, value, grad in ((1.0, -1.0004, 0.0), (-1.0, 1.105171, 0.368390)):
            lp = torch.tensor([[0.1, -0.2, 0.4, 0.7]], requires_grad=True)
            out = loss_fn(lp, old, torch.tensor([adv]), mask, 1.0)
            out.loss.backward()
            assert out.loss.item() == pytest.approx(value, abs=1e-6), (level, adv)
            np.testing.assert_allclose(lp.grad, [[grad, grad, grad, 0.0]], atol=1e-6)
            assert out.metrics["ratio/mean"] == pytest.approx(1.105171, abs=1e-6)


CASE7 = dict(
    logprobs=torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -0.1, 5.0, 5.0]]),
    proximal_logprobs=torch.tensor([[-1.1, -1.9, -0.6, -3.0], [-0.6, -0.2, 0.0, 0.0]]),
    advantages=torch.tensor([0.7, -1.3]),
    mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
@pytest.mark.parametrize(
    ("loss_type", "norm", "value", "grads"),
    [("grpo", 2.0, 0.291140, (-0.089715, 0.325000)), ("dapo", 6.0, -0.045147, (-0.119620, 0.216667))],
)
def test_case7_gspo_and_gspo_token_agree_with_constant_advantages(level, loss_type, norm, value, grads):
    """Case 7: l row 0 = (0.1, -0.1, 0.1, 0) -> mean 0.025, s0 = 1.025315; row 1 = (-0.1, 0.1) -> s1 = 1.
    Both within [0.8, 1.2]: unclipped. Per-token loss -s A: row 0 -0.717721, row 1 +1.3.
    grpo: (-0.717721 + 1.3)/2 = 0.291140; grad row 0 = -0.7*s0/(4*2) = -0.089715, row 1 = 1.3/(2*2) = 0.325.
    dapo (N = 6): (4*-0.717721 + 2*1.3)/6 = -0.045147; grads -0.7*s0/6 = -0.119620, 1.3/6 = 0.216667.
    Padding gets gradient 0."""
    out, grad = _run(_loss(loss_type, level), CASE7, norm)
    assert out.loss.item() == pytest.approx(value, abs=1e-6)
    expected = torch.tensor([[grads[0]] * 4, [grads[1]] * 2 + [0.0, 0.0]])
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


def test_case7_token_level_value():
    """Token level: row 0 w = (e^.1, e^-.1, e^.1, 1), mean 1.028795 -> -0.7 * 1.028795 = -0.720156;
    row 1 w = (e^-.1, e^.1), A = -1.3 -> 1.3 * 1.005004 = 1.306505; grpo: (-0.720156 + 1.306505)/2 = 0.293175."""
    out, _ = _run(_loss("grpo", "token"), CASE7, 2.0)
    assert out.loss.item() == pytest.approx(0.293175, abs=1e-6)


def test_gspo_token_differs_from_gspo_with_per_token_advantages():
    """Row 0 of case 7 alone (s = 1.025315, unclipped), per-token A = (1, -1, 0.5, 0.2), grpo, B = 1, len 4.
    Both forward values: mean_t(-s A_t) = -s * 0.7/4 = -0.179430.
    GSPO: loss = -(s/4) sum_t A_t, ds/dlogp_t = s/4 -> every token: -(0.7/4) * s/4 = -0.044858.
    GSPO-token: d/dlogp_t = -s A_t / 4 = (-0.256329, 0.256329, -0.128164, -0.051266)."""
    batch = dict(
        logprobs=CASE7["logprobs"][:1],
        proximal_logprobs=CASE7["proximal_logprobs"][:1],
        advantages=torch.tensor([[1.0, -1.0, 0.5, 0.2]]),
        mask=torch.ones(1, 4),
    )
    seq, seq_grad = _run(_loss("grpo", "sequence"), batch, 1.0)
    tok, tok_grad = _run(_loss("grpo", "sequence_token"), batch, 1.0)
    assert seq.loss.item() == pytest.approx(-0.179430, abs=1e-6)
    assert tok.loss.item() == pytest.approx(-0.179430, abs=1e-6)
    torch.testing.assert_close(seq_grad, torch.full((1, 4), -0.044858), atol=1e-6, rtol=0)
    torch.testing.assert_close(tok_grad, torch.tensor([[-0.256329, 0.256329, -0.128164, -0.051266]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- masks


def test_case14_truncated_completion_masked_by_caller_still_counts_in_grpo_batch():
    """Case 14: completions [5, 6, 7] (truncated at max_len 3, no EOS 2) and [5, 2]; the caller masks the first
    entirely. Advantages come from both rows (here +1 / -1). Row 1: w = 1, A = -1 -> per-token loss 1.
    grpo: normaliser B = 2 (the masked row counts): (0 + 2/2)/2 = 0.5; dapo: N = 2 -> 2/2 = 1.0.
    The truncated row gets zero gradient."""
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -0.2, 0.0]])
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    batch = dict(logprobs=lp, proximal_logprobs=lp, advantages=torch.tensor([1.0, -1.0]), mask=mask)
    for loss_type, value in (("grpo", 0.5), ("dapo", 1.0)):
        out, grad = _run(_loss(loss_type), batch, loss_normalizer(loss_type, mask, 3))
        assert out.loss.item() == pytest.approx(value, abs=1e-6)
        assert (grad[0] == 0).all() and (grad[1, :2] != 0).all()


@pytest.mark.parametrize("level", LEVELS)
def test_fully_masked_rows_give_finite_zero_contribution(level):
    """A batch whose only row is fully masked: loss 0 (not NaN), gradient 0, ratio/min NaN by definition."""
    lp = torch.randn(1, 3)
    batch = dict(logprobs=lp, proximal_logprobs=lp + 1.0, advantages=torch.ones(1), mask=torch.zeros(1, 3))
    out, grad = _run(_loss("grpo", level, beta=0.1), batch, 1.0, ref_logprobs=lp - 1.0)
    assert out.loss.item() == 0.0 and (grad == 0).all()
    assert out.metrics["clip/frac"] == 0.0 and math.isnan(out.metrics["ratio/min"])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_columns_with_garbage_change_nothing(loss_type, level):
    """Append 3 masked columns holding NaN / +-inf / huge values to every [B, T] input (per-token advantages
    too): loss and gradient on the real columns are unchanged, the padded columns get gradient 0."""
    batch = _random_batch(1)
    batch["advantages"] = batch["advantages"][:, None].expand(-1, 7).clone()
    loss_fn = _loss(loss_type, level, beta=0.04)
    norm = loss_normalizer(loss_type, batch["mask"], 16)
    base, base_grad = _run(loss_fn, batch, norm)
    garbage = torch.tensor([float("nan"), float("inf"), -1e30]).expand(6, 3)
    padded = {k: torch.cat([v, garbage if v.dtype != torch.bool else v[:, :3] & False], 1) for k, v in batch.items()}
    out, grad = _run(loss_fn, padded, loss_normalizer(loss_type, padded["mask"], 16))
    assert out.loss.item() == pytest.approx(base.loss.item(), abs=1e-6)
    torch.testing.assert_close(grad[:, :7], base_grad, atol=1e-7, rtol=0)
    assert (grad[:, 7:] == 0).all()
    assert out.metrics == pytest.approx(base.metrics, abs=1e-6)


# ---------------------------------------------------------------------------------------------- invariances


def _micro_batches(loss_fn, batch, normalizer) -> tuple[float, torch.Tensor]:
    """The 7-column batch in micro-batches of rows 0:2, 2:3 and 3:6, each trimmed to its own longest row: the sum
    of their losses and their gradients, padded back to 7 columns and concatenated."""
    total, grads = 0.0, []
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        t = max(int(batch["mask"][lo:hi].sum(1).max()), 1)
        part, grad = _run(loss_fn, {k: v[lo:hi, :t] if v.dim() == 2 else v[lo:hi] for k, v in batch.items()},
                          normalizer)
        total += part.loss.item()
        grads.append(torch.nn.functional.pad(grad, (0, 7 - t)))
    return total, torch.cat(grads)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_with_shared_normalizer_sum_to_full_batch(loss_type, level):
    """Split 6 rows into micro-batches (0:2, 2:3, 3:6), each trimmed to its own longest row, with KL and IS
    weights; one normaliser from the full mask. Sum of losses and the concatenated gradients equal the full batch."""
    batch = _random_batch(3)  # seed 3: 32% of tokens clipped at token level, 14% (one sequence) at sequence level
    loss_fn = _loss(loss_type, level, beta=0.04, epsilon=0.1, epsilon_high=0.15)
    norm = loss_normalizer(loss_type, batch["mask"], 12)
    full, full_grad = _run(loss_fn, batch, norm)
    assert full.metrics["clip/frac"] > 0  # the case exercises clipping
    total, grads = _micro_batches(loss_fn, batch, norm)
    assert total == pytest.approx(full.loss.item(), abs=1e-6)
    torch.testing.assert_close(grads, full_grad, atol=1e-7, rtol=0)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_equal_rewards_give_zero_advantages_and_zero_policy_gradient(loss_type, level):
    """Rewards (3, 3, 3, 3) -> mu 3, std 0 -> A = 0 -> every surrogate term -min(w*0, clip(w)*0) = 0."""
    adv = torch.from_numpy(group_advantages(np.full((1, 4), 3.0), "group").advantages[0])
    batch = _random_batch(3, lengths=(7, 3, 5, 1))
    out, grad = _run(_loss(loss_type, level), batch, 4.0, advantages=adv, ref_logprobs=None, is_weights=None)
    assert out.loss.item() == 0.0 and (grad == 0).all()


# ---------------------------------------------------------------------------------------------- CISPO and SAPO


def test_cispo_value_and_gradient_by_hand():
    """CISPO, cap epsilon_high = 5: w = (7, 2, 0.5), A = (1, -1, 1), one token each (logp = log w, old = 0).
    Per token L = -min(w, 5) A log w and dL/dlogp = -min(w, 5) A = (-5, 2, -0.5); normaliser = 3 tokens. The
    weight 7 is capped but its token keeps a gradient (PPO's clip would give it none); only it counts as clipped."""
    logprobs, old, adv, mask = _single_tokens([7.0, 2.0, 0.5], [1.0, -1.0, 1.0])
    out = _loss("cispo", epsilon_high=5.0)(logprobs, old, adv, mask, normalizer=3.0)
    out.loss.backward()
    expected = (-5 * math.log(7) + 2 * math.log(2) - 0.5 * math.log(0.5)) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(logprobs.grad.squeeze(1), torch.tensor([-5.0, 2.0, -0.5]) / 3)
    assert out.metrics["clip/high_frac"] == pytest.approx(1 / 3) and out.metrics["clip/low_frac"] == 0.0
    assert out.metrics["clip/frac"] == pytest.approx(1 / 3)


def test_sapo_value_and_gradient_by_hand():
    """SAPO, tau+ = 1, tau- = 1.05: w = (1, 2, 0.5), A = (1, 1, -1), one token per sequence, grpo aggregation
    (normaliser B = 3). L = -(4/tau) sigmoid(tau (w - 1)) A; dL/dlogp = -4 p (1 - p) w A with p = sigmoid(tau (w-1)):
    at w = 1 exactly -A (the plain policy gradient); nothing is hard-clipped."""
    def sig(x):
        return 1 / (1 + math.exp(-x))

    logprobs, old, adv, mask = _single_tokens([1.0, 2.0, 0.5], [1.0, 1.0, -1.0])
    out = _loss("sapo")(logprobs, old, adv, mask, normalizer=3.0)
    out.loss.backward()
    p = [sig(0.0), sig(1.0), sig(1.05 * -0.5)]
    values = [-4 * p[0], -4 * p[1], (4 / 1.05) * p[2]]
    grads = [-4 * p[0] * (1 - p[0]) * 1.0, -4 * p[1] * (1 - p[1]) * 2.0, 4 * p[2] * (1 - p[2]) * 0.5]
    assert grads[0] == -1.0
    assert out.loss.item() == pytest.approx(sum(values) / 3, abs=1e-6)
    torch.testing.assert_close(logprobs.grad.squeeze(1), torch.tensor(grads) / 3)
    assert out.metrics["clip/frac"] == 0.0


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_cispo_and_sapo_micro_batches_sum_to_full_batch_and_ignore_padding(loss_type, level):
    """As for the clipped losses: micro-batches (0:2, 2:3, 3:6) with one normaliser sum to the full batch in loss
    and gradient (KL and IS weights on), and masked columns of NaN / inf change nothing."""
    batch = _random_batch(3)
    loss_fn = _loss(loss_type, level, beta=0.04, epsilon_high=1.2)
    norm = loss_normalizer(loss_type, batch["mask"], 12)
    full, full_grad = _run(loss_fn, batch, norm)
    if loss_type == "cispo":
        assert full.metrics["clip/frac"] > 0  # the cap binds somewhere
    total, grads = _micro_batches(loss_fn, batch, norm)
    assert total == pytest.approx(full.loss.item(), abs=1e-6)
    torch.testing.assert_close(grads, full_grad, atol=1e-7, rtol=0)
    garbage = torch.tensor([float("nan"), float("inf"), -1e30]).expand(6, 3)
    padded = {k: torch.cat([v, garbage if v.dtype != torch.bool else v[:, :3] & False], 1) if v.dim() == 2 else v
              for k, v in batch.items()}
    out, grad = _run(loss_fn, padded, loss_normalizer(loss_type, padded["mask"], 12))
    assert out.loss.item() == pytest.approx(full.loss.item(), abs=1e-6)
    torch.testing.assert_close(grad[:, :7], full_grad, atol=1e-7, rtol=0)
    assert (grad[:, 7:] == 0).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_cispo_and_sapo_equal_rewards_give_zero_policy_gradient(loss_type, level):
    adv = torch.from_numpy(group_advantages(np.full((1, 4), 3.0), "group").advantages[0])
    batch = _random_batch(3, lengths=(7, 3, 5, 1))
    out, grad = _run(_loss(loss_type, level, epsilon_high=5.0), batch, 4.0, advantages=adv, ref_logprobs=None,
                     is_weights=None)
    assert out.loss.item() == 0.0 and (grad == 0).all()


def test_the_config_names_what_cispo_and_sapo_need_and_ignore():
    from rlfleet.config import surrogate_problems

    def problems(**fields):
        return surrogate_problems(AlgorithmConfig(**fields))

    assert problems(loss_type="cispo", epsilon_high=5.0) == [] and problems(loss_type="sapo") == []
    assert problems(loss_type="cispo") == [
        "algorithm.epsilon_high: required with loss_type cispo, which caps the importance weight at epsilon_high "
        "itself (TRL's meaning, not 1 + epsilon_high); ScaleRL recommends 5.0."]
    assert problems(loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence_token") == [
        "algorithm.importance_sampling_level: sequence_token with loss_type cispo is 'sequence' itself (CISPO's "
        "weight carries no gradient, every token's log-prob does); use sequence."]
    assert problems(loss_type="sapo", delta=1.5) == [
        "algorithm.delta: 1.5 caps the clipped surrogate's ratio, which loss_type sapo does not use; remove it."]
    assert problems(loss_type="dapo", sapo_temperature_neg=2.0) == [
        "algorithm.sapo_temperature_neg: 2 is SAPO's; set loss_type sapo or remove it."]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_cispo_and_sapo_match_trl_grpo_trainer(trl_trainers, loss_type, level):
    """TRL 1.16's cispo (dapo's normaliser) and sapo (grpo's), on the inputs of the clipped-loss comparison with
    cap 1.1 for cispo (it binds on 5 of 24 tokens, and on 1 of 6 sequences): loss and gradient equal ours. TRL's cispo_clip_ratio counts capped
    tokens with A > 0 only; ours counts every capped token (the cap scales both signs), so the metric is not compared."""
    batch = _random_batch(7, lengths=(7, 3, 5, 1, 6, 2))
    batch = {k: torch.where(batch["mask"], v, 0.0) if v.dim() == 2 and k != "mask" else v for k, v in batch.items()}
    if level == "sequence":
        batch["is_weights"] = batch["is_weights"][:, :1].expand(-1, 7).clone()
    trl_loss, trl_grad, trl_metrics = _trl_grpo(trl_trainers[0], loss_type, level, batch, 9, eps=0.2, eps_high=1.1,
                                                delta=None, beta=0.04)
    ours_fn = _loss(loss_type, level, epsilon_high=1.1, beta=0.04)
    is_w = batch["is_weights"] if level == "token" else batch["is_weights"][:, 0]
    ours, grad = _run(ours_fn, batch, loss_normalizer(loss_type, batch["mask"], 9), is_weights=is_w)
    assert ours.loss.item() == pytest.approx(trl_loss, abs=1e-6)
    torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=0)
    assert ours.metrics["loss/kl"] == pytest.approx(trl_metrics["kl"], abs=1e-6)
    if loss_type == "cispo":
        assert ours.metrics["clip/frac"] > 0


# ---------------------------------------------------------------------------------------------- rollout correction


def _two_rows():
    """Row 0: learner/engine probabilities (0.5 | 0.25), (0.2 | 0.4), a masked third token: r = 2, 0.5.
    Row 1: (0.5 | 0.25) twice: r = 2, 2 (sequence ratio 4, geometric mean 2), masked third token."""
    learner = torch.tensor([[0.5, 0.2, 0.9], [0.5, 0.5, 0.7]]).log()
    engine = torch.tensor([[0.25, 0.4, 0.1], [0.25, 0.25, 0.1]]).log()
    return learner, engine, torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)


@pytest.mark.parametrize("mode, level, rho, changed", [
    ("truncate", "token", [[1.5, 0.5, 0], [1.5, 1.5, 0]], 3 / 4),
    ("mask", "token", [[0, 0, 0], [0, 0, 0]], 1.0),
    ("truncate", "sequence", [[1.0, 1.0, 0], [1.5, 1.5, 0]], 2 / 4),
    ("mask", "sequence", [[1, 1, 0], [0, 0, 0]], 2 / 4),
    ("truncate", "geometric", [[1.0, 1.0, 0], [1.5, 1.5, 0]], 2 / 4),
    ("mask", "geometric", [[1, 1, 0], [0, 0, 0]], 2 / 4),
])
def test_rollout_weights_by_hand(mode, level, rho, changed):
    """Upper bound 1.5 for both; mask adds the lower bound 0.6 (truncate has none, so its r = 0.5 stays 0.5).
    Token ratios (2, 0.5 | 2, 2): truncate -> (1.5, 0.5 | 1.5, 1.5), 3 of 4 changed; mask -> all 4 leave [0.6, 1.5].
    Sequence ratios 2 * 0.5 = 1 (inside) and 4 (above); geometric means 1 and 2 (above): row 0 kept, row 1 cut to
    1.5 or masked, 2 of 4 tokens. Masked positions get 0."""
    learner, engine, mask = _two_rows()
    low = None if mode == "truncate" else 0.6
    from rlfleet.learner.losses import rollout_weights
    is_weights, stats = rollout_weights(learner, engine, mask, mode, level, low, 1.5)
    torch.testing.assert_close(is_weights, torch.tensor(rho, dtype=is_weights.dtype), atol=1e-6, rtol=0)
    assert stats == pytest.approx({f"rollout/{'truncated' if mode == 'truncate' else 'masked'}_frac": changed})


def test_rollout_gap_by_hand():
    """r = (2, 0.5 | 2, 2) on the valid tokens: k3 = r - 1 - log r = 1 - ln 2 = 0.306853 for r = 2 and
    -0.5 + ln 2 = 0.193147 for r = 0.5; token mean (3 * 0.306853 + 0.193147) / 4 = 0.278426; extremes 0.5 and 2."""
    from rlfleet.learner.losses import rollout_gap
    learner, engine, mask = _two_rows()
    gap = rollout_gap(learner, engine, mask)
    assert gap["rollout/kl"] == pytest.approx((3 * (1 - math.log(2)) + (math.log(2) - 0.5)) / 4, abs=1e-6)
    assert (gap["rollout/ratio/min"], gap["rollout/ratio/max"]) == pytest.approx((0.5, 2.0))
    same = rollout_gap(learner, learner, mask)
    assert same["rollout/kl"] == 0.0 and (same["rollout/ratio/min"], same["rollout/ratio/max"]) == (1.0, 1.0)


def test_rollout_correction_bounds_are_checked():
    from rlfleet.config import surrogate_problems

    def problems(**fields):
        return surrogate_problems(AlgorithmConfig(**fields))

    assert problems(rollout_correction="mask", rollout_correction_min=0.5, rollout_correction_max=2.0) == []
    assert problems(rollout_correction="truncate", rollout_correction_max=None) == [
        "algorithm.rollout_correction: truncate with neither rollout_correction_min nor rollout_correction_max; set a "
        "bound (e.g. rollout_correction_max: 3.0)."]
    assert problems(rollout_correction="mask", rollout_correction_max=0.9) == [
        "algorithm.rollout_correction_max: 0.9 leaves r = 1 (a token the engine and the learner agree on) outside the "
        "band; keep rollout_correction_min <= 1 <= rollout_correction_max (e.g. 0.5 and 2.0)."]


# ---------------------------------------------------------------------------------------------- config binding


def test_make_policy_loss_binds_config_once():
    """epsilon_high None falls back to epsilon; unknown variants are rejected when built, not at step time."""
    cfg = AlgorithmConfig(loss_type="dr_grpo", importance_sampling_level="sequence", epsilon=0.3, beta=0.1)
    fn = make_policy_loss(cfg)
    assert (fn.loss_type, fn.importance_sampling_level, fn.epsilon_low, fn.epsilon_high, fn.delta, fn.beta) == (
        "dr_grpo", "sequence", 0.3, 0.3, None, 0.1,
    )
    with pytest.raises(ValueError, match="loss_type"):
        PolicyLoss("luspo", "token", 0.2, 0.2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        PolicyLoss("grpo", "tokens", 0.2, 0.2)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same"):
        _loss()(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), 1.0)


# ---------------------------------------------------------------------------------------------- DPO


def test_case12_dpo_sigmoid_value_metrics_and_gradient():
    """Case 12: policy (c, r) = (-10, -12), ref (-11, -11), beta 0.1. Delta = (1) - (-1) = 2;
    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139. rewards c/r = +0.1 / -0.1, margin 0.2, accuracy 1.
    d loss/d logp_c = -beta * sigmoid(-0.2) = -0.1 * 0.450166 = -0.0450166; d/d logp_r = +0.0450166."""
    c, r = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    out = dpo_loss(c, r, torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert out.metrics == pytest.approx(
        {"rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margins": 0.2, "rewards/accuracies": 1.0}, abs=1e-6
    )
    assert c.grad.item() == pytest.approx(-0.0450166, abs=1e-6) and r.grad.item() == pytest.approx(0.0450166, abs=1e-6)


def test_dpo_micro_batches_with_shared_normalizer_sum_to_full_batch():
    """Two pairs: margins beta*Delta = 0.2 and -0.1. Full loss (0.598139 + log(1+e^0.1) = 0.744397)/2 = 0.671268;
    each pair alone with normaliser 2 gives half its term, and the halves sum to the full loss."""
    c, r = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    full = dpo_loss(c, r, rc, rr, beta=0.1).loss.item()
    parts = sum(dpo_loss(c[i : i + 1], r[i : i + 1], rc[i : i + 1], rr[i : i + 1], 0.1, 2).loss.item() for i in (0, 1))
    assert full == pytest.approx(0.671268, abs=1e-6) and parts == pytest.approx(full, abs=1e-7)


# ---------------------------------------------------------------------------------------------- TRL 1.16


class _OneProcessAccelerator:
    num_processes = 1
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


@pytest.fixture(scope="module")
def trl_trainers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grpo = pytest.importorskip("trl.trainer.grpo_trainer")
        dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    return grpo.GRPOTrainer, dpo.DPOTrainer


def _trl_grpo(trainer_cls, loss_type, level, batch, max_len, eps, eps_high, delta, beta):
    """TRL 1.16 GRPOTrainer._compute_loss on given per-token log-probs (one process, GA = steps_per_generation = 1,
    no entropy mask, vLLM IS correction on with our is_weights as its importance_sampling_ratio)."""
    logprobs = batch["logprobs"].clone().requires_grad_()
    mask = batch["mask"].float()
    B, T = logprobs.shape
    is_ratio = batch["is_weights"] if level == "token" else batch["is_weights"][:, :1]
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1,
                             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
        use_vllm=True, vllm_importance_sampling_correction=True, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=_OneProcessAccelerator(),
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    inputs = dict(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, advantages=batch["advantages"],
        old_per_token_logps=batch["proximal_logprobs"], ref_per_token_logps=batch["ref_logprobs"],
        num_items_in_batch=mask.sum(), importance_sampling_ratio=is_ratio,
    )  # fmt: skip
    loss = trainer_cls._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.item(), logprobs.grad, {k: v[0] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_matches_trl_grpo_trainer(trl_trainers, loss_type, level):
    """Random inputs (rows of length 7, 3, 5, 1, 6, 2), eps 0.1 / 0.15, delta 1.3, beta 0.04, IS weights:
    TRL's loss and gradient equal ours (its padding values are finite here: TRL multiplies by the mask).
    Token level: its kl and clip_ratio/{low,high,region}_mean (token-weighted) equal our metrics."""
    batch = _random_batch(7, lengths=(7, 3, 5, 1, 6, 2))
    batch = {k: torch.where(batch["mask"], v, 0.0) if v.dim() == 2 and k != "mask" else v for k, v in batch.items()}
    if level == "sequence":
        batch["is_weights"] = batch["is_weights"][:, :1].expand(-1, 7).clone()
    knobs = dict(eps=0.1, eps_high=0.15, delta=1.3, beta=0.04)
    trl_loss, trl_grad, trl_metrics = _trl_grpo(trl_trainers[0], loss_type, level, batch, 9, **knobs)
    ours_fn = _loss(loss_type, level, epsilon=0.1, epsilon_high=0.15, delta=1.3, beta=0.04)
    is_w = batch["is_weights"] if level == "token" else batch["is_weights"][:, 0]
    ours, grad = _run(ours_fn, batch, loss_normalizer(loss_type, batch["mask"], 9), is_weights=is_w)
    assert ours.loss.item() == pytest.approx(trl_loss, abs=1e-6)
    torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=0)
    assert ours.metrics["loss/kl"] == pytest.approx(trl_metrics["kl"], abs=1e-6)
    assert ours.metrics["clip/frac"] > 0  # 42% of tokens clipped at token level, 25% at sequence level
    if level == "token":
        for ours_key, trl_key in (("low_frac", "low_mean"), ("high_frac", "high_mean"), ("frac", "region_mean")):
            assert ours.metrics[f"clip/{ours_key}"] == pytest.approx(trl_metrics[f"clip_ratio/{trl_key}"], abs=1e-6)


def test_dpo_loss_matches_trl_dpo_trainer(trl_trainers):
    """TRL 1.16 DPOTrainer._compute_loss (sigmoid, reverse KL, precomputed reference log-probs) on a stand-in model
    whose per-token log-probs are the sequence log-probs (one completion token per row): loss, gradients and
    rewards/* metrics equal ours on 5 random pairs."""
    g = torch.Generator().manual_seed(11)
    c, r, rc, rr = (torch.randn(5, generator=g) * 3 for _ in range(4))
    seq = torch.cat([c, r]).clone().requires_grad_()  # [chosen; rejected], TRL's layout
    model = lambda **kw: SimpleNamespace(  # noqa: E731
        log_probs=seq.unsqueeze(1), entropy=torch.zeros(10, 1), mean_logits=torch.zeros(10, 1),
        is_top1=torch.zeros(10, 1, dtype=torch.bool),
    )  # fmt: skip
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_OneProcessAccelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
        loss_weights=[1.0], beta=0.1, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = dict(
        input_ids=torch.zeros(10, 2, dtype=torch.long), attention_mask=torch.ones(10, 2, dtype=torch.long),
        completion_mask=torch.tensor([[0, 1]] * 10), ref_chosen_logps=rc, ref_rejected_logps=rr,
    )  # fmt: skip
    trl_loss = trl_trainers[1]._compute_loss(fake, model, inputs, return_outputs=False)
    trl_loss.backward()
    ours_c, ours_r = c.clone().requires_grad_(), r.clone().requires_grad_()
    ours = dpo_loss(ours_c, ours_r, rc, rr, beta=0.1)
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    torch.testing.assert_close(torch.cat([ours_c.grad, ours_r.grad]), seq.grad, atol=1e-7, rtol=0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours.metrics[key] == pytest.approx(fake._metrics["train"][key][0], abs=1e-6), key
