"""rlfleet.generation.scoring: reward combination, group advantages, GFPO selection, function resolution.

Expected values come from hand arithmetic in the docstrings (reference/trl-algorithms.md section 7 cases 1, 2, 9)
or from an independent re-statement of TRL's formula with TRL's own ``nanstd``.
"""

from __future__ import annotations

import numpy as np
import pytest

from rlfleet.generation.scoring import (
    BUILTIN_GROUP_FILTERS,
    combine_rewards,
    group_advantages,
    select_top_k,
    shortest,
    token_efficiency,
)
from rlfleet.user_code import resolve_function

NAN = float("nan")
CASE1 = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])


# ---------------------------------------------------------------------------------------------- combine_rewards


def test_combine_rewards_weighted_nansum_and_unscorable_rows():
    """per_func rows = functions, columns = completions; weights (2, 0.5).

    col 0: 2*1 + 0.5*4 = 4;  col 1: f1 None -> 0.5*4 = 2;  col 2: f2 None -> 2*3 = 6;  col 3: both None -> NaN.
    """
    per_func = np.array([[1.0, NAN, 3.0, NAN], [4.0, 4.0, NAN, NAN]])
    out = combine_rewards(per_func, [2.0, 0.5])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:3], [4.0, 2.0, 6.0])
    assert np.isnan(out[3])


def test_combine_rewards_default_weights_are_one_and_zero_weight_still_scores():
    """weights None: col 0 = 1 + 4 = 5. A zero weight still makes the row scorable: (0, 1) on [[NaN], [7]] -> 7,
    and on [[2], [NaN]] -> 0*2 = 0 (not NaN)."""
    np.testing.assert_array_equal(combine_rewards(np.array([[1.0], [4.0]]), None), [5.0])
    np.testing.assert_array_equal(combine_rewards(np.array([[NAN, 2.0], [7.0, NAN]]), [0.0, 1.0]), [7.0, 0.0])


def test_combine_rewards_rejects_wrong_number_of_weights():
    with pytest.raises(ValueError, match="2 weights for 3 reward functions"):
        combine_rewards(np.zeros((3, 4)), [1.0, 1.0])


# ---------------------------------------------------------------------------------------------- group_advantages


def test_advantages_case1_group_scaling():
    """Case 1, "group". Group 1: mu = 2.5, deviations (-1.5, -0.5, 0.5, 1.5), sum of squares 5,
    std = sqrt(5/3) = 1.290994; A = dev / 1.291094 = (-1.161805, -0.387268, 0.387268, 1.161805).
    Group 2: all 1 -> std 0 -> zero_std, A = 0."""
    out = group_advantages(CASE1, "group")
    np.testing.assert_allclose(
        out.advantages, [[-1.161805, -0.387268, 0.387268, 1.161805], [0, 0, 0, 0]], atol=1e-5
    )
    np.testing.assert_allclose(out.std, [1.290994, 0.0], atol=1e-5)
    np.testing.assert_array_equal(out.zero_std, [False, True])
    assert out.advantages.dtype == np.float32 and out.std.dtype == np.float32


def test_advantages_case1_batch_scaling_keeps_per_group_std():
    """Case 1, "batch": mean of all 8 = 1.75, squared deviations .5625+.0625+1.5625+5.0625+4*.5625 = 9.5,
    std = sqrt(9.5/7) = 1.164965; A = (r - mu_group)/1.165065 = (-1.287482, -0.429161, 0.429161, 1.287482) and 0.
    The reported std and zero_std stay the per-group values (1.290994, 0) / (False, True)."""
    out = group_advantages(CASE1, "batch")
    np.testing.assert_allclose(
        out.advantages, [[-1.287482, -0.429161, 0.429161, 1.287482], [0, 0, 0, 0]], atol=1e-5
    )
    np.testing.assert_allclose(out.std, [1.290994, 0.0], atol=1e-5)
    np.testing.assert_array_equal(out.zero_std, [False, True])


