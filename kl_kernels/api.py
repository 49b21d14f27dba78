"""Public entry points of the fused pass: token_logprobs and kl_penalty (docs/contract.md sections 1-2).

Each validates its inputs before any work, picks a backend (dispatch.py) and runs that backend's
fused pass over the logits through one autograd Function (below). kl_penalty on a kernel backend
(cpu, triton, cuda) is one op each way: the kernels compute the estimator, masks, penalty and
per-sequence sums too (contract.OnePass). Otherwise (the reference backend, a tensor-parallel call
whose row statistics are merged across ranks first, the hidden-state functions) the row pass is
followed by _penalty_outputs: the same estimator in PyTorch ops (estimators.py, the truth).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import replay, rows, sharding
from . import validation as check
from .contract import (PassArgs, PenaltyArgs, PenaltyGrads, PenaltyStats, RowGrads, RowStats, compute_dtype)
from .dispatch import select_backend
from .estimators import estimate, parse_estimator


class KLPenaltyOutput(NamedTuple):
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    penalty: torch.Tensor
    kl_sum: torch.Tensor
    kl_mean: torch.Tensor
    entropy: torch.Tensor | None


def first_order_only() -> None:
    """Called first in every kernel-backed backward. The kernels compute first derivatives only:
    with create_graph=True autograd would record them as constants, and a double backward (a
    gradient penalty, a Hessian-vector product) would be silently wrong, so it is an error."""
    if torch.is_grad_enabled():
        raise RuntimeError("kl_kernels computes first-order gradients only: backward with create_graph=True "
                           "(double backward) is not supported by any backend; for second-order terms compute "
                           "the log-probs with torch.log_softmax instead")


def _save(ctx, args: PassArgs, kept: rows.KeptRows | None, keep_ref: bool, *tensors) -> None:
    """Saves what a backward of the row pass reads: args' tensors (the reference logits only when
    keep_ref: `full`'s gradient reads them), the kept rows, then `tensors`; the rest of args as is."""
    tensor_temperature = args.temperature if isinstance(args.temperature, torch.Tensor) else None
    ctx.args = args._replace(logits=None, labels=None, ref_logits=None,
                             temperature=None if tensor_temperature is not None else args.temperature)
    kept_tensors = (None,) * 6 if kept is None else (*kept.set, kept.logits, kept.ref_logits if keep_ref else None)
    ctx.save_for_backward(args.logits, args.labels, args.ref_logits if keep_ref else None, tensor_temperature,
                          *kept_tensors, *tensors)


def _saved(ctx):
    """(args, kept rows, the tensors given to _save after them), as _save left them."""
    logits, labels, ref_logits, tensor_temperature, *kept, = ctx.saved_tensors[:10]
    temperature = tensor_temperature if tensor_temperature is not None else ctx.args.temperature
    args = ctx.args._replace(logits=logits, labels=labels, ref_logits=ref_logits, temperature=temperature)
    kept_rows = None if kept[0] is None else rows.KeptRows(replay.KeptSet(*kept[:4]), kept[4], kept[5])
    return args, kept_rows, ctx.saved_tensors[10:]


class FusedKLFunction(torch.autograd.Function):
    """The fused pass with autograd (rows.forward / rows.backward): args is a PassArgs whose logits are
    the `logits` argument (given separately so that autograd sees them); kept a replay.KeptSet (sampling
    replay) or None."""

    @staticmethod
    def forward(ctx, impl, logits, args, need_entropy, need_full, inplace, kept=None):
        args = args._replace(logits=logits)
        kept = rows.gather(kept, logits, args.ref_logits)
        stats = rows.forward(impl, args, kept, need_entropy, need_full)
        ctx.impl, ctx.inplace = impl, inplace
        ctx.set_materialize_grads(False)  # an unused output costs nothing in the backward
        _save(ctx, args, kept, need_full, stats.lse, stats.ref_lse if need_full else None, stats.entropy,
              stats.full_kl)
        if stats.ref_logp is not None:
            ctx.mark_non_differentiable(stats.ref_logp)
        return stats.logp, stats.ref_logp, stats.entropy, stats.full_kl

    @staticmethod
    def backward(ctx, grad_logp, grad_ref_logp, grad_entropy, grad_full):
        first_order_only()
        if grad_logp is None and grad_entropy is None and grad_full is None:
            return (None,) * 7
        args, kept, (lse, ref_lse, entropy, full_kl) = _saved(ctx)
        grad = rows.backward(ctx.impl, args, RowStats(None, None, entropy, full_kl, lse, ref_lse),
                             RowGrads(grad_logp, grad_entropy, grad_full), ctx.inplace, kept)
        return None, grad, None, None, None, None, None


