"""Label log-probs and entropy straight from hidden states (docs/contract.md section 9): logits are made one tile
of tokens at a time, consumed by a backend's fused row pass, and dropped; never [N, V].

Forward, per tile of rows: z = hidden_tile @ weight^T (+ bias) in the input dtype (a BLAS matmul
with float accumulation, as F.linear), the model's logit transform g (logit_scale, then Gemma's
softcap c * tanh(z / c)), then the backend's fused_kl_fwd on the tile. Backward, per chunk of
vocabulary rows and tile of tokens: the same z recomputed, the backend's fused_kl_bwd written over it
in place (dlogits), g's derivative, then grad_hidden_tile += dlogits @ weight_chunk and
grad_weight_chunk += dlogits^T @ hidden_tile in float32. Tiles and chunks come from the shapes and
memory budgets only, in a fixed order: results are bitwise reproducible. Each row's log-probs and
gradient row are also batch-invariant (docs/contract.md section 11): every matmul that makes or
consumes a row has a row count the BLAS treats alike for every row (_matmul), and a row that is
not fed (ignored, or a non-finite hidden state) is a zero row there, never its NaN.

linear_kl_penalty adds the reference model's tiles (frozen) and finishes with kl_penalty's O(N)
epilogue (penalty.outputs): same estimators, masks, sums and outputs. integrations.trl and
integrations.verl serve the trainers' hidden-state heads (TRL's ChunkedLogProbFunction, verl's
linear_cross_entropy) with linear_token_logprobs.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import replay, sharding
from . import rows as rows_module
from . import validation as check
from .penalty import outputs as penalty_outputs
from .plan import device_of
from .plan import make as make_plan
from .rows import first_order_only
from .contract import RowGrads, RowStats, compute_dtype
from .projection import GradientSums, Projection, row_quantum, through_transform

# What the logits tiles may hold at a time (the caller's tile_bytes; TRL's own head holds a
# 4096 x 32768 fp32 buffer, 512 MiB).
TILE_BYTES = 512 << 20
# Tiles of this many rows keep the projection's matmul efficient: 131-row tiles (V = 32000, H = 1024,
# fp32, 2 cores) ran it 1.5x slower than one matmul over all rows, 512-row tiles within 4%. A tile
# has at most max(512, N / 8) rows: well below the whole logits tensor even when the budget is not
# (N = 4096, V = 32000: 2097 rows fit 512 MiB, which would have held half the logits).
EFFICIENT_TILE_ROWS = 512


def _rows_per_tile(n_tokens: int, vocab: int, element_bytes: int, tile_bytes: int, has_ref: bool,
                   device: torch.device) -> int:
    # the tile, whose gradient is written over it in place, a float32 copy under a logit transform
    # (counted for every tile: element size at least 4), and the reference's tile; a whole number of
    # matmul quanta (one at least, even past the budget)
    buffers = 2 if has_ref else 1
    by_budget = tile_bytes // max(1, buffers * vocab * max(element_bytes, 4))
    rows = min(by_budget, max(EFFICIENT_TILE_ROWS, -(-n_tokens // 8)))
    quantum = row_quantum(device)
    return max(quantum, rows // quantum * quantum)


class LinearKLFunction(torch.autograd.Function):
    """The fused pass over logits made tile by tile from hidden states: the backend's fused_kl_fwd /
    fused_kl_bwd (contract.FusedPass) on each [rows, V] tile of the policy (and, when given, of the
    frozen reference model: ref_hidden, ref_weight, ref_bias, no gradient). Same four outputs as
    api.FusedKLFunction: logp, ref_logp (None without a reference), entropy, full_kl.

    A labelled row whose hidden state (or the reference's) is not finite is poisoned: the matmul
    reads zeros for it, and its outputs are NaN (its label is made a bad one for the kernels), its
    gradients too where a gradient flows from it (the weight's and bias' then NaN as a whole)."""

    @staticmethod
    def forward(ctx, impl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, args, transform,
                need_entropy, need_full, rows, kept=None):
        """args: the PassArgs of all rows without logits (labels, temperature, ignore_index, shard); transform:
        the logits' Transform; kept: a replay.KeptSet (sampling replay): the rows with a set are projected
        onto their K kept columns only, the tiles hold the other rows."""
        n_tokens, has_ref, vocab = hidden.shape[0], ref_hidden is not None, weight.shape[0]
        layout = _Layout.of(kept, n_tokens)
        tile_rows = layout.tile_rows(rows)
        policy = Projection(hidden, weight, bias, tile_rows, vocab, transform)
        reference = Projection(ref_hidden, ref_weight, ref_bias, tile_rows, vocab, transform) if has_ref else None
        stats, poisoned, kept_z, ref_kept_z = _forward_tiles(impl, args, policy, reference, kept, layout, rows,
                                                             need_entropy, need_full)
        # the kept rows' numbers over their sets (a poisoned row's bad label: NaN), then the ranks' merge
        kept_rows = None if kept is None else rows_module.from_values(kept, kept_z, ref_kept_z)
        stats = rows_module.finish(impl, _poisoned_args(args, poisoned), stats, kept_rows, need_entropy, need_full)
        empty = hidden.new_empty((0,), dtype=compute_dtype(hidden.dtype))
        logp, ref_logp, entropy, full_kl, lse, ref_lse = (empty if t is None else t for t in stats)
        ctx.set_materialize_grads(False)
        ctx.impl, ctx.transform, ctx.rows, ctx.layout = impl, transform, rows, layout
        tensor_temperature = args.temperature if isinstance(args.temperature, torch.Tensor) else None
        ctx.args = args._replace(labels=None, temperature=None if tensor_temperature is not None else args.temperature)
        # the reference model is saved only for `full`, whose gradient reads its logits
        ctx.save_for_backward(hidden, weight, bias, *((ref_hidden, ref_weight, ref_bias) if need_full else (None,) * 3),
                              args.labels, poisoned, lse, ref_lse if need_full else None, entropy, full_kl,
                              tensor_temperature, *(kept if kept is not None else (None,) * 4), kept_z,
                              ref_kept_z if need_full else None)
        if has_ref:
            ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp if has_ref else None, entropy if need_entropy else None, full_kl if need_full else None

    @staticmethod
    def backward(ctx, grad_logp, grad_ref_logp, grad_entropy, grad_full):
        first_order_only()
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, poisoned, lse, ref_lse, entropy, full_kl,
         tensor_temperature, *kept, kept_z, ref_kept_z) = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None and grad_full is None:
            return (None,) * 13
        temperature = tensor_temperature if tensor_temperature is not None else ctx.args.temperature
        args = ctx.args._replace(labels=labels, temperature=temperature)
        use_ref = grad_full is not None and ref_hidden is not None
        all_stats = RowStats(None, None, entropy if entropy.numel() else None, full_kl if full_kl.numel() else None,
                             lse, ref_lse if use_ref else None)
        all_grads = RowGrads(grad_logp, grad_entropy, grad_full)
        feed = (labels != args.ignore_index) & ~poisoned
        args = args._replace(labels=torch.where(poisoned, args.ignore_index, labels))  # its NaN is set below
        layout, n_tokens, vocab = ctx.layout, hidden.shape[0], weight.shape[0]
        sums = GradientSums(hidden, weight, bias, ctx.needs_input_grad[1:4], min(ctx.rows, n_tokens))
        kept = replay.KeptSet(*kept) if kept[0] is not None else None
        on_kept = None if kept is None else _kept_backward(ctx, args, poisoned, feed, hidden, kept, kept_z, ref_kept_z,
                                                           all_stats, all_grads, sums)
        tile_rows = layout.tile_rows(ctx.rows)
        policy = Projection(hidden, weight, bias, tile_rows, sums.chunk, ctx.transform)
        reference = Projection(ref_hidden, ref_weight, ref_bias, tile_rows, sums.chunk, ctx.transform) \
            if use_ref else None
        for v0 in range(0, vocab, sums.chunk):  # fixed orders, chunks then tiles: deterministic
            v1 = min(v0 + sums.chunk, vocab)
            chunk_args = args._replace(shard=args.shard._replace(start=args.shard.start + v0))
            sums.start_chunk(v0, v1)
            for at, count in layout.tiles(ctx.rows):
                z, tanh, inputs = policy.tile(at, count, feed[at], v0, v1)
                ref_z = reference.tile(at, count, feed[at], v0, v1)[0] if use_ref else None
                stats = RowStats(*(None if t is None else t[at] for t in all_stats))
                grads = RowGrads(*(_rows(g, at) for g in all_grads))
                # in place: z's rows now hold dlogits; the padding's are made 0
                ctx.impl.fused_kl_bwd(_tile_args(chunk_args, z, ref_z, at, count), stats, grads, True)
                z[count:].zero_()
                sums.add(through_transform(z, tanh, ctx.transform.logit_scale).to(weight.dtype), inputs, at, count,
                         v0, v1)
                del z, tanh, ref_z, inputs  # before the next tile is made
            if on_kept is not None:
                sums.add_kept_chunk(*on_kept, v0, v1)
            sums.end_chunk(v0, v1)
        # a poisoned row from which a gradient flows: NaN in its hidden gradient, and in the sums over rows
        flows = torch.stack([g != 0 for g in all_grads if g is not None]).any(0)
        return (None, *sums.result(poisoned & flows)) + (None,) * 9


class _Layout(NamedTuple):
    """Which rows the tiles hold: all (dense None: contiguous slices) or, under sampling replay, the rows
    without a kept set (dense: their index); kept: the index of the rows with one (projected alone)."""
    n_tokens: int
    dense: torch.Tensor | None
    kept: torch.Tensor | None

    @staticmethod
    def of(kept, n_tokens):
        if kept is None:
            return _Layout(n_tokens, None, None)
        return _Layout(n_tokens, torch.nonzero(~kept.rows).squeeze(1), torch.nonzero(kept.rows).squeeze(1))

    @property
    def dense_rows(self) -> int:
        return self.n_tokens if self.dense is None else self.dense.numel()

    def tile_rows(self, rows) -> int:
        """The rows a tile's buffers hold (one at least, when every row is kept)."""
        return min(rows, max(self.dense_rows, 1))

    def tiles(self, rows):
        """(at, count) of each tile of `rows` rows: a slice of all rows, or an index of dense rows."""
        for t0 in range(0, self.dense_rows, rows):
            t1 = min(t0 + rows, self.dense_rows)
            yield (slice(t0, t1) if self.dense is None else self.dense[t0:t1]), t1 - t0


def _forward_tiles(impl, args, policy, reference, kept, layout, rows, need_entropy, need_full):
    """The backend's forward on each tile of rows, and the kept rows' K logits each (projected onto their
    columns only): (the RowStats of all rows, which rows are poisoned, the kept columns' logits and the
    reference's, or None). A kept row's statistics are finish()'s, over its set."""
    hidden = policy.hidden
    n_tokens, has_ref = hidden.shape[0], reference is not None
    dtype = compute_dtype(hidden.dtype)
    new = lambda needed, kind=dtype: hidden.new_empty((n_tokens if needed else 0,), dtype=kind)  # noqa: E731
    outputs = (new(True), new(has_ref), new(need_entropy), new(need_full), new(True, torch.float64),  # the saved
               new(has_ref, torch.float64))  # lse in float64, as every backend's
    labelled = args.labels != args.ignore_index
    poisoned = torch.empty_like(labelled)

    def fed(at):
        finite = policy.finite_rows(at)
        if has_ref:
            finite &= reference.finite_rows(at)
        poisoned[at] = labelled[at] & ~finite
        return labelled[at] & finite

    for at, count in layout.tiles(rows):
        feed = fed(at)
        z = policy.tile(at, count, feed)[0]
        ref_z = reference.tile(at, count, feed)[0] if has_ref else None
        labels = _poisoned_args(args, poisoned[at], at).labels
        tile = impl.fused_kl_fwd(_tile_args(args, z, ref_z, at, count, labels), need_entropy, need_full)
        for out, value in zip(outputs, tile):
            if value is not None and out.numel():
                out[at] = value
        del z, ref_z  # the budget holds one tile of each at a time
    kept_z = ref_kept_z = None
    if kept is not None:  # rows without a set leave theirs at 0: no entry of theirs counts
        kept_z = hidden.new_zeros(kept.columns.shape, dtype=dtype)
        ref_kept_z = torch.zeros_like(kept_z) if has_ref else None
        at = layout.kept
        feed = fed(at)
        kept_z[at] = policy.kept(at, kept.columns[at], feed)[0]
        if has_ref:
            ref_kept_z[at] = reference.kept(at, kept.columns[at], feed)[0]
    logp, ref_logp, entropy, full_kl, lse, ref_lse = outputs
    stats = RowStats(logp, ref_logp if has_ref else None, entropy if need_entropy else None,
                     full_kl if need_full else None, lse, ref_lse if has_ref else None)
    return stats, poisoned, kept_z, ref_kept_z


def _kept_backward(ctx, args, poisoned, feed, hidden, kept, kept_z, ref_kept_z, all_stats, all_grads, sums):
    """The kept rows' gradient over their sets (the kernels' own, from the merged statistics), through the
    transform, into the hidden and bias sums; returns (dz, inputs, columns) for each chunk's weight share."""
    on_kept = rows_module.kept_gradient(ctx.impl, _poisoned_args(args, poisoned),
                                        rows_module.from_values(kept, kept_z, ref_kept_z), all_stats, all_grads)
    if on_kept is None:
        return None
    at, softcap = ctx.layout.kept, ctx.transform.softcap
    columns, counts = kept.columns[at], kept.counts[at]
    tanh = None if softcap is None else kept_z[at] / softcap
    dz = through_transform(on_kept[at].to(sums.wide), tanh, ctx.transform.logit_scale)
    # an entry that does not count holds a placeholder column; a poisoned row's NaN is set where a gradient
    # flows from it (GradientSums.result), as a tiled row's
    dz = torch.where(counts & ~poisoned[at, None], dz, 0.0)
    inputs = torch.where(feed[at, None], hidden[at], 0.0).to(sums.wide)  # 0, not a dead row's NaN
    sums.add_kept_rows(dz, inputs, at, columns)
    return dz, inputs, columns


def _poisoned_args(args, poisoned, at=slice(None)):
    """args with the labels of rows `at` that are poisoned made bad ones (NaN rows in the kernels)."""
    return args._replace(labels=torch.where(poisoned, sharding.bad_label(args.ignore_index), args.labels[at]))


def _tile_args(args, z, ref_z, at, rows, labels=None):
    """The PassArgs of one tile, the `rows` rows `at`: its logits as [1, rows, V] (z's first rows)."""
    return args._replace(logits=z[:rows].unsqueeze(0), labels=args.labels[at] if labels is None else labels,
                         ref_logits=None if ref_z is None else ref_z[:rows].unsqueeze(0),
                         temperature=_rows(args.temperature, at))


def _rows(value, at):
    return value[at] if isinstance(value, torch.Tensor) and value.dim() else value


def _check_linear(hidden, weight, bias, labels, arg_prefix=""):
    check.floating(hidden, f"{arg_prefix}hidden")
    check.floating(weight, f"{arg_prefix}weight")
    if weight.dim() != 2:
        raise ValueError(f"{arg_prefix}weight must be [V, H] (lm_head.weight), got shape {tuple(weight.shape)}")
    if hidden.dim() > 0 and hidden.shape[-1] != weight.shape[1] and hidden.shape[-1] == weight.shape[0]:
        raise ValueError(f"{arg_prefix}weight must be [V, H] (lm_head.weight) with H = {arg_prefix}hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got shape {tuple(weight.shape)}: transposed?")
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


class Transform(NamedTuple):
    """What makes a row's logits from its hidden state besides the weights (docs/contract.md 9 and 14)."""
    logit_scale: float
    softcap: float | None
    logits_dtype: torch.dtype | None  # None: the inputs' dtype (as F.linear)


def _check_common(labels, hidden, logit_scale, softcap, logits_dtype, tile_bytes) -> dict:
    """The checked Transform's fields (a dict, as the header exchange compares them)."""
    check.integer(labels, "labels")
    if isinstance(tile_bytes, bool) or not isinstance(tile_bytes, numbers.Integral) or tile_bytes <= 0:
        raise ValueError(f"tile_bytes must be a positive int, got {tile_bytes!r}")
    logit_scale, softcap = _check_transform(logit_scale, softcap)
    if logits_dtype is not None:
        allowed = {hidden.dtype} | ({torch.float32} if hidden.dtype in (torch.bfloat16, torch.float16) else set())
        if logits_dtype not in allowed:
            raise ValueError(f"logits_dtype must be None, the hidden states' dtype or (with bfloat16 / float16 "
                             f"hidden states) torch.float32; got {logits_dtype} with {hidden.dtype} hidden states")
        logits_dtype = None if logits_dtype == hidden.dtype else logits_dtype
    return dict(logit_scale=logit_scale, softcap=softcap, logits_dtype=logits_dtype)


def _tile_dtype(dtype, logit_scale, softcap, logits_dtype=None):
    # the logits tile keeps the matmul's dtype (logits_dtype when wider) under the identity transform,
    # else it is the compute dtype (float32; float64 stays float64)
    dtype = logits_dtype or dtype
    return dtype if softcap is None and logit_scale == 1.0 else compute_dtype(dtype)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                          ignore_index=-100, return_entropy=False, validate=True, process_group=None, backend=None,
                          tile_bytes=TILE_BYTES, kept_ids=None, logits_dtype=None):
    """token_logprobs of z = g(hidden @ weight^T + bias) without materialising z (docs/contract.md section 9).

    hidden [..., H] (leading dims as labels), weight [V, H], bias [V]; returns float32 [...] log-probs
    (and entropy with return_entropy). Gradients reach hidden, weight and bias in their dtypes.
    tile_bytes bounds the logits tiles (about rows x V x 4 bytes each, one more with a reference).
    logits_dtype: torch.float32 with bf16/fp16 inputs makes the logits as an fp32 LM head does (section 14)."""
    transform = {}

    def check_inputs():
        check.integer(labels, "labels")
        _check_linear(hidden, weight, bias, labels)
        transform.update(_check_common(labels, hidden, logit_scale, softcap, logits_dtype, tile_bytes))
        return (_tile_dtype(hidden.dtype, **transform),), hidden, weight.shape[0]

    plan = make_plan("linear_token_logprobs", process_group=process_group, device=device_of(hidden), labels=labels,
                     validate=validate, check_inputs=check_inputs, temperature=temperature, ignore_index=ignore_index,
                     return_entropy=return_entropy, kept_ids=kept_ids, backend=backend, transform=transform)
    rows = _rows_per_tile(labels.numel(), weight.shape[0], hidden.element_size(), tile_bytes, False, hidden.device)
    logp, _, entropy, _ = LinearKLFunction.apply(
        plan.backend.impl, hidden.reshape(-1, hidden.shape[-1]), weight, bias, None, None, None, plan.args,
        Transform(**transform), bool(return_entropy), False, rows, plan.kept)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def _check_reference_model(ref_hidden, ref_weight, ref_bias, weight, labels):
    if ref_hidden is None and ref_weight is None and ref_bias is None:
        return
    if ref_hidden is None or ref_weight is None:
        raise ValueError("ref_hidden and ref_weight come together (the reference model's hidden states and "
                         f"lm_head.weight), got only {'ref_hidden' if ref_weight is None else 'ref_weight'}"
                         + (" and ref_bias" if ref_bias is not None else ""))
    check.tensor(ref_weight, "ref_weight")
    if ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must be [V, H_ref] with weight's vocabulary size V = {weight.shape[0]}, "
                         f"got shape {tuple(ref_weight.shape)}")
    _check_linear(ref_hidden, ref_weight, ref_bias, labels, "ref_")