def test_advantages_case1_no_scaling():
    """Case 1, "none": A = r - mu = (-1.5, -0.5, 0.5, 1.5) and 0; std still reported per group."""
    out = group_advantages(CASE1, "none")
    np.testing.assert_allclose(out.advantages, [[-1.5, -0.5, 0.5, 1.5], [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(out.std, [1.290994, 0.0], atol=1e-5)


def test_advantages_case2_unscorable_row_excluded_and_zeroed():
    """Case 2: [1, NaN, 3, 5]: mu = 3, std = sqrt((4+0+4)/2) = 2, A = (-2, ., 0, 2)/2.0001 = (-0.99995, 0, 0,
    0.99995); the NaN row gets 0."""
    out = group_advantages(np.array([[1.0, NAN, 3.0, 5.0]]), "group")
    np.testing.assert_allclose(out.advantages, [[-0.99995, 0.0, 0.0, 0.99995]], atol=1e-5)
    np.testing.assert_allclose(out.std, [2.0], atol=1e-6)
    assert not out.zero_std[0]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_degenerate_groups_are_zero_std_with_zero_advantages(scale):
    """An all-NaN group and a group with one scorable row have no defined std: zero_std, A = 0, std 0, no NaN.
    The third group (0, 2) is normal: mu 1, std sqrt(2) = 1.414214, so its rows are nonzero and opposite."""
    r = np.array([[NAN, NAN, NAN], [NAN, 4.0, NAN], [0.0, 2.0, NAN]])
    out = group_advantages(r, scale)
    np.testing.assert_array_equal(out.zero_std, [True, True, False])
    np.testing.assert_array_equal(out.advantages[:2], np.zeros((2, 3)))
    np.testing.assert_array_equal(out.std[:2], [0.0, 0.0])
    np.testing.assert_allclose(out.std[2], 1.414214, atol=1e-6)
    assert out.advantages[2, 0] < 0 < out.advantages[2, 1] and out.advantages[2, 2] == 0
    assert np.isfinite(out.advantages).all()


def test_advantages_equal_rewards_give_exact_zero_even_with_float_rounding():
    """(0.1, 0.1, 0.1): the float64 mean is 0.10000000000000002, so the naive std is ~1.7e-17, not 0.
    It is below TRL's isclose tolerance (1e-8): the group is zero_std and A is exactly 0, std reported 0."""
    out = group_advantages(np.array([[0.1, 0.1, 0.1], [3.0, 3.0, 3.0]]), "group")
    np.testing.assert_array_equal(out.zero_std, [True, True])
    assert (out.advantages == 0).all() and (out.std == 0).all()


def test_advantages_reject_unknown_scaling():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(CASE1, "mean")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl_restatement_on_random_rewards(scale):
    """Independent computation: TRL 1.16's advantage arithmetic (grpo_trainer.py, sum_then_normalize) re-stated
    in torch with TRL's own ``trl.trainer.utils.nanstd``, on random rewards with NaN holes (each group keeps >= 2
    scorable rows and continuous rewards, so no group is zero-std and TRL's values apply unchanged)."""
    torch = pytest.importorskip("torch")
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    rng = np.random.default_rng(3)
    r = rng.normal(size=(5, 6))
    r[rng.random(r.shape) < 0.25] = NAN
    r[:, :2] = rng.normal(size=(5, 2))  # at least two scorable rows per group
    t = torch.tensor(r.reshape(-1))
    G = r.shape[1]
    mean = torch.nanmean(t.view(-1, G), dim=1).repeat_interleave(G)
    if scale == "batch":
        std = nanstd(t).expand_as(t)
    else:
        std = nanstd(t.view(-1, G), dim=1).repeat_interleave(G)
    adv = t - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    expected = torch.nan_to_num(adv, nan=0.0).view(-1, G).numpy()
    out = group_advantages(r, scale)
    np.testing.assert_allclose(out.advantages, expected, atol=1e-6)
    np.testing.assert_allclose(out.std, nanstd(t.view(-1, G), dim=1).numpy(), atol=1e-6)


def test_combine_rewards_matches_trl_restatement():
    """TRL 1.16: rewards = nansum(rewards_per_func * w, dim=1); rows where every function is NaN -> NaN."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    per_func = rng.normal(size=(3, 20))  # [F, N]
    per_func[rng.random(per_func.shape) < 0.4] = NAN
    w = [1.0, -0.5, 2.0]
    t = torch.tensor(per_func.T)  # TRL's layout [N, F]
    expected = (t * torch.tensor(w).unsqueeze(0)).nansum(dim=1)
    expected[torch.isnan(t).all(dim=1)] = float("nan")
    np.testing.assert_allclose(combine_rewards(per_func, w), expected.numpy(), atol=1e-6, equal_nan=True)
    assert np.isnan(combine_rewards(per_func, w)).sum() == int(torch.isnan(t).all(dim=1).sum()) > 0


# ---------------------------------------------------------------------------------------------- GFPO


def test_gfpo_case9_shortest_keeps_two_shortest_and_advantages_on_kept_rows():
    """Case 9: r = (1, 0, 1, 1), lengths (10, 3, 5, 20), score = -len = (-10, -3, -5, -20), k = 2 -> idx (1, 2).
    Kept r_S = (0, 1): mu 0.5, std sqrt(0.5) = 0.707107, A = -+0.5/0.707207 = (-0.707007, 0.707007).
    Full-group GRPO would give mu .75, std 0.5, A = (0.25, -0.75, .25, .25)/0.5001 = (.49990, -1.49970, ...)."""
    rewards = np.array([[1.0, 0.0, 1.0, 1.0]])
    scores = np.array(shortest([["a", "b", "c", "d"]], rewards.tolist(), completion_lengths=[[10, 3, 5, 20]]))
    idx = select_top_k(scores, 2)
    np.testing.assert_array_equal(idx, [[1, 2]])
    kept = group_advantages(np.take_along_axis(rewards, idx, axis=1), "group")
    np.testing.assert_allclose(kept.advantages, [[-0.707007, 0.707007]], atol=1e-5)
    np.testing.assert_allclose(kept.std, [0.707107], atol=1e-6)
    full = group_advantages(rewards, "group")
    np.testing.assert_allclose(full.advantages, [[0.4999, -1.4997, 0.4999, 0.4999]], atol=1e-4)


def test_gfpo_case9_token_efficiency_keeps_best_reward_per_token_first():
    """r/len = (1/10, 0/3, 1/5, 1/20) = (0.1, 0, 0.2, 0.05): the two highest are idx 2 (0.2) then 0 (0.1)."""
    scores = token_efficiency(None, [[1.0, 0.0, 1.0, 1.0]], completion_lengths=np.array([[10, 3, 5, 20]]))
    np.testing.assert_allclose(scores, [[0.1, 0.0, 0.2, 0.05]])
    np.testing.assert_array_equal(select_top_k(np.array(scores), 2), [[2, 0]])


def test_token_efficiency_unscorable_reward_ranks_below_every_scored_row():
    """NaN reward -> -inf, below a negative efficiency (-1/2 = -0.5); a zero length counts as 1 (2/1 = 2)."""
    scores = np.array(token_efficiency(None, [[NAN, -1.0, 2.0]], completion_lengths=[[4, 2, 0]]))
    np.testing.assert_array_equal(scores, [[-np.inf, -0.5, 2.0]])
    np.testing.assert_array_equal(select_top_k(scores, 2), [[2, 1]])


def test_select_top_k_ties_go_to_lower_index_and_nan_ranks_last():
    """Row 0: all equal -> (0, 1, 2). Row 1: (5, NaN, 5, -inf): the two 5s in index order, then -inf, NaN last."""
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [5.0, NAN, 5.0, -np.inf]])
    np.testing.assert_array_equal(select_top_k(scores, 3), [[0, 1, 2], [0, 2, 3]])
    np.testing.assert_array_equal(select_top_k(scores, 4)[1], [0, 2, 3, 1])


def test_select_top_k_tie_order_holds_for_large_groups():
    """G = 50, pattern (1, 2, 1, 2, 0) repeated: the 20 twos sit at 1, 3, 6, 8, 11, 13, ...; the first 10 kept are
    the twos in index order (1, 3, 6, 8, 11, 13, 16, 18, 21, 23). (An unstable sort swaps some of them.)"""
    scores = np.tile([1.0, 2.0, 1.0, 2.0, 0.0], 10)[None]
    np.testing.assert_array_equal(select_top_k(scores, 10), [[1, 3, 6, 8, 11, 13, 16, 18, 21, 23]])


def test_select_top_k_agrees_with_torch_topk_on_distinct_scores():
    """TRL keeps ``torch.topk(scores, k).indices``; with distinct scores the order is defined and must agree."""
    torch = pytest.importorskip("torch")
    scores = np.random.default_rng(5).permutation(48).reshape(6, 8).astype(np.float64)
    expected = torch.topk(torch.tensor(scores), 3, dim=-1).indices.numpy()
    np.testing.assert_array_equal(select_top_k(scores, 3), expected)


@pytest.mark.parametrize("k", [0, 5])
def test_select_top_k_rejects_k_outside_group(k):
    with pytest.raises(ValueError, match=f"k={k}"):
        select_top_k(np.zeros((2, 4)), k)


def test_gfpo_single_kept_row_is_zero_std_not_nan():
    """k = 1 (TRL gives NaN advantages, our config forbids k < 2): one scorable row -> zero_std, A = 0."""
    out = group_advantages(np.array([[1.0]]), "group")
    assert out.zero_std[0] and out.advantages[0, 0] == 0.0


def test_builtin_group_filters_are_registered():
    assert BUILTIN_GROUP_FILTERS == {"shortest": shortest, "token_efficiency": token_efficiency}


# ---------------------------------------------------------------------------------------------- resolve_function


def test_resolve_function_builtin_and_import_path():
    assert resolve_function("shortest", BUILTIN_GROUP_FILTERS, "algorithm.group_filter_func") is shortest
    import os.path

    assert resolve_function("os.path:join", {}, "algorithm.reward_funcs[0]") is os.path.join
    assert resolve_function("collections:OrderedDict.fromkeys", {}, "x").__name__ == "fromkeys"


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("no_such_builtin", "not a built-in"),
        ("rlfleet_no_such_module_xyz:f", "could not be imported"),
        ("os.path:no_such_function", "attribute 'no_such_function' is missing"),
        ("math:pi", "not callable"),
    ],
)
def test_resolve_function_errors_name_field_spec_reason_and_fix(spec, reason):
    with pytest.raises(ValueError) as info:
        resolve_function(spec, BUILTIN_GROUP_FILTERS, "algorithm.reward_funcs[1]")
    msg = str(info.value)
    assert msg.startswith("algorithm.reward_funcs[1]: ")
    assert repr(spec) in msg and reason in msg
    assert any(fix in msg for fix in ("Use a built-in", "Install the package", "Check the function", "Point at"))
