"""Label log-probs and entropy straight from hidden states (docs/contract.md section 9): logits are made one tile
of tokens at a time, consumed by a backend's fused row pass, and dropped; never [N, V].

Forward, per tile of rows: z = hidden_tile @ weight^T (+ bias) in the input dtype (a BLAS matmul
with float accumulation, as F.linear), the model's logit transform g (logit_scale, then Gemma's
softcap c * tanh(z / c)), then the backend's fused_kl_fwd on the tile. Backward, per chunk of
vocabulary rows and tile of tokens: the same z recomputed, the backend's fused_kl_bwd written over it
in place (dlogits), g's derivative, then grad_hidden_tile += dlogits @ weight_chunk and
grad_weight_chunk += dlogits^T @ hidden_tile in float32. Tiles and chunks come from the shapes and
memory budgets only, in a fixed order: results are bitwise reproducible.

linear_kl_penalty adds the reference model's tiles (frozen) and finishes with kl_penalty's O(N)
epilogue (api._penalty_outputs): same estimators, masks, sums and outputs. integrations.trl and
integrations.verl serve the trainers' hidden-state heads (TRL's ChunkedLogProbFunction, verl's
linear_cross_entropy) with linear_token_logprobs.
"""
from __future__ import annotations

import numbers

import torch

from . import sharding
from . import validation as check
from .api import _agree_shard, _device, _penalty_outputs, _plan_penalty, _temperature, first_order_only
from .contract import PassArgs, RowGrads, RowStats, compute_dtype
from .dispatch import select_backend
from .sharding import merge

# What the logits tiles may hold at a time (the caller's tile_bytes; TRL's own head holds a
# 4096 x 32768 fp32 buffer, 512 MiB).
TILE_BYTES = 512 << 20
# Tiles of this many rows keep the projection's matmul efficient: 131-row tiles (V = 32000, H = 1024,
# fp32, 2 cores) ran it 1.5x slower than one matmul over all rows, 512-row tiles within 4%. A tile
# has at most max(512, N / 8) rows: well below the whole logits tensor even when the budget is not
# (N = 4096, V = 32000: 2097 rows fit 512 MiB, which would have held half the logits).
EFFICIENT_TILE_ROWS = 512
# The backward's vocabulary chunks: this many bytes of float32 weight-gradient rows (2048 rows at
# H = 4096), summed over the token tiles before they are written in the weight's dtype.
PARTIAL_BYTES = 32 << 20


