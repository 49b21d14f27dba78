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
the gather, the put, the engines' kept sets (kept_ids_from_sampler) and their mask formats.
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


# Rows of logits the sampler replay holds at once (its sort and masks are O(block x V), never O(N x V)).
SAMPLER_BLOCK_ELEMENTS = 1 << 22
ENGINES = ("vllm", "sglang")
SGLANG_TOP_K_ALL = 1 << 30  # sglang.srt.sampling.sampling_params.TOP_K_ALL: its top_k "off"


def kept_ids_from_sampler(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, engine="vllm",
                          width=None):
    """The kept set the engine's sampler leaves at each position, bit for bit, as `kept_ids` [..., K].

    For engines asked for no sampling mask. `engine` is "vllm" (0.33.0, the Model Runner V2 sampler's
    steps with its PyTorch top-k/top-p path) or "sglang" (0.5.23, its PyTorch sampler); docs/contract.md
    section 13 says what each does and which of the engines' paths the tests run. Parameters are numbers
    or tensors broadcast to the logits' leading shape (an engine batch mixes requests); None is the
    engine's "off". The batch's rows share the engine's batch-level switches (vLLM copies the logits to
    float32 and runs top-p only if some row asks for it), so pass the rows the engine sampled together.
    Values the engine rejects raise ValueError naming them. Ids come in the engine's mask order (vLLM
    ascending, SGLang most probable first), -1 after a row's set; a row that keeps the whole vocabulary
    is all -1. K is the widest row (a host sync), or `width` (a wider row is a ValueError)."""
    check.floating(logits, "logits")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    vocab, shape = logits.shape[-1], logits.shape[:-1]
    rows = logits.reshape(-1, vocab)
    params = dict(temperature=_row_values(temperature, "temperature", shape, rows.device, integer=False),
                  top_k=_row_values(-1 if top_k is None else top_k, "top_k", shape, rows.device, integer=True),
                  top_p=_row_values(1.0 if top_p is None else top_p, "top_p", shape, rows.device, integer=False),
                  min_p=_row_values(0.0 if min_p is None else min_p, "min_p", shape, rows.device, integer=False))
    keep_rows = _vllm_kept if engine == "vllm" else _sglang_kept
    block = max(1, SAMPLER_BLOCK_ELEMENTS // max(vocab, 1))
    ids, counts = [], []
    for keep in keep_rows(rows, block, **params):
        count = keep.ids.sum(-1)
        # row-major: each row's ids ascending, or in the engine's order
        token = keep.ids.nonzero(as_tuple=True)[1] if keep.order is None else keep.order[keep.ids]
        whole = count == vocab  # the whole vocabulary: no set
        ids.append(token[~torch.repeat_interleave(whole, count)])
        counts.append(torch.where(whole, 0, count))
    flat = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64, device=rows.device)
    counts = torch.cat(counts) if counts else torch.empty(0, dtype=torch.int64, device=rows.device)
    kept = kept_ids_from_csr(flat, counts=counts, width=width)
    return kept.reshape(*shape, kept.shape[-1])


class _Keep(NamedTuple):
    ids: torch.Tensor  # [b, V] bool: kept (of the vocabulary, or of `order`'s columns)
    order: torch.Tensor | None  # [b, V] int64 token ids in the engine's mask order, or None: ascending ids


def _row_values(value, name, shape, device, integer: bool) -> torch.Tensor:
    """A sampling parameter as one value per row ([rows] int64 or float64, exact for the engines' float32
    and int32 values): a number, or a tensor broadcast to the logits' leading shape."""
    if isinstance(value, torch.Tensor):
        if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        try:
            value = value.to(device).expand(shape)
        except RuntimeError:
            raise ValueError(f"{name} must be a number or a tensor broadcastable to the logits' leading shape "
                             f"{tuple(shape)}, got shape {tuple(value.shape)}") from None
        return value.reshape(-1).to(torch.int64 if integer else torch.float64)
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return torch.full((shape.numel(),), value, dtype=torch.int64 if integer else torch.float64, device=device)


def _reject(bad, values, name, rule):
    if bool(bad.any()):
        raise ValueError(f"{name} must be {rule}, got {values[bad][0].item()!r}")


