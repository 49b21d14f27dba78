"""Sampling replay (docs/contract.md section 12): the row's softmax taken over the sampler's kept set S.

An engine that samples with top-k / top-p / min-p normalises its log-probs over the tokens that
survived truncation (vLLM's `processed_logprobs`, and the kept set it returns per token); a trainer
that recomputes them over the whole vocabulary puts log(kept mass) into every importance ratio.
Given each position's kept ids, the label log-prob, the entropy, the reference's log-prob and the
exact KL are taken over S instead: logp = z_y/T - log sum_{v in S} e^{z_v/T}.

The fused kernels see the rows that have a kept set as ignored rows (kernel_labels), so they read
none of their logits; those rows take their statistics from the K logits of S, gathered (O(N K) reads,
never a pass over [N, V], never an [N, V] mask), with the float64 lse the kernels would save. In the
backward the kernel writes those rows as exact zeros, and their gradient, nonzero on S only, is the
kernels' closed form over S (kept_gradient), written at the K columns (put). Rows without a set (all
-1) are the fused pass's, bit for bit. Under tensor parallelism each rank's part of every set is its
statistics and the one merge adds the parts (sharding.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import validation as check


class KeptSet(NamedTuple):
    """Each row's kept set, as gathered: [N, K] each, and [N] per-row flags."""
    columns: torch.Tensor  # int64 columns of the logits; 0 where the entry does not count
    counts: torch.Tensor  # bool: the entry counts (an id >= 0 of these columns, not a repeat of an earlier one)
    rows: torch.Tensor  # [N] bool: the row has a kept set (else its whole vocabulary)
    inside: torch.Tensor  # [N] bool: the label is in its row's set (or the row has none, or is ignored)


def check_kept_ids(kept_ids, labels, device) -> None:
    """What can be checked of kept_ids [..., K] before the vocabulary is known: kind, shape, device."""
    check.tensor(kept_ids, "kept_ids")
    if kept_ids.is_floating_point() or kept_ids.is_complex() or kept_ids.dtype == torch.bool:
        raise TypeError(f"kept_ids must be an integer tensor of token ids (-1 = padding), got dtype {kept_ids.dtype}")
    if kept_ids.dim() != labels.dim() + 1 or tuple(kept_ids.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"kept_ids must be [..., K] with the labels' shape {tuple(labels.shape)} before K, got "
                         f"shape {tuple(kept_ids.shape)}")
    check.same_device(device, kept_ids=kept_ids)


def kept_set(kept_ids, labels, vocab, ignore_index: int, validate: bool, offset=0, columns=None) -> KeptSet:
    """The kept set of a call (kept_ids checked by check_kept_ids): ids of a vocabulary of `vocab` ids (an
    int, or a [] tensor: a tensor-parallel call's whole vocabulary, read only with validate), as columns
    of logits holding ids [offset, offset + columns) (a tensor-parallel rank's shard; default: all).
    The ids another rank holds count there: the merge adds the ranks' parts (sharding.py)."""
    n_rows, width = labels.numel(), kept_ids.shape[-1]
    ids = kept_ids.reshape(n_rows, width).to(torch.int64)
    if validate and ids.numel():
        if bool(((ids < -1) | (ids >= vocab)).any()):
            raise ValueError(f"kept_ids must be token ids in [0, {int(vocab)}) or -1 (padding)")
    present = (ids >= 0) & (ids < vocab)  # validate=False: an id out of range does not count
    rows = present.any(-1)
    flat = labels.reshape(-1).to(torch.int64)
    inside = ~rows | (flat == ignore_index) | ((ids == flat[:, None]) & present).any(-1)
    if validate and ids.numel() and not bool(inside.all()):
        raise ValueError("kept_ids: every label must be in its row's kept set (a sampled token survived its "
                         "sampler's truncation); a row without a kept set is all -1")
    columns = int(vocab) if columns is None else columns
    local = ids - offset
    local = torch.where(present & (local >= 0) & (local < columns), local, -1)
    counts = _first_occurrences(local, columns)
    return KeptSet(torch.where(counts, local, 0), counts, rows, inside)


