"""TRL's O(N x V) log-prob and entropy functions on the fused path.

`patch()` wraps, in trl.trainer.utils (and every loaded trl module that imported them by name):
`selective_log_softmax`, `entropy_from_logits` and `selective_log_softmax_and_entropy` (TRL's
CPU path loops over rows with a log-softmax in the logits' dtype; on CUDA TRL has its own one-pass
Triton kernel, which keeps the calls it serves), and `_ChunkedLogProbFunction`, the hidden-state
head behind `add_fused_lm_head` that GRPO, RLOO, DPO, KTO and SFT use (kl_kernels.linear).
Results come back in the dtype TRL returns, computed in float32 and rounded once (TRL rounds each
step in bf16/fp16: close to float64, not bit-identical to TRL).

Left to TRL: the losses, GRPO's inline k3 (O(N) work on log-probs), masks and metrics.
"""
from __future__ import annotations

import functools
import sys

import torch

from ..linear import linear_token_logprobs
from ._patching import (Fallback, Patch, Replacement, entropy_in_logits_dtype, fused_backend, fused_rows,
                        real_temperature)

TESTED = ("1.16.0", "1.17.0")  # >= first, < second


def _trl_kernel_serves(logits, index=None, row_mask=None) -> bool:
    """TRL's own one-pass Triton kernel takes this call (CUDA/XPU): no reason to take it from TRL."""
    utils = sys.modules.get("trl.trainer.utils")
    supports = getattr(utils, "_supports_trl_loss_kernel", None)
    triton_available = getattr(utils, "is_triton_available", None)
    return bool(supports and triton_available and triton_available() and supports(logits, index, row_mask))


def _indexed_call(a):
    """(logits, index, row_mask, temperature) of a TRL call the fused path may serve, else Fallback."""
    logits, index, row_mask = a["logits"], a["index"], a.get("row_mask")
    temperature = real_temperature(a.get("temperature", 1.0))
    if not isinstance(index, torch.Tensor) or not isinstance(logits, torch.Tensor):
        raise Fallback("logits or index is not a tensor")
    if _trl_kernel_serves(logits, index, row_mask):
        raise Fallback("TRL's own fused kernel serves it")
    return logits, index, row_mask, temperature


def _selective_log_softmax(a, original):
    logits, index, row_mask, temperature = _indexed_call(a)
    if index.dim() == logits.dim() - 1:
        logp = fused_rows(logits, index, temperature=temperature, row_mask=row_mask)
    elif index.dim() == logits.dim() and index.shape[:-1] == logits.shape[:-1]:
        # (..., K): K fused passes, each one read of the logits, never a [..., V] log-softmax
        if row_mask is not None and (not isinstance(row_mask, torch.Tensor) or row_mask.shape != index.shape):
            raise Fallback("row_mask does not match the index")
        logp = torch.stack([fused_rows(logits, index[..., k], temperature=temperature,
                                       row_mask=None if row_mask is None else row_mask[..., k])
                            for k in range(index.shape[-1])], dim=-1)
    else:
        raise Fallback("index is neither (...) nor (..., K)")
    return logp.to(logits.dtype)


def _entropy_from_logits(a, original):
    logits = a["logits"]
    if isinstance(logits, torch.Tensor) and _trl_kernel_serves(logits):
        raise Fallback("TRL's own fused kernel serves it")
    # chunk_size only bounds TRL's own memory; the fused pass holds one tile of a row at a time
    return entropy_in_logits_dtype(a, original)


def _selective_log_softmax_and_entropy(a, original):
    logits, index, row_mask, temperature = _indexed_call(a)
    logp, entropy = fused_rows(logits, index, temperature=temperature, return_entropy=True, row_mask=row_mask)
    if not a.get("entropy_requires_grad", True):
        entropy = entropy.detach()
    return logp.to(logits.dtype), entropy.to(logits.dtype)


def _chunked_logprob(a, original, logits_dtype=None):
    """TRL's ChunkedLogProbFunction.apply: (log_probs, entropy or None, None, None, None). logits_dtype:
    patch()'s, for bf16/fp16 tiles."""
    outputs = tuple(a.get("outputs") or ())
    if not set(outputs) <= {"log_probs", "entropy"}:
        raise Fallback(f"outputs {outputs} beyond log_probs and entropy")
    hidden, weight, bias = a["hidden"], a["weight"], a["bias"]
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise Fallback("hidden or weight is not a tensor")
    device = hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    # TRL computes the tiles in the autocast dtype when autocast is on, else in hidden's dtype
    compute = torch.get_autocast_dtype(device) if autocast else hidden.dtype
    if not autocast and (weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype)):
        raise Fallback("hidden, weight and bias dtypes differ")
    fused_backend(hidden, compute)
    logit_scale = a.get("logit_scale", 1.0)
    wide = logits_dtype if compute in (torch.bfloat16, torch.float16) else None
    try:
        # autocast off inside: the forward and the backward's recomputed tiles must be the same numbers
        with torch.autocast(device, enabled=False):
            logp, entropy = linear_token_logprobs(
                hidden.to(compute), weight.to(compute), a["targets"], bias=None if bias is None else bias.to(compute),
                temperature=real_temperature(a["temperature"]), logit_scale=1.0 if logit_scale is None else logit_scale,
                softcap=a.get("final_logit_softcapping"), return_entropy=True, validate=False, logits_dtype=wide)
    except (TypeError, ValueError) as error:  # a shape or type TRL's own function handles its own way
        raise Fallback(str(error)) from None
    return logp, entropy if "entropy" in outputs else None, None, None, None


def _replacements(logits_dtype=None):
    utils = "trl.trainer.utils"
    return [
        Replacement(utils, "selective_log_softmax", _selective_log_softmax,
                    ("logits", "index", "temperature", "row_mask")),
        Replacement(utils, "entropy_from_logits", _entropy_from_logits, ("logits", "chunk_size")),
        Replacement(utils, "selective_log_softmax_and_entropy", _selective_log_softmax_and_entropy,
                    ("logits", "index", "entropy_requires_grad", "temperature", "row_mask")),
        Replacement(utils, "_ChunkedLogProbFunction", functools.partial(_chunked_logprob, logits_dtype=logits_dtype),
                    ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                     "logit_scale", "outputs")),
    ]


LEFT_ALONE = {
    "trl GRPO/RLOO losses and the inline k3": "O(N) work on log-probs: the trainer's own code",
    "trl.kernels.selective_log_softmax_and_entropy": "TRL's Triton kernel, already one pass (CUDA)",
}


def patch(quiet: bool = False, logits_dtype: torch.dtype | None = None) -> Patch:
    """Wrap TRL's O(N x V) functions (see the module docstring); restores on exit. ImportError
    without trl; a warning outside the tested versions.

    logits_dtype=torch.float32: the hidden-state head's bf16/fp16 tiles (bf16 weights, or bf16 autocast)
    keep float32 logits (docs/contract.md section 14): an fp32 LM head's numbers from the weights as they
    are, without TRL's `cast_lm_head_to_fp32` (which makes the head's parameters float32 for good and
    upcasts the hidden states each call; that option is served as it is, an fp32 head)."""
    if logits_dtype not in (None, torch.float32):
        raise ValueError(f"logits_dtype must be None or torch.float32, got {logits_dtype!r}")
    return Patch("trl", TESTED, _replacements(logits_dtype), LEFT_ALONE, quiet=quiet)