def _vllm_kept(rows, block, temperature, top_k, top_p, min_p):
    """vLLM 0.33.0: SamplingParams (validation; 0 < T < 0.01 raised to 0.01; T < 1e-5 greedy with top-k,
    top-p and min-p off), SamplingStates.add_request (top_k <= 0 or > V off), then Sampler.sample: unless
    no row needs processing, a float32 copy of the logits, the temperature (rows at T 0 or 1 skipped), min_p
    in logit space (logit < row max + log(min_p) dropped), then apply_top_k_top_p's PyTorch path (ascending
    sort; top-k drops values below the k-th largest, so ties at it stay; top-p drops the ascending prefix
    whose float32 cumulative probability is <= 1 - p, never the last). The kept set is the finite logits."""
    _reject(~torch.isfinite(temperature) | (temperature < 0) | (temperature > 2), temperature, "temperature",
            "a finite number in [0, 2] (vLLM)")
    _reject(~((top_p > 0) & (top_p <= 1)), top_p, "top_p", "in (0, 1]")
    _reject(top_k < -1, top_k, "top_k", "0 or -1 (off), or at least 1")
    _reject(~((min_p >= 0) & (min_p <= 1)), min_p, "min_p", "in [0, 1]")
    vocab = rows.shape[-1]
    temperature = torch.where((temperature > 0) & (temperature < 1e-2), 1e-2, temperature)
    greedy = temperature < 1e-5
    top_p, min_p = torch.where(greedy, 1.0, top_p), torch.where(greedy, 0.0, min_p)
    top_k = torch.where(greedy | (top_k <= 0) | (top_k > vocab), vocab, top_k)
    needs = ~greedy & ((temperature != 1) | (min_p != 0) | (top_k != vocab) | (top_p != 1))
    # the engine's per-request state is float32 / int32; its batch-level switches read that state
    temperature, top_p, min_p = temperature.float(), top_p.float(), min_p.float()
    process = bool(needs.any())
    scale = not bool(((temperature == 0) | (temperature == 1)).all())
    truncate_min_p = bool((min_p != 0).any())
    do_top_k, do_top_p = bool((top_k != vocab).any()), bool((top_p != 1).any())
    # the engine's threshold is max + log(min_p) in float32; the log here is rounded once from float64
    log_min_p = min_p.double().log().float()
    for r0 in range(0, rows.shape[0], block):
        x, r1 = rows[r0:r0 + block], min(r0 + block, rows.shape[0])
        if process:
            x = x.float().clone()
            if scale:
                t = temperature[r0:r1]
                x = x / torch.where((t == 0) | (t == 1), 1.0, t)[:, None]  # x / 1 is x: the skipped rows
            if truncate_min_p:
                threshold = x.amax(-1) + log_min_p[r0:r1]
                x = x.masked_fill(x < threshold[:, None], float("-inf"))
            if do_top_k or do_top_p:
                x = _vllm_top_k_top_p(x, top_k[r0:r1] if do_top_k else None, top_p[r0:r1] if do_top_p else None)
        yield _Keep(torch.isfinite(x), None)


def _vllm_top_k_top_p(x, k, p):
    """vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p_pytorch, step for step, on a copy."""
    x_sort, order = x.sort(dim=-1, descending=False)
    if k is not None:
        kth = x_sort.gather(1, (x_sort.shape[1] - k).unsqueeze(1))
        x_sort.masked_fill_(x_sort < kth, float("-inf"))
    if p is not None:
        cumulative = torch.cumsum(x_sort.softmax(dim=-1), dim=-1)
        drop = cumulative <= 1 - p.unsqueeze(1)
        drop[:, -1] = False  # at least one
        x_sort.masked_fill_(drop, float("-inf"))
    return x.scatter(-1, order, x_sort)


def _sglang_kept(rows, block, temperature, top_k, top_p, min_p):
    """SGLang 0.5.23: SamplingParams (0 <= T < 1e-6 greedy: T 1, top_k 1; top_k -1 off) and verify, then
    Sampler.forward with the pytorch backend: all rows greedy, the argmax alone; else the logits divided by
    T in their dtype, softmax, and (if some row truncates) top_k_top_p_min_p_sampling_from_probs_torch:
    descending sort, ranks >= top_k zeroed, then tokens whose preceding cumulative probability (before
    that zeroing) exceeds top_p, then (if some row has min_p) those below min_p times the largest. The
    kept set is the positive probabilities, most probable first."""
    _reject(~torch.isfinite(temperature) | (temperature < 0), temperature, "temperature",
            "a non-negative finite number (SGLang)")
    _reject(~((top_p > 0) & (top_p <= 1)), top_p, "top_p", "in (0, 1]")
    _reject(~((min_p >= 0) & (min_p <= 1)), min_p, "min_p", "in [0, 1]")
    _reject((top_k < 1) & (top_k != -1), top_k, "top_k", "-1 (off) or at least 1 (SGLang)")
    greedy = temperature < 1e-6
    temperature = torch.where(greedy, 1.0, temperature).float()
    top_k = torch.where(greedy, 1, torch.where(top_k == -1, SGLANG_TOP_K_ALL, top_k))
    need_top_p, need_top_k, need_min_p = bool((top_p != 1).any()), bool((top_k != SGLANG_TOP_K_ALL).any()), \
        bool((min_p > 0).any())
    all_greedy = bool((top_k <= 1).all())
    top_k, top_p, min_p = top_k.to(torch.int32), top_p.float(), min_p.float()
    for r0 in range(0, rows.shape[0], block):
        x, r1 = rows[r0:r0 + block], min(r0 + block, rows.shape[0])
        if all_greedy:
            yield _Keep(torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device), torch.argmax(x, -1)[:, None])
            continue
        x = x.clone()
        x.div_(temperature[r0:r1, None])
        probs = torch.softmax(x, dim=-1)
        if not (need_top_p or need_top_k or need_min_p):
            probs, order = probs.sort(dim=-1, descending=True)
            yield _Keep(probs > 0, order)
            continue
        probs_sort, order = probs.sort(dim=-1, descending=True)
        probs_sum = torch.cumsum(probs_sort, dim=-1)
        probs_sort[torch.arange(probs_sort.shape[-1], device=x.device).view(1, -1) >= top_k[r0:r1].view(-1, 1)] = 0.0
        probs_sort[(probs_sum - probs_sort) > top_p[r0:r1].view(-1, 1)] = 0.0
        if need_min_p:
            probs_sort[probs_sort < (probs_sort[:, 0] * min_p[r0:r1]).view(-1, 1)] = 0.0
        yield _Keep(probs_sort > 0, order)


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
