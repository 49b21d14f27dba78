"""The row pass, forward and backward, for both autograd Functions (api.py from logits, linear.py from
hidden states): the backend's kernel, the kept rows of sampling replay, the tensor-parallel merge.

Kept rows (docs/contract.md section 12) are computed by the same backend's own kernels, never by a
second softmax in PyTorch: the main call skips them (their labels ignored, so none of their logits is
read and their gradient rows are exact zeros), and a second call of the same op runs over their kept
columns' logits, gathered as [B, T, K] with -inf where an entry does not count (padding, a repeat,
another rank's id), each label replaced by its position in the set. A -inf logit has p = 0, so that
call's softmax is the softmax over S, with every rule of the kernels (the float64 lse, a banned label's
-inf, NaN rows) as it is over the whole vocabulary. Its [B, T, K] gradient is written at the kept
columns (replay.put). The two calls' rows are disjoint, so the merged statistics serve both backwards.
Under tensor parallelism each rank's part of every set is its shard of S, and the one merge adds the
parts (sharding.merge), as it adds the shards of the whole vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import replay
from .contract import PassArgs, PenaltyStats, RowStats, VocabShard
from .sharding import bad_label, merge

# The call over the kept columns has labels of its own (positions in a set): its ignored rows are
# those without a set, whatever the caller's ignore_index is; a label outside its set is a bad one.
KEPT_IGNORE = -2
KEPT_BAD = bad_label(KEPT_IGNORE)


def first_order_only() -> None:
    """Called first in every kernel-backed backward. The kernels compute first derivatives only:
    with create_graph=True autograd would record them as constants, and a double backward (a
    gradient penalty, a Hessian-vector product) would be silently wrong, so it is an error."""
    if torch.is_grad_enabled():
        raise RuntimeError("kl_kernels computes first-order gradients only: backward with create_graph=True "
                           "(double backward) is not supported by any backend; for second-order terms compute "
                           "the log-probs with torch.log_softmax instead")


class KeptRows(NamedTuple):
    """A call's kept rows as the kernels take them."""
    set: replay.KeptSet
    logits: torch.Tensor  # [..., K] the kept columns' logits, -inf where an entry does not count
    ref_logits: torch.Tensor | None  # the reference's, the same way; None without reference logits


def gather(kept: replay.KeptSet | None, logits, ref_logits=None) -> KeptRows | None:
    """The KeptRows of [B, T, V] logits (and reference logits), or None without a kept set."""
    if kept is None:
        return None
    return KeptRows(kept, replay.gather(logits, kept).view(*logits.shape[:2], -1),
                    None if ref_logits is None else replay.gather(ref_logits, kept).view(*logits.shape[:2], -1))


def from_values(kept: replay.KeptSet, values, ref_values=None) -> KeptRows:
    """The KeptRows of kept columns' logits already gathered as [N, K] (the hidden-state head's tiles)."""
    return KeptRows(kept, values.unsqueeze(0), None if ref_values is None else ref_values.unsqueeze(0))


def skipping(args: PassArgs, kept: KeptRows | None) -> PassArgs:
    """The main call's arguments: the rows with a kept set ignored."""
    if kept is None:
        return args
    return args._replace(labels=replay.kernel_labels(args.labels, kept.set, args.ignore_index))


def over_kept(args: PassArgs, kept: KeptRows) -> PassArgs:
    """The arguments of the call over the kept columns. args.labels are the main call's (under tensor
    parallelism a label another rank holds is V: no column here, so the merge takes the owner's)."""
    columns, counts, rows, _ = kept.set
    width = columns.shape[-1]
    labels = args.labels
    at = (columns == labels[:, None]) & counts
    position = torch.where(at.any(-1), at.to(torch.int8).argmax(-1), width)  # width: another rank's
    # a bad label (one outside its set is made one, sharding.vocab_shard): a NaN row, on every rank alike
    position = torch.where(labels >= 0, position, KEPT_BAD)
    position = torch.where(rows & (labels != args.ignore_index), position, KEPT_IGNORE)
    masked = lambda z: None if z is None else torch.where(counts.view(z.shape), z, float("-inf"))  # noqa: E731
    return args._replace(logits=masked(kept.logits), labels=position, ref_logits=masked(kept.ref_logits),
                         ignore_index=KEPT_IGNORE, shard=VocabShard(0, width + 1))


def _has_columns(kept: KeptRows | None) -> bool:
    return kept is not None and kept.logits.shape[-1] > 0


