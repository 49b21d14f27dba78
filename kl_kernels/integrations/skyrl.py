"""SkyRL's O(N x V) scoring on the fused path, sample-support replay included.

`patch()` wraps, in SkyRL 0.4.0 (and every loaded skyrl module that imported them by name):
- `skyrl.backends.skyrl_train.utils.sample_support_replay.sample_support_scores`, the scorer behind
  SkyRL's sample-support replay (`score_aligned_sample_support`, `compute_sample_support_scores`; the FSDP
  and Megatron model wrappers): each position's recorded support row (`[..., top_k]` int32 ids, -1
  padding) is `kept_ids` as it is. From logits (FSDP: unsharded, temperature already applied) by
  `token_logprobs`; from hidden states with the LM head's weight (Megatron) by `linear_token_logprobs`,
  whose kept rows are projected onto their support only, and only the positions that have a support row
  are scored; a tensor-parallel group as ours (`process_group`). SkyRL's return record, its 0 for a
  position without a support row, its entropy clamp and its detached entropy where asked, are kept.
  A call we do not serve goes to SkyRL: a sampled id outside its own support (SkyRL scores it as
  z_y - lse(S); the fused pass calls it a bad label), a support row that repeats an id (SkyRL counts it
  as often as it appears, kept_ids once), a vocabulary shard that is not rank * width.
- `skyrl.backends.skyrl_train.utils.torch_utils.logprobs_from_logits` (verl's, as SkyRL copied it) and
  `chunked_entropy_from_logits` (the entropy of rows the attention mask keeps; SkyRL computes it under
  no_grad unless asked).

Left to SkyRL: the policy losses, advantage estimators, KL controllers, off-policy corrections and the
packing of support rows (O(N) work or bookkeeping).
"""
from __future__ import annotations

import torch

from ..api import token_logprobs
from ..contract import compute_dtype
from ..linear import linear_token_logprobs
from ._patching import (Fallback, Patch, Replacement, fused_backend, fused_rows, labels_for, logprobs_verl_style,
                        real_temperature)

TESTED = ("0.4.0", "0.5.0")  # >= first, < second
IGNORE = -100  # positions without a support row: scored by nobody, 0 as in SkyRL


def _logprobs_from_logits(a, original):
    logits = a["logits"]
    flash = bool(original.__globals__.get("FLASH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE")) and \
        isinstance(logits, torch.Tensor) and logits.is_cuda
    return logprobs_verl_style(a, flash)


def _chunked_entropy(a, original):
    """[B, S] entropy in the logits' dtype, times the attention mask where one is given (SkyRL's 0 on padded
    positions, none of whose logits are read here), with a graph only when requires_grad."""
    logits, mask = a["logits"], a.get("attention_mask")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise Fallback("SkyRL's chunked entropy takes [B, S, V] logits")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != logits.shape[:2]):
        raise Fallback("attention_mask does not match the logits")  # SkyRL's own ValueError
    with torch.enable_grad() if a.get("requires_grad", False) else torch.no_grad():
        entropy = fused_rows(logits, None, return_entropy=True, row_mask=mask)[1]
        if mask is not None:
            entropy = entropy * mask
    return entropy.to(logits.dtype)


def _tensor_parallel(a, width):
    """The process group to pass on (None without tensor parallelism), or Fallback for a layout ours is
    not: kl_kernels' shards are contiguous in rank order, rank r holding [r * width, (r + 1) * width)."""
    group, start = a["tp_group"], a["vocab_start_index"]
    if a["vocab_end_index"] - start != width:
        raise Fallback("the vocabulary range does not match the logits' or the weight's width")
    if group is None or torch.distributed.get_world_size(group) == 1:
        if start != 0:
            raise Fallback("a vocabulary shard without a tensor-parallel group")
        return None
    if start != torch.distributed.get_rank(group) * width:
        raise Fallback("the vocabulary shards are not rank * width")
    return group


