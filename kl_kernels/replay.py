"""Sampling replay (docs/contract.md section 12): the row's softmax taken over the sampler's kept set S.

An engine that samples with top-k / top-p / min-p normalises its log-probs over the tokens that
survived truncation (vLLM's `processed_logprobs`, and the kept set it returns per token); a trainer
that recomputes them over the whole vocabulary puts log(kept mass) into every importance ratio.
Given each position's kept ids, the label log-prob, the entropy, the reference's log-prob and the
exact KL are taken over S instead: logp = z_y/T - log sum_{v in S} e^{z_v/T}.

The fused kernels see the rows that have a kept set as ignored rows (kernel_labels), so they read
none of their logits; those rows take their numbers from a second call of the same kernels over the K
logits of S, gathered (O(N K) reads, never a pass over [N, V], never an [N, V] mask), and their
gradient, nonzero on S only, is written at the K columns (put): rows.py. Rows without a set (all -1)
are the fused pass's, bit for bit. This module holds the kept-set plumbing only: the set as columns,
the gather, the put, and kept_ids_from_sampler.
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
    inside: torch.Tensor  # [N] bool: the label is in its row's set (or the row has none, or is ignored); a
    # label outside it is made a bad label where the kernels' labels are made (sharding.vocab_shard)


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
    The ids another rank holds count there: the merge adds the ranks' parts (sharding.py). An id out of
    range does not count; validate=True raises for it, and for a label outside its set (check_values)."""
    n_rows, width = labels.numel(), kept_ids.shape[-1]
    ids = kept_ids.reshape(n_rows, width).to(torch.int64)
    present = (ids >= 0) & (ids < vocab)
    rows = present.any(-1)
    flat = labels.reshape(-1).to(torch.int64)
    inside = ~rows | (flat == ignore_index) | ((ids == flat[:, None]) & present).any(-1)
    columns = int(vocab) if columns is None else columns
    local = ids - offset
    local = torch.where(present & (local >= 0) & (local < columns), local, -1)
    counts = _first_occurrences(local, columns)
    kept = KeptSet(torch.where(counts, local, 0), counts, rows, inside)
    if validate:
        check_values(kept_ids, kept, vocab)
    return kept


def check_values(kept_ids, kept: KeptSet, vocab) -> None:
    """ValueError naming kept_ids for an id outside [0, vocab) (other than -1) or a label outside its row's
    set (a host sync: validate=True only)."""
    ids = kept_ids.reshape(kept.rows.numel(), -1).to(torch.int64)
    if not ids.numel():
        return
    bad = (ids < -1) | (ids >= vocab)
    if bool(bad.any()):
        raise ValueError(f"kept_ids must be token ids in [0, {int(vocab)}) or -1 (padding), found "
                         f"{int(ids[bad][0])} (row {int(bad.any(-1).nonzero()[0])})")
    if not bool(kept.inside.all()):
        raise ValueError("kept_ids: every label must be in its row's kept set (a sampled token survived its "
                         "sampler's truncation); a row without a kept set is all -1")


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
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("kl_kernels::kept_counts", "CPU")
    except RuntimeError:  # no such op: installed without the C++ extension
        return False


def gather(logits: torch.Tensor, kept: KeptSet) -> torch.Tensor:
    """[N, K] logits of the kept columns, read from [B, T, V] in place (any row strides)."""
    B, T, _ = logits.shape
    return logits.gather(2, kept.columns.view(B, T, -1)).reshape(B * T, -1)


def kernel_labels(labels, kept: KeptSet, ignore_index: int):
    """The labels the kernels read: the kept rows ignored, so the forward reads none of their logits (their
    numbers come from the call over their kept columns, rows.py) and the backward writes them as exact zeros
    (that call's gradient is put after)."""
    return torch.where(kept.rows, ignore_index, labels)


def rows_of(kept: KeptSet, n0: int, n1: int) -> KeptSet:
    """Rows [n0, n1) of a kept set (a tile of the hidden-state head)."""
    return KeptSet(*(field[n0:n1] for field in kept))


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


