"""BEMA (rlfleet/learner/bema.py) against trl-algorithms.md 7.11 and TRL 1.16's BEMACallback."""

import copy
import json

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rlfleet.config import BEMAConfig
from rlfleet.dpo.bema import BEMA

ATOL = 1e-6  # expected values are rounded to 6 decimals (error <= 5e-7); fp32 error at |x| <= 7 is ~5e-7


def _cfg(**kw) -> BEMAConfig:
    """7.11's base: rho=10, gamma=1, kappa=0.5, eta=0.2, tau=0, no floor."""
    base = dict(update_freq=1, ema_power=0.5, bias_power=0.2, lag=10.0, update_after=0, multiplier=1.0)
    return BEMAConfig(**(base | kw))


def _run_scalar(cfg: BEMAConfig, last_t: int) -> dict[int, tuple[float, float]]:
    """theta_t = t for t = 0..last_t (theta at construction = 0); returns {t: (ema, out)} at each update."""
    bema = BEMA({"w": torch.tensor([0.0])}, cfg)
    rows = {}
    for t in range(1, last_t + 1):
        if bema.step(t, {"w": torch.tensor([float(t)])}):
            rows[t] = (bema.ema["w"].item(), bema.weights()["w"].item())
    return rows


def test_phi_1_matches_hand_computation():
    """7.11, phi=1, theta_t = t, theta0 = 0. With a = rho + gamma t = 10 + t, beta = a^-0.5, alpha = a^-0.2:
    t=1: a=11, beta=0.301511, alpha=0.619044; ema = 0.698489*0 + 0.301511*1 = 0.301511; out = 0.301511 + 0.619044*1
         = 0.920555.
    t=2: a=12, beta=0.288675, alpha=0.608364; ema = 0.711325*0.301511 + 0.288675*2 = 0.214472 + 0.577350 = 0.791823;
         out = 0.791823 + 0.608364*2 = 2.008551.
    t=3: a=13, beta=0.277350, alpha=0.598703; ema = 0.722650*0.791823 + 0.277350*3 = 0.572211 + 0.832050 = 1.404261;
         out = 1.404261 + 0.598703*3 = 3.200370.
    t=4: a=14, beta=0.267261, alpha=0.589895; ema = 0.732739*1.404261 + 0.267261*4 = 1.028956 + 1.069045 = 2.098001;
         out = 2.098001 + 0.589895*4 = 4.457580.
    """
    rows = _run_scalar(_cfg(update_freq=1), 4)
    expected = {1: (0.301511, 0.920555), 2: (0.791823, 2.008551), 3: (1.404261, 3.200370), 4: (2.098001, 4.457580)}
    assert rows.keys() == expected.keys()
    for t, (ema, out) in expected.items():
        assert rows[t] == pytest.approx((ema, out), abs=ATOL), t


def test_phi_2_matches_hand_computation():
    """7.11, phi=2: updates at t=2, 4 only.
    t=2: ema = 0.711325*0 + 0.288675*2 = 0.577350; out = 0.577350 + 0.608364*2 = 1.794079.
    t=4: ema = 0.732739*0.577350 + 0.267261*4 = 0.423047 + 1.069045 = 1.492092; out = 1.492092 + 0.589895*4 = 3.851670.
    """
    rows = _run_scalar(_cfg(update_freq=2), 4)
    assert rows.keys() == {2, 4}
    assert rows[2] == pytest.approx((0.577350, 1.794079), abs=ATOL)
    assert rows[4] == pytest.approx((1.492092, 3.851670), abs=ATOL)


def test_burn_in_tau_3_snapshots_then_updates_with_absolute_t():
    """7.11, tau=3, phi=2: at t=3 theta0 = ema = 3 and out stays the initial 0; updates at t=5, 7 with TRL's absolute t.
    t=5: a=15, beta=0.258199, alpha=0.581811; ema = 0.741801*3 + 0.258199*5 = 3 + 2*0.258199 = 3.516398;
         out = 3.516398 + 0.581811*(5-3) = 4.680019.
    t=7: a=17, beta=0.242536, alpha=0.567427; ema = 3.516398 + 0.242536*(7 - 3.516398) = 4.361295;
         out = 4.361295 + 0.567427*4 = 6.631005.
    """
    cfg = _cfg(update_freq=2, update_after=3)
    bema = BEMA({"w": torch.tensor([0.0])}, cfg)
    for t in (1, 2, 3, 4):
        assert not bema.step(t, {"w": torch.tensor([float(t)])})
        assert bema.weights()["w"].item() == 0.0  # the initial weights until the first update
    assert bema.theta0["w"].item() == 3.0 and bema.ema["w"].item() == 3.0
    rows = _run_scalar(cfg, 7)
    assert rows.keys() == {5, 7}
    assert rows[5] == pytest.approx((3.516398, 4.680019), abs=ATOL)
    assert rows[7] == pytest.approx((4.361295, 6.631005), abs=ATOL)