def _sample_support_scores(a, original):
    source, sampled, support = a["logits_or_hidden"], a["sampled_ids"], a["support_ids"]
    weight, compute_entropy = a["lm_head_weight"], a["compute_entropy"]
    if not all(isinstance(t, torch.Tensor) for t in (source, sampled, support)) or \
            source.shape[:-1] != sampled.shape or support.shape[:-1] != sampled.shape or \
            support.dtype != torch.int32 or support.shape[-1] == 0 or \
            (a["entropy_requires_grad"] and not compute_entropy):
        raise Fallback("arguments SkyRL rejects or reads otherwise")  # its own ValueError, from its own code
    dtype = source.dtype if weight is None else weight.dtype
    fused_backend(source, dtype)
    temperature = 1.0 if weight is None else real_temperature(a["temperature"])  # SkyRL scales hidden scores only
    group = _tensor_parallel(a, source.shape[-1] if weight is None else weight.shape[0])
    valid = (support >= 0).any(-1)
    # SkyRL scores a sampled id outside its own support row (the fused pass would call it a bad label) and
    # counts a repeated id as often as it appears (kept_ids count it once); a sampler records neither
    sampled = labels_for(source, sampled).long()
    ordered = support.sort(-1).values
    repeated = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(-1)
    outside = valid & ~(support == sampled[..., None]).any(-1)
    if bool((repeated | outside).any()):
        raise Fallback("a sampled id outside its own support row, or a repeated id in one")
    labels = torch.where(valid, sampled, IGNORE)
    if weight is None:
        scored = token_logprobs(source, labels, kept_ids=support, ignore_index=IGNORE, return_entropy=compute_entropy,
                                validate=False, process_group=group)
        logp, entropy = scored if compute_entropy else (scored, None)
    else:  # only the positions with a support row are projected, each onto its row only
        flat = source.reshape(-1, source.shape[-1])
        rows = valid.reshape(-1).nonzero().squeeze(1)
        scored = linear_token_logprobs(flat[rows], weight, labels.reshape(-1)[rows],
                                       kept_ids=support.reshape(-1, support.shape[-1])[rows], temperature=temperature,
                                       return_entropy=compute_entropy, validate=False, process_group=group)
        logp, entropy = scored if compute_entropy else (scored, None)
        spread = lambda values: flat.new_zeros(valid.numel(), dtype=values.dtype).index_put(  # noqa: E731
            (rows,), values).view(valid.shape)
        logp, entropy = spread(logp), None if entropy is None else spread(entropy)
    logp = torch.where(valid, logp.to(compute_dtype(dtype)), 0.0)
    if entropy is not None:
        entropy = torch.where(valid, entropy.to(logp.dtype), 0.0).clamp(min=0.0)
        entropy = entropy if a["entropy_requires_grad"] else entropy.detach()
    return original.__globals__["SampleSupportScores"](logprobs=logp, entropy=entropy, valid_mask=valid)


def _replacements():
    replay, functional = "skyrl.backends.skyrl_train.utils.sample_support_replay", \
        "skyrl.backends.skyrl_train.utils.torch_utils"
    return [
        Replacement(replay, "sample_support_scores", _sample_support_scores,
                    ("logits_or_hidden", "sampled_ids", "support_ids", "vocab_start_index", "vocab_end_index",
                     "tp_group", "compute_entropy", "entropy_requires_grad", "lm_head_weight", "temperature",
                     "chunk_size")),
        Replacement(functional, "logprobs_from_logits", _logprobs_from_logits, ("logits", "labels", "inplace_backward")),
        Replacement(functional, "chunked_entropy_from_logits", _chunked_entropy,
                    ("logits", "requires_grad", "attention_mask", "chunk_size")),
    ]


LEFT_ALONE = {
    "skyrl policy losses, advantage estimators, KL controllers, off-policy corrections": "O(N) work on log-probs",
    "skyrl.backends.skyrl_train.utils.sample_support (packing support rows)": "bookkeeping, O(N K)",
}


def patch(quiet: bool = False) -> Patch:
    """Wrap SkyRL's O(N x V) scoring (see the module docstring); restores on exit. ImportError without
    skyrl; a warning outside the tested versions."""
    return Patch("skyrl", TESTED, _replacements(), LEFT_ALONE, quiet=quiet)