class FusedPenaltyFunction(torch.autograd.Function):
    """kl_penalty in a backend's one-pass ops (contract.OnePass; rows.penalty_forward / penalty_backward):
    one forward op, one backward op taking the upstream gradients of all six differentiable outputs, and
    one more each way over the kept columns with kept_ids. kl_coef is given separately (None when a float)
    so that a kl_coef tensor that requires grad gets -sum(g_penalty * kl)."""

    @staticmethod
    def forward(ctx, impl, logits, kl_coef, args, penalty, need_entropy, inplace, kept=None):
        args = args._replace(logits=logits)
        kept = rows.gather(kept, logits, args.ref_logits)
        stats = rows.penalty_forward(impl, args, penalty, kept, need_entropy)
        ctx.impl, ctx.inplace = impl, inplace
        ctx.set_materialize_grads(False)
        full = penalty.estimator.name == "full"
        ctx.penalty = penalty._replace(ref_logprobs=None, mask=None, cu_seqlens=None,
                                       kl_coef=None if kl_coef is not None else penalty.kl_coef)
        coef_grad = kl_coef is not None and kl_coef.requires_grad
        _save(ctx, args, kept, full, penalty.mask, kl_coef, stats.logp, stats.ref_logp, stats.counts, stats.sequence,
              stats.lse, stats.ref_lse if full else None, stats.entropy, stats.full_kl, stats.kl if coef_grad else None)
        ctx.mark_non_differentiable(stats.ref_logp)
        return stats.logp, stats.ref_logp, stats.kl, stats.penalty, stats.kl_sum, stats.kl_mean, stats.entropy

    @staticmethod
    def backward(ctx, g_logp, g_ref_logp, g_kl, g_penalty, g_kl_sum, g_kl_mean, g_entropy):
        first_order_only()
        args, kept, (mask, kl_coef, logp, ref_logp, counts, sequence, lse, ref_lse, entropy, full_kl,
                     kl) = _saved(ctx)
        grads = PenaltyGrads(g_logp, g_kl, g_penalty, g_kl_sum, g_kl_mean, g_entropy)
        coef_grad = None if kl is None or g_penalty is None else -(g_penalty * kl).sum().to(kl_coef.dtype)
        if all(g is None for g in grads) or not ctx.needs_input_grad[1]:
            return None, None, coef_grad, None, None, None, None, None
        penalty = ctx.penalty._replace(mask=mask, kl_coef=kl_coef if kl_coef is not None else ctx.penalty.kl_coef)
        stats = PenaltyStats(logp, ref_logp, None, None, None, None, counts, sequence, entropy, full_kl, lse, ref_lse)
        grad = rows.penalty_backward(ctx.impl, args, penalty, stats, grads, ctx.inplace, kept)
        return None, grad, coef_grad, None, None, None, None, None


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [B, T, V] with a contiguous vocabulary dim, a view whenever strides allow."""
    if logits.stride(-1) != 1:
        # clone, not contiguous(): an empty tensor counts as contiguous whatever its strides
        logits = logits.clone(memory_format=torch.contiguous_format)
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    return logits.flatten(0, -3)


def _temperature(temperature, labels_shape, device, dtype, validate, per_sequence=None):
    """A float, or a contiguous [N] tensor of per-token temperatures in the compute dtype.

    per_sequence: (number of sequences B, callable giving each token's sequence index) for the
    packed layout, where a 1-D tensor of length B != N holds one temperature per sequence.
    """
    if isinstance(temperature, torch.Tensor):
        if not (temperature.is_floating_point() or temperature.dtype in check.INTEGER_DTYPES):
            raise ValueError(f"temperature must be a float or a real (floating or integer) tensor, "
                             f"got dtype {temperature.dtype}")
        check.same_device(device, temperature=temperature)
        n_tokens = 1
        for size in labels_shape:
            n_tokens *= size
        if validate:
            check.temperature_values(temperature)
        if per_sequence is not None and temperature.dim() == 1 and temperature.numel() == per_sequence[0] != n_tokens:
            return temperature.to(dtype)[per_sequence[1]()].contiguous()
        try:
            broadcast = torch.broadcast_shapes(temperature.shape, labels_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != tuple(labels_shape):
            raise ValueError(f"temperature must be a float or a tensor broadcastable to the labels' shape "
                             f"{tuple(labels_shape)}, got shape {tuple(temperature.shape)}")
        return temperature.to(dtype).expand(labels_shape).reshape(-1).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    return check.temperature_float(temperature)


def _check_logits_labels(logits, labels, inplace_backward=False):
    check.floating(logits, "logits")
    if inplace_backward:
        check.inplace_target(logits)
    check.integer(labels, "labels")
    check.shape(labels, logits.shape[:-1], "labels", "the logits' shape without the vocabulary dim")
    check.same_device(logits.device, labels=labels)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")


def _device(tensor) -> torch.device:
    return tensor.device if isinstance(tensor, torch.Tensor) else torch.device("cpu")


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   validate=True, inplace_backward=False, process_group=None, backend=None, kept_ids=None):
    """Label log-probs z_y/T - lse(z/T) in float32 (float64 for float64 logits), optionally entropy.
    process_group: logits hold this rank's shard of the vocabulary (docs/contract.md section 10).
    kept_ids: [..., K] the sampler's kept token ids per position, -1 padding: each row's softmax over
    its kept set (section 12)."""
    with sharding.checks(process_group, _device(logits), validate):
        _check_logits_labels(logits, labels, inplace_backward)
        validate = validate and check.has_values(logits)
        ignore_index = check.ignore_index(ignore_index)
        dtype = compute_dtype(logits.dtype)
        temp = _temperature(temperature, labels.shape, logits.device, dtype, validate)
        if kept_ids is not None:
            replay.check_kept_ids(kept_ids, labels, logits.device)
        chosen = select_backend(backend, logits.device, (logits.dtype,))
    shard, flat_labels, kept = sharding.vocab_shard(
        process_group, logits.device, logits.shape[-1], validate, "token_logprobs", labels,
        return_entropy=bool(return_entropy), ignore_index=ignore_index, temperature=temperature, kept_ids=kept_ids)
    logits_rows = _as_rows(logits)
    args = PassArgs(logits_rows, flat_labels, None, temp, ignore_index, shard)
    logp, _, entropy, _ = FusedKLFunction.apply(chosen.impl, logits_rows, args, bool(return_entropy), False,
                                                bool(inplace_backward), kept)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def _sequence_sums(values, layout, offsets):
    """Per-sequence sums, each added one value at a time in token order in float64 (segment_reduce)
    and rounded once: a sequence's sum depends on its own tokens only, padded or packed, whatever
    else the batch holds (a padded row's masked positions add exact zeros), as in the kernels' sums.
    (A float32 sum over a 262k-token sequence drifted 7e-5 relative.)"""
    if layout == "padded":
        batch, steps = values.shape
        offsets = torch.arange(batch + 1, device=values.device) * steps
        values = values.reshape(-1)
    return torch.segment_reduce(values.double(), "sum", offsets=offsets, initial=0).to(values.dtype)


class _PenaltyPlan(NamedTuple):
    """What kl_penalty and linear_kl_penalty decide before the fused pass, from checked arguments."""
    layout: str  # "padded" ([B, T] labels) or "packed" ([N] labels)
    cu_seqlens: torch.Tensor | None  # packed: as given (None: one sequence); see _offsets
    estimator: object  # estimators.Estimator
    temperature: object  # float, or [N] tensor in the compute dtype
    ignore_index: int
    dtype: torch.dtype  # compute dtype of the outputs


def _plan_penalty(labels, device, dtype, *, source, ref_logprobs, mask, cu_seqlens, kl_coef, estimator,
                  temperature, log_ratio_clamp, kl_clamp, ignore_index, validate, has_ref_model):
    """The checks and choices shared by the logits and hidden-state forms of the penalty.

    source: (name, shape) of the policy input for messages ("logits" or "hidden"); has_ref_model:
    whether the reference comes as logits / hidden states (else ref_logprobs)."""
    name, shape = source
    if labels.dim() == 2:
        layout = "padded"
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is for the packed layout ({name} [N, ...]); got padded {name} "
                             f"of shape {tuple(shape)}")
    elif labels.dim() == 1:
        layout = "packed"
    else:
        last = "V" if name == "logits" else "H"
        raise ValueError(f"{name} must be [B, T, {last}] (padded) or [N, {last}] (packed), got shape {tuple(shape)}")
    if has_ref_model == (ref_logprobs is not None):
        ref_name = "ref_logits" if name == "logits" else "ref_hidden"
        raise ValueError(f"exactly one of {ref_name} or ref_logprobs must be given, got "
                         + ("both" if has_ref_model else "neither"))
    if ref_logprobs is not None:
        check.tensor(ref_logprobs, "ref_logprobs")
        if not ref_logprobs.is_floating_point():
            raise TypeError(f"ref_logprobs must be a floating tensor, got dtype {ref_logprobs.dtype}")
        check.shape(ref_logprobs, labels.shape, "ref_logprobs", "the labels' shape")
    if mask is not None:
        check.real_mask(mask, "mask")
        check.shape(mask, labels.shape, "mask", "the labels' shape")
    n_tokens = labels.numel()
    if cu_seqlens is not None:
        check.integer(cu_seqlens, "cu_seqlens")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D [B+1], got shape {tuple(cu_seqlens.shape)}")
    check.same_device(device, ref_logprobs=ref_logprobs, mask=mask, cu_seqlens=cu_seqlens)
    est = parse_estimator(estimator, log_ratio_clamp, kl_clamp)
    if est.name == "full" and not has_ref_model:
        raise ValueError(f"estimator 'full' needs {'ref_logits' if name == 'logits' else 'ref_hidden'} "
                         "(the exact KL sums over the vocabulary); got ref_logprobs")
    check.nonnegative_coef(kl_coef, "kl_coef", validate)
    ignore_index = check.ignore_index(ignore_index)

    per_sequence = None
    if layout == "packed" and cu_seqlens is not None:
        n_seqs = cu_seqlens.numel() - 1
        if validate:
            check.cu_seqlens_values(cu_seqlens, n_tokens)

        def sequence_of_token():
            offsets = _offsets(cu_seqlens, n_tokens, device)
            positions = torch.arange(n_tokens, device=device)
            return torch.searchsorted(offsets[1:], positions, right=True).clamp_(max=max(n_seqs - 1, 0))
        per_sequence = (n_seqs, sequence_of_token)
    temp = _temperature(temperature, labels.shape, device, dtype, validate, per_sequence)
    return _PenaltyPlan(layout, cu_seqlens if layout == "packed" else None, est, temp, ignore_index, dtype)


def _offsets(cu_seqlens, n_tokens, device):
    """Packed sequence boundaries [S+1]: cu_seqlens made monotone and clamped into [0, N] even
    without validate (no kernel may read out of bounds; the one-pass kernels do the same)."""
    if cu_seqlens is None:
        return torch.tensor([0, n_tokens], dtype=torch.int64, device=device)
    return cu_seqlens.to(torch.int64).clamp(0, n_tokens).cummax(0).values


def _penalty_outputs(plan, labels, flat_labels, logp, ref_logp, entropy, full_kl, ref_logprobs, mask, kl_coef):
    """The O(N) end of the pass, shared by every backend and both forms: the estimator on selected
    inputs, the mask, the penalty and the per-sequence sums."""
    dtype, device = plan.dtype, logp.device
    labelled = flat_labels != plan.ignore_index
    if ref_logprobs is not None:
        given = ref_logprobs.detach().reshape(-1).to(dtype)
        ref_logp = torch.where(labelled, given, torch.zeros((), dtype=dtype, device=device))
    valid = labelled if mask is None else labelled & (mask.reshape(-1) != 0)
    # select before compute, never multiply: masked and ignored positions feed the estimator safe
    # inputs (log-ratio 0), so neither their NaN nor an overflowing exp reaches a value or a gradient
    zero = torch.zeros((), dtype=dtype, device=device)
    safe = lambda t: None if t is None else torch.where(valid, t, zero)  # noqa: E731
    kl = torch.where(valid, estimate(plan.estimator, safe(logp), safe(ref_logp), safe(full_kl)), zero)
    shape = labels.shape
    if plan.layout == "padded":
        kl_seq, valid_seq = kl.view(shape), valid.view(shape).to(dtype)
    else:
        kl_seq, valid_seq = kl, valid.to(dtype)
    offsets = None if plan.layout == "padded" else _offsets(plan.cu_seqlens, flat_labels.numel(), device)
    kl_sum = _sequence_sums(kl_seq, plan.layout, offsets)
    counts = _sequence_sums(valid_seq, plan.layout, offsets)
    # a sequence with no valid token has kl_sum exactly 0 (selected), so 0 / 1 = 0: no select needed
    kl_mean = kl_sum / counts.clamp(min=1)
    coef = kl_coef.to(device=device, dtype=dtype) if isinstance(kl_coef, torch.Tensor) else float(kl_coef)
    penalty = -coef * kl
    return KLPenaltyOutput(
        logp.view(shape), ref_logp.view(shape), kl.view(shape), penalty.view(shape), kl_sum, kl_mean,
        None if entropy is None else entropy.view(shape))


def kl_penalty(logits, labels, *, ref_logits=None, ref_logprobs=None, mask=None, cu_seqlens=None,
               kl_coef=0.1, estimator="k1", temperature=1.0, log_ratio_clamp=None, kl_clamp=None,
               ignore_index=-100, return_entropy=False, validate=True, inplace_backward=False, process_group=None,
               backend=None, kept_ids=None):
    """The fused KL penalty pass; see docs/contract.md section 2 for every field of the result
    (section 10 for process_group: logits and ref_logits hold this rank's shard of the vocabulary;
    section 12 for kept_ids, the sampler's kept sets: policy and reference renormalised over them)."""
    with sharding.checks(process_group, _device(logits), validate):
        _check_logits_labels(logits, labels, inplace_backward)
        validate = validate and check.has_values(logits)
        if logits.dim() not in (2, 3):
            raise ValueError(f"logits must be [B, T, V] (padded) or [N, V] (packed), got shape {tuple(logits.shape)}")
        if ref_logits is not None:
            check.floating(ref_logits, "ref_logits")
            check.shape(ref_logits, logits.shape, "ref_logits", "the logits' shape")
            check.same_device(logits.device, ref_logits=ref_logits)
        plan = _plan_penalty(
            labels, logits.device, compute_dtype(logits.dtype), source=("logits", logits.shape), ref_logprobs=ref_logprobs,
            mask=mask, cu_seqlens=cu_seqlens, kl_coef=kl_coef, estimator=estimator, temperature=temperature,
            log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp, ignore_index=ignore_index, validate=validate,
            has_ref_model=ref_logits is not None)
        if kept_ids is not None:
            replay.check_kept_ids(kept_ids, labels, logits.device)
        dtypes = (logits.dtype,) if ref_logits is None else (logits.dtype, ref_logits.dtype)
        chosen = select_backend(backend, logits.device, dtypes)
    shard, flat_labels, kept = _agree_shard(process_group, logits.device, logits.shape[-1], "kl_penalty", labels,
                                            plan, validate, ref_logits is not None, return_entropy, temperature, mask,
                                            kept_ids)
    logits_rows = _as_rows(logits)
    args = PassArgs(logits_rows, flat_labels, None if ref_logits is None else _as_rows(ref_logits), plan.temperature,
                    plan.ignore_index, shard)
    if shard.group is None and chosen.one_pass(logits.device):
        # the whole penalty in the backend's ops: one forward op, one backward op
        coef = kl_coef.to(device=logits.device, dtype=plan.dtype) if isinstance(kl_coef, torch.Tensor) else None
        penalty = PenaltyArgs(plan.estimator, None if ref_logprobs is None else ref_logprobs.detach().reshape(-1),
                              None if mask is None else mask.reshape(-1), plan.layout == "padded", plan.cu_seqlens,
                              float(kl_coef) if coef is None else coef)
        outputs = FusedPenaltyFunction.apply(chosen.impl, logits_rows, coef, args, penalty, bool(return_entropy),
                                             bool(inplace_backward), kept)
        shape = labels.shape
        return KLPenaltyOutput(*(t.view(shape) for t in outputs[:4]), *outputs[4:6],
                               outputs[6].view(shape) if return_entropy else None)
    logp, ref_logp, entropy, full_kl = FusedKLFunction.apply(
        chosen.impl, logits_rows, args, bool(return_entropy), plan.estimator.name == "full", bool(inplace_backward), kept)
    return _penalty_outputs(plan, labels, flat_labels, logp, ref_logp, entropy if return_entropy else None, full_kl,
                            ref_logprobs, mask, kl_coef)


def _agree_shard(process_group, device, local_vocab, function, labels, plan, validate, has_ref, return_entropy,
                 temperature, mask, kept_ids, **transform):
    """The penalty's (VocabShard, kernel labels, kept set) (sharding.vocab_shard) from its plan."""
    return sharding.vocab_shard(process_group, device, local_vocab, validate, function, labels,
                                 estimator=(*plan.estimator, plan.layout), has_ref=has_ref,
                                 return_entropy=bool(return_entropy), ignore_index=plan.ignore_index,
                                 temperature=temperature, mask=mask, cu_seqlens=plan.cu_seqlens, kept_ids=kept_ids,
                                 **transform)