def test_kappa_0_makes_ema_the_current_weights():
    """7.11, kappa=0: beta = 1, ema = theta_t, out = theta_t + alpha (theta_t - 0).
    t=1: 1 + 0.619044 = 1.619044; t=2: 2 + 0.608364*2 = 3.216729.
    """
    rows = _run_scalar(_cfg(ema_power=0.0), 2)
    assert rows[1] == pytest.approx((1.0, 1.619044), abs=ATOL)
    assert rows[2] == pytest.approx((2.0, 3.216729), abs=ATOL)


def test_eta_0_gives_alpha_1():
    """7.11, eta=0: alpha = 1, out = ema + theta_t - 0. t=1: 0.301511 + 1 = 1.301511; t=2: 0.791823 + 2 = 2.791823."""
    rows = _run_scalar(_cfg(bias_power=0.0), 2)
    assert rows[1] == pytest.approx((0.301511, 1.301511), abs=ATOL)
    assert rows[2] == pytest.approx((0.791823, 2.791823), abs=ATOL)


@pytest.mark.parametrize(
    ("phi", "tau", "expected"),
    [(2, 0, [2, 4, 6, 8]), (3, 0, [3, 6, 9]), (2, 3, [5, 7, 9])],
)
def test_update_schedule_over_nine_steps(phi, tau, expected):
    """TRL's 9-step tests: updates where t > tau and (t - tau) % phi == 0."""
    assert list(_run_scalar(_cfg(update_freq=phi, update_after=tau), 9)) == expected


def test_ref_update_schedule():
    """Due when t >= after and (t - after) % freq == 0, only with update_ref_model. freq=2, after=0 over t=1..9:
    2, 4, 6, 8. freq=3, after=2: 2, 5, 8. update_ref_model=False: never."""

    def due(cfg: BEMAConfig) -> list[int]:
        return [t for t in range(1, 10) if BEMA({"w": torch.zeros(1)}, cfg).ref_update_due(t)]

    assert due(_cfg(ref_model_update_freq=2, ref_model_update_after=0)) == [2, 4, 6, 8]
    assert due(_cfg(ref_model_update_freq=3, ref_model_update_after=2)) == [2, 5, 8]
    assert due(_cfg(update_ref_model=False, ref_model_update_freq=1)) == []


def test_fp32_buffers_keep_small_updates_that_bf16_rounds_away():
    """bf16 params: theta0 = 1, then theta_t = c = 1 + 2^-7 (exact in bf16) for t = 1..50; phi=1, kappa=1, rho=100,
    so beta_t = 1/(100 + t). ema_50 = c - (c - 1) * prod_{t=1}^{50} (99 + t)/(100 + t), a telescoping product = 100/150,
    so ema_50 = 1 + 2^-7/3 = 1.0026042. The bf16 values nearest to it are 1.0 and 1.0078125, both >= 2.6e-3 away, so an
    EMA kept in bf16 (TRL's buffers, updated by TRL's ops below) cannot match; ours is float32 and does (to 1e-6).
    """
    cfg = _cfg(update_freq=1, ema_power=1.0, lag=100.0)
    c = torch.tensor([1.0078125], dtype=torch.bfloat16)
    bema = BEMA({"w": torch.tensor([1.0], dtype=torch.bfloat16)}, cfg)
    trl_ema = torch.tensor([1.0], dtype=torch.bfloat16)
    for t in range(1, 51):
        bema.step(t, {"w": c})
        beta = 1 / (100 + t)
        trl_ema.mul_(1 - beta).add_(c, alpha=beta)
    expected = 1 + 2**-7 / 3
    assert bema.ema["w"].dtype == torch.float32 and bema.weights()["w"].dtype == torch.float32
    assert bema.ema["w"].item() == pytest.approx(expected, abs=1e-6)
    assert abs(trl_ema.item() - expected) > 2.5e-3  # it stalls at 1.0: each step 7.7e-5 is under half a bf16 ulp