def kept_ids_from_csr(ids, offsets=None, *, counts=None, width=None):
    """kept_ids [rows, K] (-1 padding, each row's ids in their given order) from a CSR layout: the flat
    ids of all rows and either `offsets` [rows + 1] (row r is ids[offsets[r]:offsets[r+1]]; vLLM's
    SamplingMaskLists(flat, offsets)) or `counts` [rows]. K is the widest row (a host sync), or
    `width` when given (a wider row is a ValueError). O(total ids): no [rows, V] step. A row of no ids
    (a prompt position) is all -1: its whole vocabulary."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"ids must be a 1-D integer tensor (the flat kept ids), got {ids.dtype} {tuple(ids.shape)}")
    if (offsets is None) == (counts is None):
        raise ValueError("give exactly one of offsets ([rows + 1]) or counts ([rows])")
    if offsets is not None:
        offsets = torch.as_tensor(offsets, device=ids.device).to(torch.int64)
        if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel() \
                or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"offsets must be [rows + 1], non-decreasing from 0 to len(ids) = {ids.numel()}, "
                             f"got {offsets.tolist() if offsets.numel() <= 8 else tuple(offsets.shape)}")
        counts = offsets[1:] - offsets[:-1]
    else:
        counts = torch.as_tensor(counts, device=ids.device).to(torch.int64)
        if counts.dim() != 1 or bool((counts < 0).any()) or int(counts.sum()) != ids.numel():
            raise ValueError(f"counts must be [rows], >= 0, summing to len(ids) = {ids.numel()}")
    widest = int(counts.max()) if counts.numel() else 0
    if width is not None and widest > width:
        raise ValueError(f"width {width} is narrower than the widest row ({widest} ids)")
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=ids.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(ids.numel(), device=ids.device) - starts[rows]
    kept = torch.full((counts.numel(), max(widest if width is None else width, 1)), -1, dtype=torch.int64,
                      device=ids.device)
    kept[rows, position] = ids.to(torch.int64)
    return kept


def kept_ids_from_lists(token_ids, *, device=None):
    """kept_ids [rows, K] from one id list per position: vLLM's `CompletionOutput.sampling_mask.token_ids`
    (ascending ids per generated token), or any list of lists (an empty list: all -1, the whole vocabulary).
    O(total ids)."""
    counts = [len(row) for row in token_ids]
    flat = torch.tensor([token for row in token_ids for token in row], dtype=torch.int64)
    return kept_ids_from_csr(flat, counts=torch.tensor(counts, dtype=torch.int64)).to(device)


def kept_ids_from_mask(mask, *, width=None):
    """kept_ids [rows, K] (ascending ids) from a bool [rows, V] mask, True = kept. A row with no True is
    all -1 (its whole vocabulary): a mask that keeps nothing has no sampled token either."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a bool [rows, V] tensor, got {getattr(mask, 'dtype', type(mask))} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    rows, ids = mask.nonzero(as_tuple=True)  # row-major: each row's ids ascending
    return kept_ids_from_csr(ids, counts=torch.bincount(rows, minlength=mask.shape[0]), width=width)


def kept_ids_from_bitmask(packed, vocab_size: int, *, width=None, block_rows: int = 256):
    """kept_ids [rows, K] (ascending ids) from a packed uint8 [rows, ceil(V/8)] bitmask in the bit order vLLM
    writes (SamplingMaskTensors.packed_mask: bit j of byte b is token 8b + j, numpy's bitorder="little").
    Unpacked `block_rows` rows at a time: memory O(block x V), never [rows, V]."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a uint8 [rows, ceil(V / 8)] tensor, got "
                         f"{getattr(packed, 'dtype', type(packed))} {tuple(getattr(packed, 'shape', ()))}")
    if packed.shape[1] != (vocab_size + 7) // 8:
        raise ValueError(f"packed must have ceil(vocab_size / 8) = {(vocab_size + 7) // 8} bytes per row, got "
                         f"{packed.shape[1]}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    rows, ids = [], []
    for r0 in range(0, packed.shape[0], block_rows):
        bits = (packed[r0:r0 + block_rows, :, None] >> shifts) & 1
        row, token = bits.reshape(bits.shape[0], -1)[:, :vocab_size].nonzero(as_tuple=True)
        rows.append(row + r0)
        ids.append(token)
    rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64, device=packed.device)
    ids = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64, device=packed.device)
    return kept_ids_from_csr(ids, counts=torch.bincount(rows, minlength=packed.shape[0]), width=width)


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
