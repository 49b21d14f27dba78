"""Around the fused pass: verl's loss aggregation modes and token-level KL rewards (docs/contract.md section 3)."""
from __future__ import annotations

import math
import numbers

import torch

from . import validation as check

AGGREGATION_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _count(value, arg: str, dtype, device):
    """A data-parallel denominator: int, float or 0-dim tensor, used as given (no host sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{arg} must be an int or a 0-dim tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{arg} must be a count >= 0 (int or 0-dim tensor), got {value!r}")
    return torch.tensor(float(value), dtype=dtype, device=device)


def _safe_divide(numerator, denominator):
    # a count of 0 (all masked) gives 0, not NaN; the clamp keeps the unused branch's gradient finite
    zero = torch.zeros((), dtype=numerator.dtype, device=numerator.device)
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1), zero)


def aggregate(values, mask, mode, *, global_tokens=None, global_sequences=None, loss_scale_factor=None):
    """Reduce [B, T] values to a differentiable 0-dim tensor with one of verl's modes.

    Values are weighted by the mask (verl multiplies by it); positions where the mask is 0 are
    selected out first so that NaN or inf there cannot leak into the result. The seq-mean modes
    average over sequences with at least one valid token unless global_sequences is given.
    `seq-mean-token-sum-norm` is Dr. GRPO's constant normaliser, as current verl computes it: the
    seq-mean-token-sum value divided by loss_scale_factor (default: the mask width T).
    """
    check.tensor(values, "values")
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating tensor, got dtype {values.dtype}")
    check.real_mask(mask, "mask")
    check.shape(mask, values.shape, "mask", "the values' shape")
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], got shape {tuple(values.shape)}")
    if mask.device != values.device:
        raise ValueError(f"mask must be on the device of values ({values.device}), got {mask.device}")
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(AGGREGATION_MODES)}; got {mode!r}")
    dtype, device = values.dtype, values.device
    weights = mask.to(dtype)
    weighted = torch.where(mask != 0, values * weights, torch.zeros((), dtype=dtype, device=device))
    if mode in ("token-mean", "token-sum"):
        total = weighted.sum()
        if mode == "token-sum":
            return total
        tokens = weights.sum() if global_tokens is None else _count(global_tokens, "global_tokens", dtype, device)
        return _safe_divide(total, tokens)
    token_sums = weighted.sum(dim=-1)
    token_counts = weights.sum(dim=-1)
    has_tokens = (mask != 0).any(dim=-1)
    per_sequence = _safe_divide(token_sums, token_counts) if mode == "seq-mean-token-mean" else token_sums
    per_sequence = torch.where(has_tokens, per_sequence, torch.zeros((), dtype=dtype, device=device))
    if global_sequences is None:
        sequences = has_tokens.sum().to(dtype)
    else:
        sequences = _count(global_sequences, "global_sequences", dtype, device)
    result = _safe_divide(per_sequence.sum(), sequences)
    if mode == "seq-mean-token-sum-norm":
        # Dr. GRPO's constant normaliser, as verl (PR 5417 on): the sequence mean of token sums over
        # loss_scale_factor, by default the mask width T
        scale = values.shape[-1] if loss_scale_factor is None else loss_scale_factor
        result = _safe_divide(result, _count(scale, "loss_scale_factor", dtype, device))
    return result


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """Per row of a [B, T] bool tensor, the index of its last True, or -1 for a row with none."""
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return torch.where(valid, positions, -1).amax(dim=-1)


def kl_rewards(scores, kl, mask, kl_coef, *, score_clip=None):
    """Token rewards -kl_coef * kl * mask, plus each sequence's score at its last valid token.

    Detached (rewards are targets, not a loss). A sequence with no valid token gets no score.
    """
    check.tensor(scores, "scores")
    check.tensor(kl, "kl")
    check.real_mask(mask, "mask")
    if not kl.is_floating_point():
        raise TypeError(f"kl must be a floating tensor, got dtype {kl.dtype}")
    if kl.dim() != 2:
        raise ValueError(f"kl must be [B, T], got shape {tuple(kl.shape)}")
    check.shape(mask, kl.shape, "mask", "the shape of kl")
    check.shape(scores, kl.shape[:1], "scores", "one score per sequence")
    for arg, value in (("scores", scores), ("mask", mask)):
        if value.device != kl.device:
            raise ValueError(f"{arg} must be on the device of kl ({kl.device}), got {value.device}")
    check.nonnegative_coef(kl_coef, "kl_coef", validate=True)
    if score_clip is not None:
        if isinstance(score_clip, bool) or not isinstance(score_clip, numbers.Real) or not score_clip > 0:
            raise ValueError(f"score_clip must be a number > 0 or None, got {score_clip!r}")
    dtype = torch.promote_types(kl.dtype, torch.float32)
    with torch.no_grad():
        zero = torch.zeros((), dtype=dtype, device=kl.device)
        valid = mask != 0
        coef = kl_coef.to(kl.device, dtype) if isinstance(kl_coef, torch.Tensor) else float(kl_coef)
        rewards = torch.where(valid, -coef * kl.to(dtype) * mask.to(dtype), zero)
        scores = scores.to(dtype)
        if score_clip is not None:
            scores = scores.clamp(-float(score_clip), float(score_clip))
        if kl.shape[-1]:
            last = last_valid_index(valid)
            has_token = last >= 0
            bonus = torch.where(has_token, scores, zero)
            rewards.scatter_add_(-1, last.clamp(min=0).unsqueeze(-1), bonus.unsqueeze(-1))
    return rewards