def _first_occurrences(ids, columns: int):
    """[N, K] bool: the entries that count, each id in [0, columns) at its first place in its row
    (duplicates count once; -1 never). The CPU's kernel marks them with a bitmap (csrc/cpu/replay.cpp);
    elsewhere a stable sort finds the repeats (the same marks)."""
    if ids.device.type == "cpu" and _has_cpu_kernel():
        return torch.ops.kl_kernels.kept_counts(ids, columns)
    ordered, order = ids.sort(dim=-1, stable=True)
    first = ordered >= 0
    first[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    return torch.empty_like(first).scatter_(-1, order, first)


def _has_cpu_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("kl_kernels::kept_counts", "CPU")


def gather(logits: torch.Tensor, kept: KeptSet) -> torch.Tensor:
    """[N, K] logits of the kept columns, read from [B, T, V] in place (any row strides)."""
    B, T, _ = logits.shape
    return logits.gather(2, kept.columns.view(B, T, -1)).reshape(B * T, -1)


def _scaled(z, kept: KeptSet, temperature):
    """(x = z/T in the compute dtype, -inf where the entry does not count; live: the entries with p > 0
    possible). A -inf logit inside S has p = 0 and adds nothing (selected away, never 0 * -inf)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    t = temperature[:, None].to(dtype) if isinstance(temperature, torch.Tensor) else temperature
    x = torch.where(kept.counts, z.to(dtype) / t, float("-inf"))
    return x, kept.counts & (x != float("-inf"))


def _log_softmax(x, live):
    """(log p of the live entries, 0 elsewhere; the float64 lse): log p = (x - m) - log s from the max m
    and s = sum exp(x - m), the difference with the max exact, as the kernels (csrc/fused_kl_math.h);
    the lse = m + log s formed in float64 (a float32 lse would round by |lse| 2^-24, issue 28)."""
    m = x.amax(-1)
    m = torch.where(m == float("-inf"), 0.0, m)  # a set with no live entry: s = 0, lse = -inf
    shifted = x - m[:, None]
    log_s = torch.where(live, shifted.exp(), 0.0).sum(-1).log()
    return torch.where(live, shifted - log_s[:, None], 0.0), m.double() + log_s.double()


def _log_probs(x, live, lse):
    """log p of the live entries given the saved float64 lse, 0 elsewhere: x - lse as (x - head) - tail
    with lse's float head and tail, so p carries none of lse's size in its error (as the kernels)."""
    head = lse.to(x.dtype)
    tail = (lse - head.double()).to(x.dtype)
    return torch.where(live, (x - head[:, None]) - tail[:, None], 0.0)


def row_stats(z, ref_z, kept: KeptSet, labels, ignore_index, temperature, need_entropy, need_full):
    """The RowStats of each row over its kept set (the part of it in these columns: a tensor-parallel
    rank's, which the merge adds up): logp, ref_logp, entropy, the exact KL and the float64 lse, ref_lse;
    None where not asked for. labels are the kernels' (a label not in these columns: -inf, the merge takes
    the owner's; a bad label, negative: NaN). A label outside its set (kept.inside): a NaN row."""
    x, live = _scaled(z, kept, temperature)
    log_p, lse = _log_softmax(x, live)
    label_at = (kept.columns == labels[:, None]) & kept.counts
    found = label_at.any(-1)
    position = label_at.to(torch.int8).argmax(-1, keepdim=True)
    valid = labels != ignore_index
    nan_row = valid & (~kept.inside | (labels < 0))

    def per_row(value):
        return torch.where(valid, torch.where(nan_row, float("nan"), value), 0.0)

    def label_logprob(log_probs):
        return per_row(torch.where(found, log_probs.gather(1, position).squeeze(1), float("-inf")))

    p = torch.where(live, log_p.exp(), 0.0)
    entropy = per_row(-(p * log_p).sum(-1)) if need_entropy else None
    ref_logp = full = ref_lse = None
    if ref_z is not None:
        ref_x, ref_live = _scaled(ref_z, kept, temperature)
        log_q, ref_lse = _log_softmax(ref_x, ref_live)
        ref_logp = label_logprob(log_q)
        if need_full:
            # +inf where the reference bans (-inf) a kept token the policy can sample, as the kernels do
            banned = (live & ~ref_live).any(-1)
            terms = torch.where(live, p * (log_p - log_q), 0.0).sum(-1)
            full = per_row(torch.where(banned, float("inf"), terms))
    return label_logprob(log_p), ref_logp, entropy, full, lse, ref_lse


def override(stats, kept: KeptSet, values):
    """The RowStats of the fused pass with the kept rows' values (row_stats) in place of the whole
    vocabulary's, the lse included (the merge of a tensor-parallel call and the backward read it)."""
    replaced = {}
    for name, value in zip(stats._fields, values):
        current = getattr(stats, name)
        if current is not None and value is not None:
            replaced[name] = torch.where(kept.rows, value.to(current.dtype), current)
    return stats._replace(**replaced)


def after_merge(stats, kept: KeptSet, labels, ignore_index: int):
    """A tensor-parallel call's merged RowStats with the rows whose label is outside its set NaN again: the
    merge reads a label's owner rank, which may own none of the set (its lse -inf), and would take that
    for a banned label (-inf)."""
    outside = (labels != ignore_index) & ~kept.inside
    return stats._replace(**{name: torch.where(outside, float("nan"), getattr(stats, name))
                             for name in ("logp", "ref_logp", "entropy", "full_kl") if getattr(stats, name) is not None})


def kernel_labels(labels, kept: KeptSet, ignore_index: int):
    """The labels the kernels read: the kept rows ignored, so the forward reads none of their logits (their
    numbers come from row_stats) and the backward writes them as exact zeros (kept_gradient's, put after)."""
    return torch.where(kept.rows, ignore_index, labels)


def rows_of(kept: KeptSet, n0: int, n1: int) -> KeptSet:
    """Rows [n0, n1) of a kept set (a tile of the hidden-state head)."""
    return KeptSet(*(field[n0:n1] for field in kept))


def kept_gradient(z, ref_z, kept: KeptSet, labels, ignore_index, temperature, stats, grads):
    """[N, K] gradient of the kept rows' outputs at their kept columns (0 elsewhere), from the upstream
    gradients of logp, entropy and the exact KL (RowGrads) and the rows' statistics over their sets
    (RowStats after override, merged when sharded: p = exp(z/T - lse) is then the whole set's softmax):
        d/dz_v = (g_logp [v == y] + p_v f_v) / T,  f_v = -g_logp - g_H (log p_v + H) + g_F (log p_v - log q_v - KL)
    as the kernels' backward (csrc/fused_kl_math.h). Rows that take none (no set, an ignored label, no
    upstream gradient) are 0."""
    x, live = _scaled(z, kept, temperature)
    # nothing flows back from a row whose upstream gradients are all 0 (a masked row): an exact 0, NaN
    # logits or not, as in the kernels
    flows = torch.stack([g != 0 for g in grads if g is not None]).any(0)
    takes = (kept.rows & (labels != ignore_index) & flows)[:, None]
    log_p = _log_probs(x, live, stats.lse)
    row = lambda value: value.to(x.dtype)[:, None]  # noqa: E731
    factor = torch.zeros_like(x)
    column = torch.zeros_like(x)
    if grads.logp is not None:
        factor = factor - row(grads.logp)
        column = torch.where((kept.columns == labels[:, None]) & kept.counts, row(grads.logp), 0.0)
    if grads.entropy is not None:
        factor = factor - row(grads.entropy) * (log_p + row(stats.entropy))
    if grads.full_kl is not None:
        ref_x, ref_live = _scaled(ref_z, kept, temperature)
        log_q = torch.where(ref_live, _log_probs(ref_x, ref_live, stats.ref_lse), float("-inf"))
        factor = factor + row(grads.full_kl) * (log_p - log_q - row(stats.full_kl))
    t = row(temperature) if isinstance(temperature, torch.Tensor) else temperature
    # where p_v == 0 (a -inf logit) the gradient is 0, not 0 * inf, as in the kernels
    grad = (column + torch.where(live, log_p.exp() * factor, 0.0)) / t
    return torch.where(kept.counts & takes, grad, 0.0)


def kept_ids_from_sampler(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, max_kept=None):
    """The kept set a vLLM-style sampler leaves at each position, as `kept_ids` [..., K] (-1 padding).

    For engines that do not return their sampling mask. The steps follow vLLM's sampler, in its order:
    the temperature, then min_p (tokens whose probability is below min_p times the row's largest go),
    then top_k (the k largest stay, ties at the k-th included), then top_p (the most probable tokens
    whose probabilities, renormalised after top_k, reach p; at least one). A replay, not the engine's
    own mask: where tokens tie at a boundary, or the engine computed its logits in another precision,
    a set can differ. K is the largest set of the call (a host sync), or max_kept (larger sets are cut
    to their most probable max_kept). Rows are processed in blocks: memory O(block x V), not O(N x V)."""
    check.floating(logits, "logits")
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    temperatures = None
    if isinstance(temperature, torch.Tensor):
        temperatures = temperature.to(torch.float32).expand(logits.shape[:-1]).reshape(-1)
    elif not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1] or None, got {min_p!r}")
    block = max(1, (1 << 22) // max(vocab, 1))
    keeps = []
    for r0 in range(0, rows.shape[0], block):
        x = rows[r0:r0 + block].float()
        x = x / (temperatures[r0:r0 + block, None] if temperatures is not None else float(temperature))
        keep = torch.ones_like(x, dtype=torch.bool)
        if min_p is not None:
            probs = torch.softmax(x, -1)
            keep &= probs >= min_p * probs.amax(-1, keepdim=True)
        if top_k is not None and top_k < vocab:
            kth = x.masked_fill(~keep, float("-inf")).topk(int(top_k), dim=-1).values[:, -1:]
            keep &= x >= kth
        if top_p is not None and top_p < 1:
            probs = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
            ascending, order = probs.sort(dim=-1)
            drop = ascending.cumsum(-1) <= 1 - top_p
            drop[:, -1] = False  # at least the most probable token
            keep &= ~torch.zeros_like(drop).scatter_(-1, order, drop)
        keeps.append((keep, x))
    counts = torch.cat([keep.sum(-1) for keep, _ in keeps]) if keeps else torch.zeros(0, dtype=torch.long)
    width = int(counts.max()) if counts.numel() else 1
    width = max(1, min(width, max_kept) if max_kept is not None else width)
    out = []
    for keep, x in keeps:
        # the kept ids, most probable first; -1 after a row's set
        ranked = x.masked_fill(~keep, float("-inf")).topk(width, dim=-1)
        out.append(torch.where(ranked.values > float("-inf"), ranked.indices, -1))
    ids = torch.cat(out) if out else torch.empty(0, width, dtype=torch.long)
    return ids.reshape(*logits.shape[:-1], width)


def put(target, columns, take, values):
    """target[..., columns[..., j]] = values[..., j] wherever take[..., j], in place, where target holds
    exact zeros at those places (the kept rows the kernel zeroed), so writing is adding. A plain write
    (index_put_ on the flat target): on a CPU a bf16 scatter, with or without add, works through a
    float32 copy of the whole target, an [N, V] temporary and a pass. The entries that take nothing
    write what the target will hold anyway (the new value of the row's largest taken column, or, in a
    row that takes none, what it holds at column 0), so every place written gets one value, whatever
    the order of the writes."""
    take = take & (values != 0)  # a zero needs no write: the target is zero there already
    anchor = torch.where(take, columns, -1).amax(-1, keepdim=True)  # a taken column of the row, -1: none
    has = anchor >= 0
    anchor = anchor.clamp(min=0)
    position = (take & (columns == anchor)).to(torch.int8).argmax(-1, keepdim=True)
    fill = torch.where(has, values.gather(-1, position).to(target.dtype), target.gather(-1, anchor))
    index, source = torch.where(take, columns, anchor), torch.where(take, values.to(target.dtype), fill)
    if not target.is_contiguous():
        target.scatter_(-1, index, source)
        return
    # index_put_ on the flat tensor: a plain copy (the CPU scatter_ of bf16 also widened the whole target)
    rows = torch.arange(index[..., 0].numel(), device=index.device).view(index.shape[:-1] + (1,))
    target.view(-1).index_put_(((rows * target.shape[-1] + index).reshape(-1),), source.reshape(-1))
