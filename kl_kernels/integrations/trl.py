"""TRL's log-prob helpers on the fused path, and GRPO's per-token k3.

`patch()` swaps selective_log_softmax and entropy_from_logits into trl.trainer.utils and every
loaded trl module that imported them. GRPO computes its k3 inline, so there is nothing to patch
for it: call grpo_per_token_kl where a fork of the trainer computes it. Like TRL, results come
back in the logits' dtype (float32 inside the kernel, rounded once at the end).
"""
from __future__ import annotations

import torch

from ..api import token_logprobs
from ..estimators import kl_from_logprobs
from ._patching import Patch


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits).gather(-1, index) without the [..., V] log-softmax. index is (...) or
    (..., K); the (..., K) form takes K fused passes (one per column), each one read of the logits."""
    if index.dim() == logits.dim() - 1:
        return token_logprobs(logits, index, validate=False).to(logits.dtype)
    columns = [token_logprobs(logits, index[..., k], validate=False) for k in range(index.shape[-1])]
    return torch.stack(columns, dim=-1).to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy per row in the logits' dtype. chunk_size is accepted for TRL's signature; the fused
    pass needs no chunks (it never holds more than one tile of a row)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # only H is used
    return token_logprobs(logits, labels, return_entropy=True, validate=False)[1].to(logits.dtype)


def grpo_per_token_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """GRPO's k3, exp(ref - logp) - (ref - logp) - 1, unclamped, in the inputs' dtype."""
    return kl_from_logprobs(per_token_logps, ref_per_token_logps, estimator="k3")


_TARGETS = {"trl.trainer.utils": {"selective_log_softmax": selective_log_softmax,
                                  "entropy_from_logits": entropy_from_logits}}


def patch() -> Patch:
    """Swap these functions into the installed TRL; restores on exit (ImportError without trl)."""
    return Patch("trl", _TARGETS)
