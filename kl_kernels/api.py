"""Public entry points of the fused pass from logits: token_logprobs and kl_penalty (docs/contract.md
sections 1-2), each its prologue (plan.py), one autograd Function over the row pass (rows.py) and, for
a penalty off the one-pass ops, the epilogue (penalty.py).

kl_penalty on a kernel backend (cpu, triton, cuda) is one op each way (two with kept_ids): the kernels
compute the estimator, masks, penalty and per-sequence sums too (contract.OnePass). Otherwise (the
reference backend, a tensor-parallel call whose row statistics are merged across ranks first) the row
pass is followed by penalty.outputs: the same estimator in PyTorch ops (estimators.py, the truth).
"""
from __future__ import annotations

import torch

from . import replay, rows
from . import validation as check
from .contract import PassArgs, PenaltyArgs, PenaltyGrads, PenaltyStats, RowGrads, RowStats
from .penalty import KLPenaltyOutput
from .penalty import outputs as penalty_outputs
from .plan import device_of
from .plan import make as make_plan
from .rows import first_order_only

__all__ = ["KLPenaltyOutput", "kl_penalty", "token_logprobs"]


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


def _check_logits_labels(logits, labels, inplace_backward=False):
    check.floating(logits, "logits")
    if inplace_backward:
        check.inplace_target(logits)
    check.integer(labels, "labels")
    check.shape(labels, logits.shape[:-1], "labels", "the logits' shape without the vocabulary dim")
    check.same_device(logits.device, labels=labels)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   validate=True, inplace_backward=False, process_group=None, backend=None, kept_ids=None):
    """Label log-probs z_y/T - lse(z/T) in float32 (float64 for float64 logits), optionally entropy.
    process_group: logits hold this rank's shard of the vocabulary (docs/contract.md section 10).
    kept_ids: [..., K] the sampler's kept token ids per position, -1 padding: each row's softmax over
    its kept set (section 12)."""
    def check_inputs():
        _check_logits_labels(logits, labels, inplace_backward)
        return (logits.dtype,), logits, logits.shape[-1]

    plan = make_plan("token_logprobs", process_group=process_group, device=device_of(logits), labels=labels,
                     validate=validate, check_inputs=check_inputs, temperature=temperature, ignore_index=ignore_index,
                     return_entropy=return_entropy, kept_ids=kept_ids, backend=backend)
    logits_rows = _as_rows(logits)
    logp, _, entropy, _ = FusedKLFunction.apply(plan.backend.impl, logits_rows, plan.args, bool(return_entropy),
                                                False, bool(inplace_backward), plan.kept)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def kl_penalty(logits, labels, *, ref_logits=None, ref_logprobs=None, mask=None, cu_seqlens=None,
               kl_coef=0.1, estimator="k1", temperature=1.0, log_ratio_clamp=None, kl_clamp=None,
               ignore_index=-100, return_entropy=False, validate=True, inplace_backward=False, process_group=None,
               backend=None, kept_ids=None):
    """The fused KL penalty pass; see docs/contract.md section 2 for every field of the result
    (section 10 for process_group: logits and ref_logits hold this rank's shard of the vocabulary;
    section 12 for kept_ids, the sampler's kept sets: policy and reference renormalised over them)."""
    def check_inputs():
        _check_logits_labels(logits, labels, inplace_backward)
        if logits.dim() not in (2, 3):
            raise ValueError(f"logits must be [B, T, V] (padded) or [N, V] (packed), got shape {tuple(logits.shape)}")
        if ref_logits is None:
            return (logits.dtype,), logits, logits.shape[-1]
        check.floating(ref_logits, "ref_logits")
        check.shape(ref_logits, logits.shape, "ref_logits", "the logits' shape")
        check.same_device(logits.device, ref_logits=ref_logits)
        return (logits.dtype, ref_logits.dtype), logits, logits.shape[-1]

    plan = make_plan(
        "kl_penalty", process_group=process_group, device=device_of(logits), labels=labels, validate=validate,
        check_inputs=check_inputs, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, kept_ids=kept_ids, backend=backend,
        penalty=dict(source=("logits", getattr(logits, "shape", ())), ref_logprobs=ref_logprobs, mask=mask,
                     cu_seqlens=cu_seqlens, kl_coef=kl_coef, estimator=estimator, log_ratio_clamp=log_ratio_clamp,
                     kl_clamp=kl_clamp, has_ref_model=ref_logits is not None))
    args = plan.args._replace(ref_logits=None if ref_logits is None else _as_rows(ref_logits))
    logits_rows, layout = _as_rows(logits), plan.penalty
    if args.shard.group is None and plan.backend.one_pass(logits.device):
        # the whole penalty in the backend's ops: one forward op, one backward op (one more each way over
        # the kept columns with kept_ids)
        coef = kl_coef.to(device=logits.device, dtype=layout.dtype) if isinstance(kl_coef, torch.Tensor) else None
        penalty_args = PenaltyArgs(layout.estimator, None if ref_logprobs is None else ref_logprobs.detach().reshape(-1),
                                   None if mask is None else mask.reshape(-1), layout.layout == "padded",
                                   layout.cu_seqlens, float(kl_coef) if coef is None else coef)
        outputs = FusedPenaltyFunction.apply(plan.backend.impl, logits_rows, coef, args, penalty_args,
                                             bool(return_entropy), bool(inplace_backward), plan.kept)
        shape = labels.shape
        return KLPenaltyOutput(*(t.view(shape) for t in outputs[:4]), *outputs[4:6],
                               outputs[6].view(shape) if return_entropy else None)
    logp, ref_logp, entropy, full_kl = FusedKLFunction.apply(
        plan.backend.impl, logits_rows, args, bool(return_entropy), layout.estimator.name == "full",
        bool(inplace_backward), plan.kept)
    return penalty_outputs(layout, labels, args.labels, logp, ref_logp, entropy if return_entropy else None, full_kl,
                           ref_logprobs, mask, kl_coef)
