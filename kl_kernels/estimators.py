"""The KL estimators and clamps: one definition used by every backend and by kl_from_logprobs.

Names follow verl's `kl_penalty` (k1/kl, abs, k2/mse, k3, low_var_kl) plus `full`, the exact KL
over the vocabulary, which only the fused pass can compute (it needs both logits rows).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

# canonical name -> aliases accepted by the API
_SAMPLED = {"k1": ("k1", "kl"), "abs": ("abs",), "k2": ("k2", "mse"), "k3": ("k3",), "low_var_kl": ("low_var_kl",)}
_ALIASES = {alias: name for name, aliases in _SAMPLED.items() for alias in aliases}
ESTIMATOR_NAMES = tuple(sorted([*_ALIASES, "full", *(alias + "+" for alias in _ALIASES)]))

# verl's low_var_kl clamps, used for whichever clamp the caller leaves None
LOW_VAR_KL_LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_CLAMP = 10.0


class Estimator(NamedTuple):
    """A parsed estimator name with its effective clamps."""

    name: str  # canonical: k1, abs, k2, k3, full (low_var_kl becomes k3 with clamps)
    straight_through: bool  # trailing "+": value of `name`, gradient of unclamped k2
    log_ratio_clamp: float | None
    kl_clamp: float | None


def _check_clamp(value, arg: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg} must be a positive float or None, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{arg} must be a positive finite float or None, got {value!r}")
    return float(value)


def parse_estimator(estimator, log_ratio_clamp=None, kl_clamp=None) -> Estimator:
    """Validate an estimator name and clamps (ValueError naming the argument)."""
    if not isinstance(estimator, str) or estimator not in ESTIMATOR_NAMES:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATOR_NAMES)}; got {estimator!r}")
    log_ratio_clamp = _check_clamp(log_ratio_clamp, "log_ratio_clamp")
    kl_clamp = _check_clamp(kl_clamp, "kl_clamp")
    straight_through = estimator.endswith("+")
    base = estimator.rstrip("+")
    if base == "full":
        if log_ratio_clamp is not None:
            raise ValueError("log_ratio_clamp does not apply to estimator 'full' (the exact KL has no sampled log-ratio)")
        return Estimator("full", False, None, kl_clamp)
    name = _ALIASES[base]
    if name == "low_var_kl":
        name = "k3"
        log_ratio_clamp = LOW_VAR_KL_LOG_RATIO_CLAMP if log_ratio_clamp is None else log_ratio_clamp
        kl_clamp = LOW_VAR_KL_CLAMP if kl_clamp is None else kl_clamp
    return Estimator(name, straight_through, log_ratio_clamp, kl_clamp)


def estimate(est: Estimator, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, full_kl: torch.Tensor | None = None):
    """Per-token KL estimate from log-probs (elementwise, differentiable).

    `full_kl` is the exact per-row KL from the fused pass, required for `full`.
    """
    if est.name == "full":
        value = full_kl
    elif est.name == "k1" and est.log_ratio_clamp is None:
        value = logprobs - ref_logprobs  # one kernel, not a negated reverse ratio
    else:
        # verl clamps the reverse log-ratio log(q/p) = ref_logp - logp before the estimator
        log_ratio = ref_logprobs - logprobs
        if est.log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-est.log_ratio_clamp, est.log_ratio_clamp)
        if est.name == "k1":
            value = -log_ratio
        elif est.name == "abs":
            value = log_ratio.abs()
        elif est.name == "k2":
            value = 0.5 * log_ratio.square()
        else:  # k3 = exp(r) - r - 1; expm1 keeps the digits that cancel for small r
            value = torch.expm1(log_ratio) - log_ratio
    if est.kl_clamp is not None:
        value = value.clamp(-est.kl_clamp, est.kl_clamp)
    if est.straight_through:
        # verl's "+" forms: forward value of the named estimator, gradient of the unclamped k2
        k2 = 0.5 * (logprobs - ref_logprobs).square()
        value = k2 - k2.detach() + value.detach()
    return value


def kl_from_logprobs(logprobs, ref_logprobs, *, estimator, log_ratio_clamp=None, kl_clamp=None):
    """KL estimate per token for callers that already hold log-probs (SPEC section 3).

    Returns a tensor of the promoted dtype of the inputs; gradients flow to both inputs.
    """
    for arg, value in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{arg} must be a floating tensor, got dtype {value.dtype}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}")
    if logprobs.device != ref_logprobs.device:
        raise ValueError(f"ref_logprobs must be on the device of logprobs ({logprobs.device}), got {ref_logprobs.device}")
    est = parse_estimator(estimator, log_ratio_clamp, kl_clamp)
    if est.name == "full":
        raise ValueError("estimator 'full' needs the logits (use kl_penalty with ref_logits); "
                         "kl_from_logprobs takes the sampled-token estimators only")
    return estimate(est, logprobs, ref_logprobs)
