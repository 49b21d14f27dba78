"""verl's O(N x V) log-prob and entropy functions on the fused path.

`patch()` wraps, in verl.utils.torch_functional (and every loaded verl module that imported them
by name): `logprobs_from_logits`, `logprobs_from_logits_v2`, `logprobs_from_logits_naive`,
`entropy_from_logits` and `entropy_from_logits_with_chunking`; verl's hidden-state head
`verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` where kl_kernels.linear serves the
call (its `dist_process_group`, a vocabulary-sharded weight, included); and the Megatron backend's
vocabulary-parallel functions in verl.utils.megatron.tensor_parallel (`vocab_parallel_entropy`,
`vocab_parallel_entropy_with_chunking`, `vocab_parallel_log_probs_from_logits`) on the
tensor-parallel group verl's Megatron setup made (kl_kernels.sharding: one all_gather of per-row
statistics instead of three all_reduces and an [N, V/tp] softmax kept for the backward). Return dtypes are verl's: `logprobs_from_logits` gives float32 where verl would take its
flash-attn path and the logits' dtype otherwise, as verl's own fallback does (our values are
computed in float32 and rounded once). The gradient is written over the logits
(`inplace_backward=True`, verl's default) only where verl's own flash-attn path would do the same
and the logits are an intermediate of the graph, never a leaf the caller holds.

Left to verl: kl_penalty, agg_loss, masked means, the controllers (O(N) work on log-probs), and the
NPU path.
"""
from __future__ import annotations

import os

import torch

from ..linear import linear_token_logprobs
from ._patching import (Fallback, Patch, Replacement, entropy_in_logits_dtype, fused_backend, fused_rows,
                        logprobs_verl_style, real_temperature)

TESTED = ("0.9.1", "0.10.0")  # >= first, < second


def _verl_takes_flash_path(original) -> bool:
    names = original.__globals__
    return bool(names.get("FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE")) and \
        os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"


def _logprobs_from_logits(a, original):
    if original.__globals__.get("NPU_CROSS_ENTROPY_LOSS_AVAILABLE"):
        raise Fallback("verl's NPU path")
    return logprobs_verl_style(a, _verl_takes_flash_path(original))


def _logprobs_in_logits_dtype(a, original):
    logits = a["logits"]
    return fused_rows(logits, a["labels"]).to(logits.dtype)


def _entropy_with_chunking(a, original):
    logits = a["logits"]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise Fallback("verl's chunked entropy takes [N, V] logits")
    return fused_rows(logits, None, return_entropy=True)[1].to(torch.get_default_dtype())


def _linear_cross_entropy(a, original):
    """verl's hidden-state head: (log-probs [N], entropy [N]) in float32, per token."""
    hidden, weight, labels = a["hidden"], a["weight"], a["labels"]
    reduction = a.get("reduction", "none")
    if not isinstance(reduction, str) or reduction.lower() != "none":
        raise Fallback("only reduction='none' is served")
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) or weight.dtype != hidden.dtype:
        raise Fallback("hidden and weight dtypes differ")
    fused_backend(hidden)
    if not isinstance(labels, torch.Tensor) or labels.numel() * hidden.shape[-1] != hidden.numel():
        raise Fallback("labels do not match hidden")
    try:
        # with dist_process_group the weight is this rank's vocabulary shard; as in verl, the hidden
        # gradient is this rank's contribution (the tensor-parallel layer that owns hidden sums it)
        return linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                     temperature=real_temperature(a.get("temperature", 1.0)), return_entropy=True,
                                     validate=False, process_group=a.get("dist_process_group"))
    except (TypeError, ValueError) as error:
        raise Fallback(str(error)) from None


def _tensor_parallel_group(original):
    # verl's module reads the group from Megatron's parallel state at call time; so do we
    return original.__globals__["mpu"].get_tensor_model_parallel_group()


def _vocab_parallel_entropy(a, original, dtype=None):
    """Entropy of [..., V/tp] logits over the whole vocabulary, in the logits' dtype as verl's."""
    logits = a["vocab_parallel_logits"]
    entropy = fused_rows(logits, None, return_entropy=True, process_group=_tensor_parallel_group(original))[1]
    return entropy.to(dtype or logits.dtype)


def _vocab_parallel_entropy_with_chunking(a, original):
    """verl's chunked form: [B, T, V/tp] logits (it slices [:, i:i + chunk, :]), float32 (verl fills a
    zeros buffer)."""
    if not isinstance(a["vocab_parallel_logits"], torch.Tensor) or a["vocab_parallel_logits"].dim() != 3:
        raise Fallback("verl's chunked vocab-parallel entropy takes [B, T, V/tp] logits")
    return _vocab_parallel_entropy(a, original, torch.get_default_dtype())


def _vocab_parallel_log_probs(a, original):
    """Megatron's -vocab_parallel_cross_entropy: float32 log-probs of global label ids."""
    return fused_rows(a["logits"], a["labels"], process_group=_tensor_parallel_group(original))


def _replacements():
    functional, megatron = "verl.utils.torch_functional", "verl.utils.megatron.tensor_parallel"
    return [
        Replacement(functional, "logprobs_from_logits", _logprobs_from_logits, ("logits", "labels", "inplace_backward")),
        Replacement(functional, "logprobs_from_logits_v2", _logprobs_in_logits_dtype, ("logits", "labels")),
        Replacement(functional, "logprobs_from_logits_naive", _logprobs_in_logits_dtype, ("logits", "labels")),
        Replacement(functional, "entropy_from_logits", entropy_in_logits_dtype, ("logits",)),
        Replacement(functional, "entropy_from_logits_with_chunking", _entropy_with_chunking, ("logits", "chunk_size")),
        Replacement("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", _linear_cross_entropy,
                    ("hidden", "weight", "labels", "temperature", "reduction", "dist_process_group")),
        Replacement(megatron, "vocab_parallel_entropy", _vocab_parallel_entropy, ("vocab_parallel_logits",)),
        Replacement(megatron, "vocab_parallel_entropy_with_chunking", _vocab_parallel_entropy_with_chunking,
                    ("vocab_parallel_logits", "chunk_size")),
        Replacement(megatron, "vocab_parallel_log_probs_from_logits", _vocab_parallel_log_probs,
                    ("logits", "labels")),
    ]


LEFT_ALONE = {
    "verl.trainer.ppo.core_algos (kl_penalty, agg_loss, controllers, losses)": "O(N) work on log-probs",
    "verl.utils.torch_functional.masked_mean/masked_sum": "O(N)",
    "verl.utils.megatron.tensor_parallel.vocab_parallel_sum_pi_squared": "a statistic the kernels do not compute",
}


def patch(quiet: bool = False) -> Patch:
    """Wrap verl's O(N x V) functions (see the module docstring); restores on exit. ImportError
    without verl; a warning outside the tested versions."""
    return Patch("verl", TESTED, _replacements(), LEFT_ALONE, quiet=quiet)