def _rows_per_tile(n_tokens: int, vocab: int, element_bytes: int, tile_bytes: int, has_ref: bool) -> int:
    # the tile, whose gradient is written over it in place, a float32 copy under a logit transform
    # (counted for every tile: element size at least 4), and the reference's tile
    buffers = 2 if has_ref else 1
    by_budget = tile_bytes // max(1, buffers * vocab * max(element_bytes, 4))
    return max(1, min(by_budget, max(EFFICIENT_TILE_ROWS, -(-n_tokens // 8))))


def _logits_tile(hidden_tile, weight, bias, logit_scale, softcap, buffer):
    """g(hidden_tile @ weight^T + bias) and, with a softcap, tanh of the scaled logits (its derivative
    is 1 - tanh^2). The identity transform keeps the input dtype (no float32 copy of the tile).
    buffer: a [rows, V] tensor of the matmul's dtype reused from tile to tile (first rows used). Reuse
    matters on a CPU: a tile above glibc's 32 MiB mmap ceiling (fp32, V = 32000, 512 rows: 65 MB) is
    mapped fresh each time, and its first-touch page faults made 8 such matmuls (H = 1024) 5% slower
    (1652 vs 1570 ms)."""
    z = _project(hidden_tile, weight, bias, buffer)
    if softcap is None and logit_scale == 1.0:
        return z, None
    z = z.float()
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is None:
        return z, None
    tanh = torch.tanh(z.div_(softcap))
    return tanh * softcap, tanh


def _project(hidden_tile, weight, bias, buffer):
    """F.linear(hidden_tile, weight, bias) for a 2-D tile, into buffer's first rows: the same op F.linear
    runs (addmm with a bias, mm without), so the same bits."""
    out = buffer[:hidden_tile.shape[0]]
    if bias is None:
        return torch.mm(hidden_tile, weight.t(), out=out)
    return torch.addmm(bias, hidden_tile, weight.t(), out=out)


def _tile_buffer(rows, vocab, like):
    """A reusable [rows, vocab] tile in like's dtype and device."""
    return torch.empty((rows, vocab), dtype=like.dtype, device=like.device)


def _columns(buffer, columns):
    """A contiguous [rows, columns] tensor on the start of buffer (columns <= buffer's): the tile of a
    narrower vocabulary chunk."""
    return buffer.view(-1)[:buffer.shape[0] * columns].view(buffer.shape[0], columns)


class LinearKLFunction(torch.autograd.Function):
    """The fused pass over logits made tile by tile from hidden states: the backend's fused_kl_fwd /
    fused_kl_bwd (contract.FusedPass) on each [rows, V] tile of the policy (and, when given,
    of the frozen reference model: ref_hidden, ref_weight, ref_bias, no gradient). Same four outputs
    as api.FusedKLFunction: logp, ref_logp (None without a reference), entropy, full_kl."""

    @staticmethod
    def forward(ctx, impl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, args, logit_scale, softcap,
                need_entropy, need_full, rows):
        """args: the PassArgs of all rows without logits (labels, temperature, ignore_index, shard)."""
        n_tokens, has_ref = hidden.shape[0], ref_hidden is not None
        dtype = compute_dtype(hidden.dtype)
        new = lambda needed: hidden.new_empty((n_tokens if needed else 0,), dtype=dtype)  # noqa: E731
        logp, ref_logp, entropy, full_kl, lse, ref_lse = (
            new(True), new(has_ref), new(need_entropy), new(need_full), new(True), new(has_ref))
        tile_rows = min(rows, n_tokens)
        buffer = _tile_buffer(tile_rows, weight.shape[0], hidden)
        ref_buffer = _tile_buffer(tile_rows, weight.shape[0], ref_hidden) if has_ref else None
        for n0 in range(0, n_tokens, rows):
            n1 = min(n0 + rows, n_tokens)
            z, _ = _logits_tile(hidden[n0:n1], weight, bias, logit_scale, softcap, buffer)
            ref_z = _logits_tile(ref_hidden[n0:n1], ref_weight, ref_bias, logit_scale, softcap, ref_buffer)[0] \
                if has_ref else None
            tile = impl.fused_kl_fwd(_tile_args(args, z, ref_z, n0, n1), need_entropy, need_full)
            for out, value in zip((logp, ref_logp, entropy, full_kl, lse, ref_lse), tile):
                if value is not None and out.numel():
                    out[n0:n1] = value
            del z, ref_z  # the budget holds one tile of each at a time
        if args.shard.group is not None:  # weight holds this rank's vocabulary shard: merge the ranks' statistics
            stats = merge(args, RowStats(logp, ref_logp if has_ref else None, entropy if need_entropy else None,
                                   full_kl if need_full else None, lse, ref_lse if has_ref else None))
            logp, ref_logp, entropy, full_kl, lse, ref_lse = (new(False) if t is None else t for t in stats)
        ctx.set_materialize_grads(False)
        ctx.impl, ctx.logit_scale, ctx.softcap, ctx.rows = impl, logit_scale, softcap, rows
        tensor_temperature = args.temperature if isinstance(args.temperature, torch.Tensor) else None
        ctx.args = args._replace(labels=None, temperature=None if tensor_temperature is not None else args.temperature)
        # the reference model is saved only for `full`, whose gradient reads its logits
        ctx.save_for_backward(hidden, weight, bias, *((ref_hidden, ref_weight, ref_bias) if need_full else (None,) * 3),
                              args.labels, lse, ref_lse if need_full else None, entropy, full_kl, tensor_temperature)
        if has_ref:
            ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp if has_ref else None, entropy if need_entropy else None, full_kl if need_full else None

    @staticmethod
    def backward(ctx, grad_logp, grad_ref_logp, grad_entropy, grad_full):
        first_order_only()
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, entropy, full_kl,
         tensor_temperature) = ctx.saved_tensors
        args = ctx.args._replace(labels=labels, temperature=tensor_temperature if tensor_temperature is not None
                                 else ctx.args.temperature)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[1:4]
        if grad_logp is None and grad_entropy is None and grad_full is None:
            return (None,) * 13
        n_tokens, (vocab, hidden_size) = hidden.shape[0], weight.shape
        # Vocabulary chunks outer, token tiles inner, when the weight needs a gradient: each chunk's
        # weight gradient is summed over the tiles in a chunk-sized float32 buffer and written once in
        # the weight's dtype, so no [V, H] float32 sum is ever held (524 MB at V = 32000, H = 4096).
        # A chunk is a slice of the vocabulary to the row kernels (a VocabShard at its offset): p comes
        # from the saved whole-vocabulary lse, the label term only in the chunk that holds the label.
        # Without a weight gradient: one chunk, the whole vocabulary.
        chunk = min(vocab, max(1, PARTIAL_BYTES // (4 * hidden_size))) if need_weight else vocab
        single = chunk == vocab
        wide = compute_dtype(weight.dtype)  # the sums' dtype: float32, float64 for float64
        summed_in_place = weight.dtype == wide
        # the hidden gradient: written tile by tile (one chunk), else summed over chunks
        grad_hidden = None
        if need_hidden:
            grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if single else
                           torch.zeros(hidden.shape, dtype=wide, device=hidden.device))
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else None
        # a float32 (float64) weight's gradient is its own sum; a lower dtype's chunk sums in this buffer
        chunk_sum = torch.empty((chunk, hidden_size), dtype=wide, device=weight.device) \
            if need_weight and not summed_in_place else None
        grad_bias = torch.zeros(bias.shape, dtype=wide, device=bias.device) if need_bias else None
        use_ref = grad_full is not None and ref_hidden is not None
        # rows nothing flows back from (masked, ignored) have dlogits 0, but 0 * NaN is NaN in the
        # weight gradient's matmul: their hidden rows are replaced by 0 there (select, not multiply)
        live = labels != args.ignore_index
        flows = [g != 0 for g in (grad_logp, grad_entropy, grad_full) if g is not None]
        live = live & torch.stack(flows).any(0)
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        tile_rows = min(ctx.rows, n_tokens)
        buffer = _tile_buffer(tile_rows, chunk, hidden)
        ref_buffer = _tile_buffer(tile_rows, chunk, ref_hidden) if use_ref else None
        for v0 in range(0, vocab, chunk):  # fixed orders, chunks then tiles: deterministic
            v1 = min(v0 + chunk, vocab)
            w, b = weight[v0:v1], None if bias is None else bias[v0:v1]
            ref_w, ref_b = (ref_weight[v0:v1], None if ref_bias is None else ref_bias[v0:v1]) if use_ref else (None, None)
            chunk_args = args._replace(shard=args.shard._replace(start=args.shard.start + v0))
            if need_weight:
                weight_sum = grad_weight[v0:v1] if summed_in_place else chunk_sum[:v1 - v0]
                weight_sum.zero_()
            for n0 in range(0, n_tokens, ctx.rows):
                n1 = min(n0 + ctx.rows, n_tokens)
                hidden_tile = hidden[n0:n1]
                z, tanh = _logits_tile(hidden_tile, w, b, ctx.logit_scale, ctx.softcap, _columns(buffer, v1 - v0))
                ref_z = _logits_tile(ref_hidden[n0:n1], ref_w, ref_b, ctx.logit_scale, ctx.softcap,
                                     _columns(ref_buffer, v1 - v0))[0] if use_ref else None
                stats = RowStats(None, None, entropy[n0:n1] if entropy.numel() else None,
                                 full_kl[n0:n1] if full_kl.numel() else None, lse[n0:n1],
                                 ref_lse[n0:n1] if use_ref else None)
                grads = RowGrads(*(_rows(g, n0, n1) for g in (grad_logp, grad_entropy, grad_full)))
                # in place: z now holds dlogits
                dz = ctx.impl.fused_kl_bwd(_tile_args(chunk_args, z, ref_z, n0, n1), stats, grads, True).view(z.shape)
                if tanh is not None:  # selected: a dead row's tanh may be NaN (NaN hidden states under the mask)
                    dz = torch.where(live[n0:n1, None], dz * (1.0 - tanh * tanh), 0.0)
                if ctx.logit_scale != 1.0:
                    dz = dz * ctx.logit_scale
                dz = dz.to(weight.dtype)
                if grad_hidden is not None:
                    if single:
                        grad_hidden[n0:n1] = dz @ w
                    elif summed_in_place:
                        grad_hidden[n0:n1].addmm_(dz, w)
                    else:  # the matmul in the weight's dtype (as F.linear's backward), summed in float32
                        grad_hidden[n0:n1] += dz @ w
                if need_weight:
                    live_hidden = torch.where(live[n0:n1, None], hidden_tile, zero)
                    if summed_in_place:
                        weight_sum.addmm_(dz.t(), live_hidden)
                    else:
                        weight_sum += dz.t() @ live_hidden
                if grad_bias is not None:
                    grad_bias[v0:v1] += dz.to(wide).sum(0)
                del z, tanh, ref_z, dz  # before the next tile is made
            if need_weight and not summed_in_place:
                grad_weight[v0:v1] = weight_sum
        return (None, _cast(grad_hidden, hidden), grad_weight, _cast(grad_bias, bias)) + (None,) * 9


def _tile_args(args, z, ref_z, n0, n1):
    """The PassArgs of one tile of rows [n0, n1): its logits as [1, rows, V]."""
    return args._replace(logits=z.unsqueeze(0), labels=args.labels[n0:n1],
                         ref_logits=None if ref_z is None else ref_z.unsqueeze(0),
                         temperature=_rows(args.temperature, n0, n1))


def _rows(value, n0, n1):
    return value[n0:n1] if isinstance(value, torch.Tensor) and value.dim() else value


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


def _check_linear(hidden, weight, bias, labels, arg_prefix=""):
    check.floating(hidden, f"{arg_prefix}hidden")
    check.floating(weight, f"{arg_prefix}weight")
    if weight.dim() != 2:
        raise ValueError(f"{arg_prefix}weight must be [V, H] (lm_head.weight), got shape {tuple(weight.shape)}")
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{arg_prefix}hidden must be [..., H] with H = {arg_prefix}weight.shape[1] = "
                         f"{weight.shape[1]}, got shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{arg_prefix}weight must have a non-empty vocabulary dim, got shape {tuple(weight.shape)}")
    if bias is not None:
        check.floating(bias, f"{arg_prefix}bias")
        check.shape(bias, (weight.shape[0],), f"{arg_prefix}bias", f"[V] = [{weight.shape[0]}]")
    check.shape(labels, hidden.shape[:-1], "labels", f"{arg_prefix}hidden's shape without the hidden dim")
    check.same_device(labels.device, **{f"{arg_prefix}hidden": hidden, f"{arg_prefix}weight": weight,
                                        f"{arg_prefix}bias": bias})
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"{arg_prefix}weight and {arg_prefix}bias must have {arg_prefix}hidden's dtype {hidden.dtype} "
                        f"(as F.linear), got {weight.dtype}{'' if bias is None else ' / ' + str(bias.dtype)}")


def _check_transform(logit_scale, softcap):
    for arg, value in (("logit_scale", logit_scale), ("softcap", softcap)):
        if value is None and arg == "softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (abs(float(value)) < float("inf")):
            raise ValueError(f"{arg} must be a finite float, got {value!r}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    return float(logit_scale), None if softcap is None else float(softcap)


def _check_common(labels, logit_scale, softcap, tile_bytes):
    check.integer(labels, "labels")
    if isinstance(tile_bytes, bool) or not isinstance(tile_bytes, numbers.Integral) or tile_bytes <= 0:
        raise ValueError(f"tile_bytes must be a positive int, got {tile_bytes!r}")
    return _check_transform(logit_scale, softcap)


def _tile_dtype(dtype, logit_scale, softcap):
    # the logits tile keeps the matmul's dtype under the identity transform, else it is float32
    return dtype if softcap is None and logit_scale == 1.0 else torch.float32


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                          ignore_index=-100, return_entropy=False, validate=True, process_group=None, backend=None,
                          tile_bytes=TILE_BYTES):
    """token_logprobs of z = g(hidden @ weight^T + bias) without materialising z (docs/contract.md section 9).

    hidden [..., H] (leading dims as labels), weight [V, H], bias [V]; returns float32 [...] log-probs
    (and entropy with return_entropy). Gradients reach hidden, weight and bias in their dtypes.
    tile_bytes bounds the logits tiles (about rows x V x 4 bytes each, one more with a reference)."""
    with sharding.checks(process_group, _device(hidden), validate):
        logit_scale, softcap = _check_common(labels, logit_scale, softcap, tile_bytes)
        _check_linear(hidden, weight, bias, labels)
        validate = validate and check.has_values(hidden)
        ignore_index = check.ignore_index(ignore_index)
        vocab = weight.shape[0]
        temp = _temperature(temperature, labels.shape, hidden.device, compute_dtype(hidden.dtype), validate)
        chosen = select_backend(backend, hidden.device, (_tile_dtype(hidden.dtype, logit_scale, softcap),))
    shard = sharding.vocab_shard(process_group, hidden.device, vocab, validate, "linear_token_logprobs", labels,
                                 return_entropy=bool(return_entropy), ignore_index=ignore_index, temperature=temperature)
    rows = _rows_per_tile(labels.numel(), vocab, hidden.element_size(), tile_bytes, has_ref=False)
    args = PassArgs(None, labels.reshape(-1).to(torch.int64).contiguous(), None, temp, ignore_index, shard)
    logp, _, entropy, _ = LinearKLFunction.apply(
        chosen.impl, hidden.reshape(-1, hidden.shape[-1]), weight, bias, None, None, None, args, logit_scale, softcap,
        bool(return_entropy), False, rows)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def linear_kl_penalty(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                      ref_logprobs=None, mask=None, cu_seqlens=None, kl_coef=0.1, estimator="k1", temperature=1.0,
                      logit_scale=1.0, softcap=None, log_ratio_clamp=None, kl_clamp=None, ignore_index=-100,
                      return_entropy=False, validate=True, process_group=None, backend=None, tile_bytes=TILE_BYTES):
    """kl_penalty of z = g(hidden @ weight^T + bias) against z' = g(ref_hidden @ ref_weight^T + ref_bias)
    (or given ref_logprobs), never materialising either (docs/contract.md section 9). Same KLPenaltyOutput.

    hidden [B, T, H] (padded) or [N, H] (packed, with cu_seqlens); ref_hidden has hidden's leading
    dims and its own hidden size; the reference model is frozen (no gradient reaches it)."""
    with sharding.checks(process_group, _device(hidden), validate):
        logit_scale, softcap = _check_common(labels, logit_scale, softcap, tile_bytes)
        _check_linear(hidden, weight, bias, labels)
        if ref_hidden is not None or ref_weight is not None or ref_bias is not None:
            if ref_hidden is None or ref_weight is None:
                raise ValueError("ref_hidden and ref_weight come together (the reference model's hidden states and "
                                 f"lm_head.weight), got only {'ref_hidden' if ref_weight is None else 'ref_weight'}"
                                 + (" and ref_bias" if ref_bias is not None else ""))
            check.tensor(ref_weight, "ref_weight")
            if ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0]:
                raise ValueError(f"ref_weight must be [V, H_ref] with weight's vocabulary size V = {weight.shape[0]}, "
                                 f"got shape {tuple(ref_weight.shape)}")
            _check_linear(ref_hidden, ref_weight, ref_bias, labels, "ref_")
        validate = validate and check.has_values(hidden)
        plan = _plan_penalty(
            labels, hidden.device, compute_dtype(hidden.dtype), source=("hidden", hidden.shape), ref_logprobs=ref_logprobs,
            mask=mask, cu_seqlens=cu_seqlens, kl_coef=kl_coef, estimator=estimator, temperature=temperature,
            log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp, ignore_index=ignore_index, validate=validate,
            has_ref_model=ref_hidden is not None)
        dtypes = [_tile_dtype(hidden.dtype, logit_scale, softcap)]
        if ref_hidden is not None:
            dtypes.append(_tile_dtype(ref_hidden.dtype, logit_scale, softcap))
        chosen = select_backend(backend, hidden.device, tuple(dtypes))
    shard = _agree_shard(process_group, hidden.device, weight.shape[0], "linear_kl_penalty", labels, plan, validate,
                         ref_hidden is not None, return_entropy, temperature)
    element_bytes = max(hidden.element_size(), 0 if ref_hidden is None else ref_hidden.element_size())
    rows = _rows_per_tile(labels.numel(), weight.shape[0], element_bytes, tile_bytes, has_ref=ref_hidden is not None)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    detached = lambda t: None if t is None else t.detach()  # noqa: E731
    logp, ref_logp, entropy, full_kl = LinearKLFunction.apply(
        chosen.impl, flat(hidden), weight, bias, flat(detached(ref_hidden)), detached(ref_weight), detached(ref_bias),
        PassArgs(None, flat_labels, None, plan.temperature, plan.ignore_index, shard), logit_scale, softcap,
        bool(return_entropy), plan.estimator.name == "full", rows)
    return _penalty_outputs(plan, labels, flat_labels, logp, ref_logp, entropy if return_entropy else None, full_kl,
                            ref_logprobs, mask, kl_coef)
