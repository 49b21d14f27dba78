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

# the kernels' estimator codes (csrc/fused_kl_math.h EstimatorKind, the Triton kernels' ESTIMATOR)
ESTIMATOR_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3, "full": 4}

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


class _StraightThrough(torch.autograd.Function):
    """verl's "+" forms: forward the named estimator's value, backward the gradient of the
    unclamped k2, d * grad(d). Written as one Function, not k2 - k2.detach() + value, whose
    inf - inf turns an infinite log-ratio into a NaN value; positions with a zero upstream
    gradient (masked, ignored) get an exact 0 even where d is infinite."""

    @staticmethod
    def forward(ctx, value, log_ratio):
        ctx.save_for_backward(log_ratio)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (log_ratio,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return None, torch.where(grad == 0, zero, grad * log_ratio)


def _sampled_value(est: Estimator, logprobs, ref_logprobs):
    if est.name == "k1" and est.log_ratio_clamp is None:
        return logprobs - ref_logprobs  # one kernel, not a negated reverse ratio
    # verl clamps the reverse log-ratio log(q/p) = ref_logp - logp before the estimator
    log_ratio = ref_logprobs - logprobs
    if est.log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-est.log_ratio_clamp, est.log_ratio_clamp)
    if est.name == "k1":
        return -log_ratio
    if est.name == "abs":
        return log_ratio.abs()
    if est.name == "k2":
        return 0.5 * log_ratio.square()
    # k3 = exp(r) - r - 1 (expm1 keeps the digits that cancel); at r = +inf it is +inf, where
    # expm1(r) - r would be inf - inf: that input is replaced before the arithmetic, not after
    infinite = torch.isposinf(log_ratio)
    safe = torch.where(infinite, torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device), log_ratio)
    return torch.where(infinite, torch.full((), float("inf"), dtype=log_ratio.dtype, device=log_ratio.device),
                       torch.expm1(safe) - safe)


def estimate(est: Estimator, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, full_kl: torch.Tensor | None = None):
    """Per-token KL estimate from log-probs (elementwise, differentiable).

    `full_kl` is the exact per-row KL from the fused pass, required for `full`. Select before
    compute: where kl_clamp is active the estimator is evaluated at a safe input (log-ratio 0) and
    the clamp bound selected, so an exp that overflows there can never turn the zero gradient of
    the clamp into 0 * inf = NaN.
    """
    if est.name == "full":
        value = full_kl
        if est.kl_clamp is not None:
            value = value.clamp(-est.kl_clamp, est.kl_clamp)
        return value
    if est.kl_clamp is not None:
        with torch.no_grad():
            raw = _sampled_value(est, logprobs, ref_logprobs)
            active = (raw > est.kl_clamp) | (raw < -est.kl_clamp)
            bound = raw.clamp(-est.kl_clamp, est.kl_clamp)  # the bound in raw's own dtype where active
        safe_logprobs = torch.where(active, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device), logprobs)
        safe_ref = torch.where(active, torch.zeros((), dtype=ref_logprobs.dtype, device=ref_logprobs.device),
                               ref_logprobs)
        value = torch.where(active, bound, _sampled_value(est, safe_logprobs, safe_ref))
    else:
        value = _sampled_value(est, logprobs, ref_logprobs)
    if est.straight_through:
        value = _StraightThrough.apply(value, logprobs - ref_logprobs)
    return value


def kl_from_logprobs(logprobs, ref_logprobs, *, estimator, log_ratio_clamp=None, kl_clamp=None):
    """KL estimate per token for callers that already hold log-probs (docs/contract.md section 3).

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
