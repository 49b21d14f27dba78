"""The kernel contract: the records every backend reads and returns, and the protocols it implements
(docs/contract.md describes the functions; this module, what crosses between them and a backend).

A leaf: it imports torch only, so that the public functions (api.py, linear.py), the registry
(dispatch.py) and every backend (backends/) can share these names without importing each other.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class VocabShard(NamedTuple):
    """Where a kernel's V columns sit: ids [start, start + V) of a vocabulary of `size` ids; a label
    outside [0, size) is bad (a NaN row). Unsharded: start 0, size V. A tensor-parallel rank's
    (sharding.vocab_shard): its labels made local (another rank's label is column V, none here), so
    start 0 and size V + 1, with group and each label's owner rank for the merge, and where the shard
    sits among the whole vocabulary's ids (to make global kept ids local, sampling replay)."""
    start: int
    size: int
    group: object = None  # the process group; None: not sharded
    owner: object = None  # [N] int64 tensor: the rank whose shard holds each label (sharded only)
    offset: object = None  # [] int64 tensor: the global id of this rank's column 0 (sharded only)
    total: object = None  # [] int64 tensor: the whole vocabulary's size (sharded only)
    # a value check of this rank's that failed after the ranks' header exchange (validate=True): raised
    # once the merge, which every rank joins, has made every row NaN (sharding.merge)
    error: object = None


def whole(vocab: int) -> VocabShard:
    return VocabShard(0, vocab)


class PassArgs(NamedTuple):
    """What every backend's fused pass reads, forward and backward: the kernel contract's inputs."""
    logits: torch.Tensor  # [B, T, V] policy logits (this rank's vocabulary shard), vocabulary dim contiguous
    labels: torch.Tensor  # [N = B*T] int64, ids of the whole vocabulary
    ref_logits: Optional[torch.Tensor]  # [B, T, V] reference logits (any floating dtype), or None
    temperature: Union[float, torch.Tensor]  # T itself, everywhere: a float, or [N] in the compute dtype
    ignore_index: int
    shard: VocabShard  # where the V columns sit in the vocabulary (sharding.whole(V) when not sharded)


class RowStats(NamedTuple):
    """What every backend's forward returns: [N] each, float32 (float64 for float64 logits); None where
    not asked for. lse / ref_lse are saved for the backward, in float64 whatever the logits: a float32
    lse rounds by |lse| 2^-24, which every p = exp(z/T - lse) of the backward would carry."""
    logp: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    full_kl: Optional[torch.Tensor]
    lse: torch.Tensor
    ref_lse: Optional[torch.Tensor]


class RowGrads(NamedTuple):
    """The upstream gradients the backward takes: [N] each, or None when nothing flows from that output."""
    logp: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    full_kl: Optional[torch.Tensor]


class PenaltyArgs(NamedTuple):
    """What kl_penalty's one-pass ops read besides PassArgs (never sharded: a tensor-parallel call
    merges the rows' statistics across ranks first, then runs api.py's epilogue)."""
    estimator: object  # estimators.Estimator (name, straight_through, log_ratio_clamp, kl_clamp)
    ref_logprobs: Optional[torch.Tensor]  # [N] given reference log-probs (any floating dtype), when no ref_logits
    mask: Optional[torch.Tensor]  # [N] any real dtype, nonzero = valid, or None
    padded: bool  # sequences are the B rows of [B, T, V]; else cu_seqlens
    cu_seqlens: Optional[torch.Tensor]  # packed: [S+1] as the caller gave it (the kernels clamp it); None: one sequence
    kl_coef: Union[float, torch.Tensor]  # a float or a 0-dim tensor


class PenaltyStats(NamedTuple):
    """What the one-pass forward returns: kl_penalty's outputs ([N] and [S]) and what its backward reads."""
    logp: torch.Tensor
    ref_logp: torch.Tensor
    kl: torch.Tensor
    penalty: torch.Tensor
    kl_sum: torch.Tensor
    kl_mean: torch.Tensor
    counts: torch.Tensor  # [S] valid rows per sequence, in the compute dtype
    sequence: torch.Tensor  # [N] int32: each row's sequence, -1 outside every one (packed, validate=False)
    entropy: Optional[torch.Tensor]
    full_kl: Optional[torch.Tensor]
    lse: torch.Tensor
    ref_lse: Optional[torch.Tensor]


class PenaltyGrads(NamedTuple):
    """Upstream gradients of kl_penalty's six differentiable outputs, None where nothing flows."""
    logp: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    penalty: Optional[torch.Tensor]
    kl_sum: Optional[torch.Tensor]
    kl_mean: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]


@runtime_checkable
class FusedPass(Protocol):
    """What a backend implements (backends/reference.py in PyTorch; backends/adapter.py over the C++ and Triton ops)."""

    def fused_kl_fwd(self, args: PassArgs, need_entropy: bool, need_full: bool) -> RowStats:
        """One read of the logits (and reference logits): the per-row statistics."""

    def fused_kl_bwd(self, args: PassArgs, stats: RowStats, grads: RowGrads, inplace: bool) -> torch.Tensor:
        """The logits' gradient in their dtype (written into args.logits when inplace), from the
        statistics the forward saved (for a shard: the merged ones of the whole vocabulary)."""


@runtime_checkable
class OnePass(FusedPass, Protocol):
    """A backend that also runs all of kl_penalty in its kernels: at most two launches each way
    (the row pass with the estimator as its epilogue, and the per-sequence sums)."""

    def serves_one_pass(self, device: torch.device) -> bool:
        """Whether the one-pass ops are built for this device."""

    def kl_penalty_fwd(self, args: PassArgs, penalty: PenaltyArgs, need_entropy: bool) -> PenaltyStats:
        """The row pass, the estimator, masks, penalty and per-sequence sums."""

    def kl_penalty_bwd(self, args: PassArgs, penalty: PenaltyArgs, stats: PenaltyStats, grads: PenaltyGrads,
                       inplace: bool) -> torch.Tensor:
        """The logits' gradient from the six outputs' upstream gradients, one more pass."""
