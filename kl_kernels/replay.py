"""Sampling replay (docs/contract.md section 12): the row's softmax taken over the sampler's kept set S.

An engine that samples with top-k / top-p / min-p normalises its log-probs over the tokens that
survived truncation (vLLM's `processed_logprobs`, and the kept set it returns per token); a trainer
that recomputes them over the whole vocabulary puts log(kept mass) into every importance ratio.
Given each position's kept ids, the label log-prob, the entropy, the reference's log-prob and the
exact KL are taken over S instead: logp = z_y/T - log sum_{v in S} e^{z_v/T}.

The fused pass runs as always (one read of the logits) and gives every row its whole-vocabulary
statistics; the rows that have a kept set then get theirs from the K logits of S, gathered (O(N K)
reads, never a second pass over [N, V], never an [N, V] mask). In the backward the kernel is given
no upstream gradient for those rows (it writes them as exact zeros) and their gradient, nonzero on
S only, is written at the K columns (put). Rows without a set (all -1) keep the fused pass's numbers,
bit for bit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import validation as check


class KeptSet(NamedTuple):
    """Each row's kept set, as gathered: [N, K] each."""
    columns: torch.Tensor  # int64 columns of the logits; 0 where the entry does not count
    counts: torch.Tensor  # bool: the entry counts (an id >= 0, not a repeat of an earlier one)
    rows: torch.Tensor  # [N] bool: the row has a kept set (else its whole vocabulary)


def kept_set(kept_ids, labels, vocab: int, ignore_index: int, validate: bool, device) -> KeptSet:
    """The checked kept set of a call: kept_ids [..., K] integer, -1 padding, labels' leading shape."""
    check.tensor(kept_ids, "kept_ids")
    if kept_ids.is_floating_point() or kept_ids.is_complex() or kept_ids.dtype == torch.bool:
        raise TypeError(f"kept_ids must be an integer tensor of token ids (-1 = padding), got dtype {kept_ids.dtype}")
    if kept_ids.dim() != labels.dim() + 1 or tuple(kept_ids.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"kept_ids must be [..., K] with the labels' shape {tuple(labels.shape)} before K, got "
                         f"shape {tuple(kept_ids.shape)}")
    check.same_device(device, kept_ids=kept_ids)
    n_rows, width = labels.numel(), kept_ids.shape[-1]
    ids = kept_ids.reshape(n_rows, width).to(torch.int64)
    if validate and ids.numel():
        if bool(((ids < -1) | (ids >= vocab)).any()):
            raise ValueError(f"kept_ids must be token ids in [0, {vocab}) or -1 (padding)")
    ids = torch.where((ids >= 0) & (ids < vocab), ids, -1)  # validate=False: an id out of range does not count
    ordered = ids.sort(dim=-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # duplicates count once
    counts = (ordered >= 0) & ~repeat
    rows = counts.any(-1)
    if validate and ids.numel():
        flat = labels.reshape(-1).to(torch.int64)
        inside = ((ordered == flat[:, None]) & counts).any(-1)
        if bool((rows & (flat != ignore_index) & ~inside).any()):
            raise ValueError("kept_ids: every label must be in its row's kept set (a sampled token survived its "
                             "sampler's truncation); a row without a kept set is all -1")
    return KeptSet(torch.where(counts, ordered, 0), counts, rows)


def gather(logits: torch.Tensor, kept: KeptSet) -> torch.Tensor:
    """[N, K] logits of the kept columns, read from [B, T, V] in place (any row strides)."""
    B, T, _ = logits.shape
    return logits.gather(2, kept.columns.view(B, T, -1)).reshape(B * T, -1)


def _log_softmax_over(z, kept: KeptSet, temperature):
    """(x, lse, log p, live) of the kept entries, x = z/T: entries that do not count are -inf in x and 0
    in log p; live marks the entries with p > 0 possible (counted, not a -inf logit)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    t = temperature[:, None].to(dtype) if isinstance(temperature, torch.Tensor) else temperature
    x = torch.where(kept.counts, z.to(dtype) / t, float("-inf"))
    lse = torch.logsumexp(x, -1)
    # a -inf logit inside S has p = 0 and adds nothing (select, so no 0 * -inf in value or gradient)
    live = kept.counts & (x != float("-inf"))
    log_p = torch.where(live, x - lse[:, None], 0.0)
    return x, lse, log_p, live


def row_stats(z, ref_z, kept: KeptSet, labels, ignore_index, temperature, need_entropy, need_full):
    """logp, ref_logp, entropy and the exact KL of each row over its kept set ([N] each, None where not
    asked for), differentiable in z. A label outside its set (validate=False): NaN."""
    x, lse, log_p, live = _log_softmax_over(z, kept, temperature)
    label_at = (kept.columns == labels[:, None]) & kept.counts
    inside = label_at.any(-1)
    position = label_at.to(torch.int8).argmax(-1, keepdim=True)
    valid = labels != ignore_index
    nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)

    def label_logprob(values, row_lse):
        value = values.gather(1, position).squeeze(1) - row_lse
        return torch.where(valid, torch.where(inside, value, nan), 0.0)

    logp = label_logprob(x, lse)
    p = torch.where(live, log_p.exp(), 0.0)
    entropy = torch.where(valid, torch.where(inside, -(p * log_p).sum(-1), nan), 0.0) if need_entropy else None
    ref_logp = full = None
    if ref_z is not None:
        ref_x, ref_lse, ref_log_p, ref_live = _log_softmax_over(ref_z.detach(), kept, temperature)
        ref_logp = label_logprob(ref_x, ref_lse)
        if need_full:
            # +inf where the reference bans (-inf) a kept token the policy can sample, as the kernels do
            banned = (live & ~ref_live & kept.counts).any(-1)
            terms = torch.where(live, p * (log_p - ref_log_p), 0.0).sum(-1)
            full = torch.where(valid, torch.where(inside, torch.where(banned, float("inf"), terms), nan), 0.0)
    return logp, ref_logp, entropy, full


def override(stats, kept: KeptSet, values):
    """The RowStats of the fused pass with the kept rows' values in place of the whole vocabulary's."""
    fields = dict(logp=values[0], ref_logp=values[1], entropy=values[2], full_kl=values[3])
    replaced = {}
    for name, value in fields.items():
        current = getattr(stats, name)
        if current is not None and value is not None:
            replaced[name] = torch.where(kept.rows, value.detach().to(current.dtype), current)
    return stats._replace(**replaced)


def kept_gradient(z, ref_z, kept: KeptSet, labels, ignore_index, temperature, grads):
    """[N, K] gradient of the kept rows' outputs at their kept columns (0 elsewhere), from the upstream
    gradients of logp, entropy and the exact KL (RowGrads), through the small [N, K] graph; written into
    the logits' gradient by put(). Rows that take none (no set, an ignored label) enter the graph as
    zeros, so their NaN logits make no NaN."""
    takes = kept.rows & (labels != ignore_index)
    with torch.enable_grad():
        leaf = torch.where(takes[:, None], z.detach(), 0).requires_grad_(True)
        outputs = row_stats(leaf, ref_z, kept, labels, ignore_index, temperature, grads.entropy is not None,
                            grads.full_kl is not None)
        pairs = [(out, torch.where(takes, g.to(out.dtype), 0.0))
                 for out, g in zip((outputs[0], outputs[2], outputs[3]), grads) if g is not None]
        grad = torch.autograd.grad([o for o, _ in pairs], [leaf], [g for _, g in pairs], allow_unused=True)[0]
    if grad is None:
        grad = torch.zeros_like(leaf)
    return torch.where(kept.counts & takes[:, None], grad, 0.0)


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