def linear_kl_penalty(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                      ref_logprobs=None, mask=None, cu_seqlens=None, kl_coef=0.1, estimator="k1", temperature=1.0,
                      logit_scale=1.0, softcap=None, log_ratio_clamp=None, kl_clamp=None, ignore_index=-100,
                      return_entropy=False, validate=True, process_group=None, backend=None, tile_bytes=TILE_BYTES,
                      kept_ids=None, logits_dtype=None):
    """kl_penalty of z = g(hidden @ weight^T + bias) against z' = g(ref_hidden @ ref_weight^T + ref_bias)
    (or given ref_logprobs), never materialising either (docs/contract.md section 9). Same KLPenaltyOutput.

    hidden [B, T, H] (padded) or [N, H] (packed, with cu_seqlens); ref_hidden has hidden's leading
    dims and its own hidden size; the reference model is frozen (no gradient reaches it)."""
    transform = {}

    def check_inputs():
        check.integer(labels, "labels")
        _check_linear(hidden, weight, bias, labels)
        transform.update(_check_common(labels, hidden, logit_scale, softcap, logits_dtype, tile_bytes))
        _check_reference_model(ref_hidden, ref_weight, ref_bias, weight, labels)
        dtypes = [_tile_dtype(t.dtype, **transform) for t in (hidden, ref_hidden) if t is not None]
        return tuple(dtypes), hidden, weight.shape[0]

    plan = make_plan(
        "linear_kl_penalty", process_group=process_group, device=device_of(hidden), labels=labels, validate=validate,
        check_inputs=check_inputs, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
        kept_ids=kept_ids, backend=backend, transform=transform,
        penalty=dict(source=("hidden", getattr(hidden, "shape", ())), ref_logprobs=ref_logprobs, mask=mask,
                     cu_seqlens=cu_seqlens, kl_coef=kl_coef, estimator=estimator, log_ratio_clamp=log_ratio_clamp,
                     kl_clamp=kl_clamp, has_ref_model=ref_hidden is not None))
    element_bytes = max(hidden.element_size(), 0 if ref_hidden is None else ref_hidden.element_size())
    rows = _rows_per_tile(labels.numel(), weight.shape[0], element_bytes, tile_bytes, ref_hidden is not None,
                          hidden.device)
    flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    detached = lambda t: None if t is None else t.detach()  # noqa: E731
    logp, ref_logp, entropy, full_kl = LinearKLFunction.apply(
        plan.backend.impl, flat(hidden), weight, bias, flat(detached(ref_hidden)), detached(ref_weight),
        detached(ref_bias), plan.args, Transform(**transform), bool(return_entropy),
        plan.penalty.estimator.name == "full", rows, plan.kept)
    return penalty_outputs(plan.penalty, labels, plan.args.labels, logp, ref_logp,
                           entropy if return_entropy else None, full_kl, ref_logprobs, mask, kl_coef)
