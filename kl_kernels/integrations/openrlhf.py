"""OpenRLHF's KL-penalty functions (openrlhf.models.utils) on the fused path.

Quirks kept on purpose, since OpenRLHF code depends on them: compute_approx_kl clamps every
estimator to [-10, 10] and returns float32; compute_reward adds -kl_coef * kl at every position
(masked or not) and places the score at the last position where the mask is nonzero, or at the
last position for an all-zero mask; log_probs_from_logits divides the caller's logits by the
temperature in place, and returns the logits' dtype for bf16/fp16 logits.
"""
from __future__ import annotations

import torch

from ..aggregation import last_valid_index
from ..api import token_logprobs
from ..estimators import kl_from_logprobs
from ._patching import Patch


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str = "k1") -> torch.Tensor:
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    return kl_from_logprobs(log_probs.float(), log_probs_base.float(), estimator=kl_estimator, kl_clamp=10.0)


def compute_reward(r, kl_coef: float, kl: torch.Tensor, action_mask: torch.Tensor | None = None,
                   reward_clip_range=None) -> torch.Tensor:
    if kl_coef <= 0.0:
        kl_coef = 0.0
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    kl_reward = -kl_coef * kl
    mask = torch.ones_like(kl, dtype=torch.bool) if action_mask is None else action_mask > 0.5
    # the last valid position per row; a row with none gets T - 1, as OpenRLHF's argmax does
    last = last_valid_index(mask).unsqueeze(1)
    last = torch.where(last < 0, kl.shape[1] - 1, last)
    score = torch.zeros_like(kl).scatter_(1, last, r.unsqueeze(1).to(kl.dtype))
    return score + kl_reward


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    if temperature != 1.0:
        logits.div_(temperature)  # OpenRLHF's side effect: later code reads the divided logits
    logp = token_logprobs(logits, labels, validate=False)
    return logp if logits.dtype in (torch.float32, torch.float64) else logp.to(logits.dtype)


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int = None) -> torch.Tensor:
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


_TARGETS = {"openrlhf.models.utils": {"compute_approx_kl": compute_approx_kl, "compute_reward": compute_reward,
                                      "log_probs_from_logits": log_probs_from_logits, "masked_mean": masked_mean}}


def patch() -> Patch:
    """Swap these functions into the installed OpenRLHF; restores on exit (ImportError without it)."""
    return Patch("openrlhf", _TARGETS)