class _TinyModel(torch.nn.Module):
    """TRL's on_train_begin builds its running copy as ``type(model)(model.config)``."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(3, 2)
        self.scale = torch.nn.Parameter(torch.ones(2))


def test_frozen_params_are_not_tracked_and_stay_in_the_reference():
    """Only trainable params are passed. weights() holds exactly them; loading it (strict=False) into the reference
    leaves the frozen bias at its reference value. With phi=1, kappa=0 (beta=1), eta=0 (alpha=1):
    out = theta_1 + (theta_1 - theta_0) = 2 theta_1 - theta_0 = 2*3 - 0 = 6 for every trainable entry."""
    model = _TinyModel()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.proj.bias.requires_grad_(False)
    ref = copy.deepcopy(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bema = BEMA(trainable, _cfg(update_freq=1, ema_power=0.0, bias_power=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)  # the frozen bias changes too, to show it is not read
    assert bema.step(1, trainable)
    assert set(bema.weights()) == {"proj.weight", "scale"}
    result = ref.load_state_dict(bema.weights(), strict=False)
    assert result.missing_keys == ["proj.bias"] and result.unexpected_keys == []
    assert torch.equal(ref.proj.weight, torch.full((2, 3), 6.0)) and torch.equal(ref.scale, torch.full((2,), 6.0))
    assert torch.equal(ref.proj.bias, torch.zeros(2))
    with pytest.raises(ValueError, match="proj.bias"):
        bema.step(2, dict(model.named_parameters()))


def test_matches_trl_bema_callback_bit_for_bit():
    """TRL 1.16's BEMACallback driven by hand (on_train_begin, then on_step_end with global_step = t = 1..9) on an fp32
    model whose parameters are set to seeded random values before each step. tau=1, phi=2 (updates at 3, 5, 7, 9),
    gamma=1.5, min_ema=0.23: beta = (10 + 1.5 t)^-0.5 is 0.2626 at t=3 and 0.2390, 0.2209, 0.2063 at t=5, 7, 9, so
    the floor decides the last three. Same fp32 operations, so the running weights must be identical."""
    from transformers import TrainerState
    from trl.trainer.callbacks import BEMACallback

    kw = dict(update_freq=2, ema_power=0.5, bias_power=0.2, update_after=1, multiplier=1.5, min_ema_multiplier=0.23)
    model = _TinyModel()
    callback = BEMACallback(lag=10, **kw)
    callback.on_train_begin(None, TrainerState(global_step=0), None, model=model)
    params = dict(model.named_parameters())
    bema = BEMA(params, BEMAConfig(lag=10.0, **kw))
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        callback.on_step_end(None, TrainerState(global_step=t), None, model=model)
        bema.step(t, params)
        running = dict(callback.running_model.named_parameters())
        for name, value in bema.weights().items():
            assert torch.equal(value, running[name]), (t, name)
    assert bema.num_updates == 4
    assert not torch.equal(bema.weights()["scale"], params["scale"])  # the comparison is not vacuous


def test_state_dict_round_trip_through_safetensors_and_json():
    """Save after 5 steps (safetensors bytes + JSON), load into a BEMA built from other weights, then feed both the
    same parameters for t = 6..9: every buffer must be identical at every step."""
    cfg = _cfg(update_freq=2, update_after=1)
    gen = torch.Generator().manual_seed(1)
    thetas = [{"a": torch.randn(4, generator=gen), "b": torch.randn(2, 3, generator=gen)} for _ in range(10)]
    original = BEMA(thetas[0], cfg)
    for t in range(1, 6):
        original.step(t, thetas[t])
    tensors, meta = original.state_dict()
    restored = BEMA({"a": torch.zeros(4), "b": torch.zeros(2, 3)}, cfg)
    restored.load_state_dict(load_safetensors(save_safetensors(tensors)), json.loads(json.dumps(meta)))
    assert restored.num_updates == original.num_updates == 2
    for t in range(6, 10):
        assert restored.step(t, thetas[t]) == original.step(t, thetas[t])
        for store in ("theta0", "ema", "out"):
            for name in ("a", "b"):
                assert torch.equal(getattr(restored, store)[name], getattr(original, store)[name]), (t, store, name)
    with pytest.raises(ValueError, match="names"):
        BEMA({"c": torch.zeros(1)}, cfg).load_state_dict(tensors, meta)
