"""KL coefficient controllers (docs/contract.md section 3): fixed, and the adaptive proportional controller of
Ziegler et al. 2019 as verl and OpenRLHF implement it.

The controllers have no unit: feed current_kl in the unit of the target (verl and OpenRLHF pass the
batch mean of the per-token KL; shared kl-guide.md's target_KL = 3 is per sequence).
"""
from __future__ import annotations

import math
import numbers


def _number(value, arg: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:  # a 0-dim tensor or numpy scalar
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{arg} must be a number, got {type(value).__name__}") from None
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{arg} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _check_update(current_kl, n_steps) -> int:
    """Any finite current_kl, negative included (a batch mean of k1 often is, early in training;
    verl and OpenRLHF accept it); NaN or inf raises before the state changes."""
    try:
        finite = math.isfinite(float(current_kl))  # numbers, 0-dim tensors, numpy scalars
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"current_kl must be a finite number (negative is fine), got {current_kl!r}; "
                         "the controller's state is unchanged")
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
    return int(n_steps)


class FixedKLController:
    """A constant coefficient; update() only checks its arguments."""

    def __init__(self, kl_coef):
        self.value = _number(kl_coef, "kl_coef", positive=False)

    def update(self, current_kl, n_steps):
        _check_update(current_kl, n_steps)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = _number(state["value"], "value", positive=False)

    def __repr__(self):
        return f"FixedKLController(kl_coef={self.value!r})"


class AdaptiveKLController:
    """value *= 1 + clip(current_kl / target_kl - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef, target_kl, horizon):
        self.value = _number(init_kl_coef, "init_kl_coef", positive=False)
        self.target = _number(target_kl, "target_kl", positive=True)
        self.horizon = _number(horizon, "horizon", positive=True)

    def update(self, current_kl, n_steps):
        n_steps = _check_update(current_kl, n_steps)
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        multiplier = 1.0 + error * n_steps / self.horizon
        # below target the multiplier reaches 0 at n_steps = 5 * horizon: past that the coefficient
        # would turn negative (and state_dict() would no longer load)
        if not (multiplier > 0 and math.isfinite(self.value * multiplier)):
            raise ValueError(f"n_steps={n_steps} with horizon={self.horizon:g} gives the update multiplier "
                             f"{multiplier:g} (n_steps must stay below 5 * horizon while KL is below target); "
                             "the controller's state is unchanged")
        self.value *= multiplier

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        value = _number(state["value"], "value", positive=False)
        target = _number(state["target"], "target", positive=True)
        horizon = _number(state["horizon"], "horizon", positive=True)
        self.value, self.target, self.horizon = value, target, horizon

    def __repr__(self):
        return f"AdaptiveKLController(value={self.value!r}, target_kl={self.target!r}, horizon={self.horizon!r})"
