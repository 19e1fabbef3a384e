"""BEMA: bias-corrected exponential moving average of the weights (Block & Zhang, arXiv 2508.00180).

The arithmetic is TRL's ``BEMACallback`` (``trl/trainer/callbacks.py``), on plain dicts of tensors instead of a
trainer callback. With the absolute optimizer step t (1 after the first step; TRL's ``state.global_step``):

    t <  tau                      skip
    t == tau                      theta0 <- theta_t, ema <- theta_t        (out unchanged)
    (t - tau) % phi == 0, t > tau beta  = max((rho + gamma t)^-kappa, min_ema)
                                  alpha = (rho + gamma t)^-eta
                                  ema   <- (1 - beta) ema + beta theta_t
                                  out   <- ema + alpha (theta_t - theta0)

Before the first update ``out`` is the initial weights, as TRL's running model is. tau = ``update_after``,
phi = ``update_freq``, rho = ``lag``, gamma = ``multiplier``, kappa = ``ema_power``, eta = ``bias_power``.

Deliberate differences from TRL:
- Only the parameters passed in are tracked: pass the TRAINABLE ones. Frozen parameters are left out and keep their
  value in the reference model (load ``weights()`` with ``strict=False``). TRL zips its trainable parameters with
  all of the running model's parameters and raises ``ValueError`` when any is frozen (PEFT included).
- theta0, ema and out are float32 whatever the parameter dtype. TRL keeps them in the parameter dtype; in bfloat16
  (8 mantissa bits) an EMA step ``beta * (theta_t - ema)`` smaller than half a unit in the last place rounds away, so
  a bf16 EMA stalls once beta is small. ``tests/test_bema.py`` shows it.
- BEMA never writes into the policy. TRL's ref-model variant loads the BEMA weights into the policy when there is no
  reference model; here the caller loads ``weights()`` into its reference model when ``ref_update_due(t)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from rlfleet.config import BEMAConfig


class BEMA:
    """BEMA state over named parameters: theta0, ema and the output weights, float32, on ``device``."""

    def __init__(self, params: Mapping[str, Tensor], cfg: BEMAConfig, device: str | torch.device = "cpu"):
        """``params``: the trainable parameters by name (frozen ones are not passed, see the module doc)."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.theta0 = {name: self._fp32(p) for name, p in params.items()}
        self.ema = {name: t.clone() for name, t in self.theta0.items()}
        self.out = {name: t.clone() for name, t in self.theta0.items()}
        self.num_updates = 0

    def _fp32(self, p: Tensor) -> Tensor:
        return p.detach().to(device=self.device, dtype=torch.float32, copy=True)

    def _coefficients(self, t: int) -> tuple[float, float]:
        """beta = max((rho + gamma t)^-kappa, min_ema), alpha = (rho + gamma t)^-eta (TRL's absolute t)."""
        c = self.cfg
        age = c.lag + c.multiplier * t
        return max(age ** (-c.ema_power), c.min_ema_multiplier), age ** (-c.bias_power)

    @torch.no_grad()
    def step(self, t: int, params: Mapping[str, Tensor]) -> bool:
        """Advance to absolute optimizer step ``t`` with the current weights ``params``; True when ``out`` changed."""
        tau, phi = self.cfg.update_after, self.cfg.update_freq
        if t < tau:
            return False
        if params.keys() != self.theta0.keys():
            missing, extra = self.theta0.keys() - params.keys(), params.keys() - self.theta0.keys()
            raise ValueError(f"BEMA.step: parameter names differ from __init__'s: missing {missing}, extra {extra}")
        if t == tau:
            for name, p in params.items():
                self.theta0[name].copy_(p)
                self.ema[name].copy_(p)
            return False
        if (t - tau) % phi != 0:
            return False
        beta, alpha = self._coefficients(t)
        for name, p in params.items():
            theta_t = self._fp32(p)
            self.ema[name].mul_(1 - beta).add_(theta_t, alpha=beta)
            self.out[name] = self.ema[name] + alpha * (theta_t - self.theta0[name])  # fresh tensor, no aliasing
        self.num_updates += 1
        return True

    def weights(self) -> dict[str, Tensor]:
        """The BEMA weights (float32; the initial weights before the first update). Read-only: load, don't mutate."""
        return dict(self.out)

    def ref_update_due(self, t: int) -> bool:
        """Whether the reference model takes ``weights()`` after step t (TRL's ref-model BEMA schedule)."""
        c = self.cfg
        after = c.ref_model_update_after
        return c.update_ref_model and t >= after and (t - after) % c.ref_model_update_freq == 0

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors for safetensors: ``theta0.<name>``, ``ema.<name>``, ``out.<name>``; JSON-able scalars)."""
        tensors = {}
        for key, store in (("theta0", self.theta0), ("ema", self.ema), ("out", self.out)):
            tensors.update({f"{key}.{name}": t.clone() for name, t in store.items()})
        return tensors, {"num_updates": self.num_updates, "names": list(self.theta0)}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping) -> None:
        """Restore ``state_dict()``'s output exactly; the parameter names must be this object's."""
        if list(meta["names"]) != list(self.theta0):
            raise ValueError(f"BEMA.load_state_dict: saved names {meta['names']} differ from {list(self.theta0)}")
        for key, store in (("theta0", self.theta0), ("ema", self.ema), ("out", self.out)):
            for name in store:
                store[name] = self._fp32(tensors[f"{key}.{name}"])
        self.num_updates = int(meta["num_updates"])