def forward(impl, args: PassArgs, kept: KeptRows | None, need_entropy: bool, need_full: bool) -> RowStats:
    """The RowStats of every row of args.logits: the kernel, then finish()."""
    stats = impl.fused_kl_fwd(skipping(args, kept), need_entropy, need_full)
    return finish(impl, args, stats, kept, need_entropy, need_full)


def finish(impl, args: PassArgs, stats: RowStats, kept: KeptRows | None, need_entropy: bool,
           need_full: bool) -> RowStats:
    """After the main kernel (which skipped the kept rows): the kept rows' statistics over their sets,
    then, under tensor parallelism, the merge of the ranks' statistics."""
    if _has_columns(kept):
        over = impl.fused_kl_fwd(over_kept(args, kept), need_entropy, need_full)
        stats = _select(kept, over, stats)
    if args.shard.group is not None:
        stats = merge(args, stats)
    return stats


def kept_gradient(impl, args: PassArgs, kept: KeptRows, stats: RowStats, grads) -> torch.Tensor | None:
    """[N, K] gradient of the kept rows' outputs at their kept columns (0 elsewhere, and in rows without a
    set), from the merged statistics; None when there are no columns."""
    if not _has_columns(kept):
        return None
    return impl.fused_kl_bwd(over_kept(args, kept), stats, grads, False).reshape(kept.set.columns.shape)


def backward(impl, args: PassArgs, stats: RowStats, grads, inplace: bool, kept: KeptRows | None) -> torch.Tensor:
    """The [B, T, V] gradient of args.logits (written into them when inplace)."""
    on_kept = None if kept is None else kept_gradient(impl, args, kept, stats, grads)
    grad = impl.fused_kl_bwd(skipping(args, kept), stats, grads, inplace)
    return _put(grad, kept, on_kept)


def penalty_forward(impl, args: PassArgs, penalty, kept: KeptRows | None, need_entropy: bool) -> PenaltyStats:
    """kl_penalty in the backend's one-pass ops: the main call, and the call over the kept columns with
    the same estimator, masks and sequences. A sequence's sum adds the two calls' parts, and its mean
    divides by both calls' valid rows; a sequence without kept rows keeps the main call's numbers."""
    stats = impl.kl_penalty_fwd(skipping(args, kept), penalty, need_entropy)
    if not _has_columns(kept):
        return stats
    over = impl.kl_penalty_fwd(over_kept(args, kept), penalty, need_entropy)
    has_kept = over.counts > 0
    counts = stats.counts + over.counts
    kl_sum = torch.where(has_kept, stats.kl_sum + over.kl_sum, stats.kl_sum)
    return _select(kept, over, stats)._replace(
        counts=counts, kl_sum=kl_sum, kl_mean=torch.where(has_kept, kl_sum / counts.clamp(min=1), stats.kl_mean))


def penalty_backward(impl, args: PassArgs, penalty, stats: PenaltyStats, grads, inplace: bool,
                     kept: KeptRows | None) -> torch.Tensor:
    """The [B, T, V] gradient of kl_penalty's one-pass ops (stats: penalty_forward's, whose counts are both
    calls' valid rows: a mean's gradient divides by them in either call)."""
    on_kept = None
    if _has_columns(kept):
        on_kept = impl.kl_penalty_bwd(over_kept(args, kept), penalty, stats, grads, False)
        on_kept = on_kept.reshape(kept.set.columns.shape)
    grad = impl.kl_penalty_bwd(skipping(args, kept), penalty, stats, grads, inplace)
    return _put(grad, kept, on_kept)


# PenaltyStats' fields that are not per row: the per-sequence outputs and each row's sequence (the same
# in both calls)
_NOT_PER_ROW = ("kl_sum", "kl_mean", "counts", "sequence")


def _select(kept: KeptRows, over, stats):
    """stats (RowStats or PenaltyStats) with the kept rows' values taken from `over`, the call over the
    kept columns."""
    rows = kept.set.rows
    return stats._replace(**{name: torch.where(rows, getattr(over, name), value)
                             for name, value in stats._asdict().items()
                             if value is not None and name not in _NOT_PER_ROW})


def _put(grad, kept: KeptRows | None, on_kept):
    if on_kept is not None:
        B, T, _ = grad.shape
        replay.put(grad, kept.set.columns.view(B, T, -1), kept.set.counts.view(B, T, -1), on_kept.view(B, T, -1))
    return grad
