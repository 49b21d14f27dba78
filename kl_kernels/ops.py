"""Autograd around a backend's fused pass.

A backend implements dispatch.FusedPass: `fused_kl_fwd(args, need_entropy, need_full)` -> RowStats and
`fused_kl_bwd(args, stats, grads, inplace)` -> the logits' gradient, on dispatch.PassArgs (reference.py
is the PyTorch truth; op_backend below adapts the C++ and Triton ops). The forward saves only O(N)
row statistics besides the inputs; the backward recomputes softmax from the saved log-sum-exp in one
more pass over the logits.
"""
from __future__ import annotations

import torch

from .dispatch import PassArgs, PenaltyArgs, PenaltyGrads, PenaltyStats, RowGrads, RowStats
from .estimators import ESTIMATOR_CODES
from .sharding import merge


def first_order_only() -> None:
    """Called first in every kernel-backed backward. The kernels compute first derivatives only:
    with create_graph=True autograd would record them as constants, and a double backward (a
    gradient penalty, a Hessian-vector product) would be silently wrong, so it is an error."""
    if torch.is_grad_enabled():
        raise RuntimeError("kl_kernels computes first-order gradients only: backward with create_graph=True "
                           "(double backward) is not supported by any backend; for second-order terms compute "
                           "the log-probs with torch.log_softmax instead")


class FusedKLFunction(torch.autograd.Function):
    """The fused pass with autograd: args is a PassArgs whose logits are the `logits` argument (given
    separately so that autograd sees them). With a sharded vocabulary (args.shard.group) the per-row
    statistics of every rank's shard are merged after the kernel (sharding.merge), and the backward's
    kernel gets the merged ones."""

    @staticmethod
    def forward(ctx, impl, logits, args, need_entropy, need_full, inplace):
        args = args._replace(logits=logits)
        stats = impl.fused_kl_fwd(args, need_entropy, need_full)
        if args.shard.group is not None:
            stats = merge(args, stats)
        ctx.impl, ctx.inplace = impl, inplace
        ctx.set_materialize_grads(False)  # an unused output costs nothing in the backward
        tensor_temperature = args.temperature if isinstance(args.temperature, torch.Tensor) else None
        # the tensors are saved, the rest of args kept as is; the reference only for `full`'s gradient
        ctx.args = args._replace(logits=None, labels=None, ref_logits=None,
                                 temperature=None if tensor_temperature is not None else args.temperature)
        ctx.save_for_backward(logits, args.labels, args.ref_logits if need_full else None, tensor_temperature,
                              stats.lse, stats.ref_lse if need_full else None, stats.entropy, stats.full_kl)
        if stats.ref_logp is not None:
            ctx.mark_non_differentiable(stats.ref_logp)
        return stats.logp, stats.ref_logp, stats.entropy, stats.full_kl

    @staticmethod
    def backward(ctx, grad_logp, grad_ref_logp, grad_entropy, grad_full):
        first_order_only()
        logits, labels, ref_logits, tensor_temperature, lse, ref_lse, entropy, full_kl = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None and grad_full is None:
            return (None,) * 6
        temperature = tensor_temperature if tensor_temperature is not None else ctx.args.temperature
        args = ctx.args._replace(logits=logits, labels=labels, ref_logits=ref_logits, temperature=temperature)
        stats = RowStats(None, None, entropy, full_kl, lse, ref_lse)
        grad = ctx.impl.fused_kl_bwd(args, stats, RowGrads(grad_logp, grad_entropy, grad_full), ctx.inplace)
        return None, grad, None, None, None, None


class FusedPenaltyFunction(torch.autograd.Function):
    """kl_penalty in a backend's one-pass ops (dispatch.OnePass): one forward op, one backward op
    taking the upstream gradients of all six differentiable outputs. kl_coef is given separately
    (None when a float) so that a kl_coef tensor that requires grad gets -sum(g_penalty * kl)."""

    @staticmethod
    def forward(ctx, impl, logits, kl_coef, args, penalty, need_entropy, inplace):
        args = args._replace(logits=logits)
        stats = impl.kl_penalty_fwd(args, penalty, need_entropy)
        ctx.impl, ctx.inplace = impl, inplace
        ctx.set_materialize_grads(False)
        full = penalty.estimator.name == "full"
        tensor_temperature = args.temperature if isinstance(args.temperature, torch.Tensor) else None
        ctx.args = args._replace(logits=None, labels=None, ref_logits=None,
                                 temperature=None if tensor_temperature is not None else args.temperature)
        ctx.penalty = penalty._replace(ref_logprobs=None, mask=None, cu_seqlens=None,
                                       kl_coef=None if kl_coef is not None else penalty.kl_coef)
        coef_grad = kl_coef is not None and kl_coef.requires_grad
        ctx.save_for_backward(
            logits, args.labels, args.ref_logits if full else None, tensor_temperature, penalty.mask, kl_coef,
            stats.logp, stats.ref_logp, stats.counts, stats.sequence, stats.lse, stats.ref_lse if full else None,
            stats.entropy, stats.full_kl, stats.kl if coef_grad else None)
        ctx.mark_non_differentiable(stats.ref_logp)
        return stats.logp, stats.ref_logp, stats.kl, stats.penalty, stats.kl_sum, stats.kl_mean, stats.entropy

    @staticmethod
    def backward(ctx, g_logp, g_ref_logp, g_kl, g_penalty, g_kl_sum, g_kl_mean, g_entropy):
        first_order_only()
        (logits, labels, ref_logits, tensor_temperature, mask, kl_coef, logp, ref_logp, counts, sequence, lse,
         ref_lse, entropy, full_kl, kl) = ctx.saved_tensors
        grads = PenaltyGrads(g_logp, g_kl, g_penalty, g_kl_sum, g_kl_mean, g_entropy)
        coef_grad = None if kl is None or g_penalty is None else -(g_penalty * kl).sum().to(kl_coef.dtype)
        if all(g is None for g in grads) or not ctx.needs_input_grad[1]:
            return None, None, coef_grad, None, None, None, None
        temperature = tensor_temperature if tensor_temperature is not None else ctx.args.temperature
        args = ctx.args._replace(logits=logits, labels=labels, ref_logits=ref_logits, temperature=temperature)
        penalty = ctx.penalty._replace(mask=mask, kl_coef=kl_coef if kl_coef is not None else ctx.penalty.kl_coef)
        stats = PenaltyStats(logp, ref_logp, None, None, None, None, counts, sequence, entropy, full_kl, lse, ref_lse)
        grad = ctx.impl.kl_penalty_bwd(args, penalty, stats, grads, ctx.inplace)
        return None, grad, coef_grad, None, None, None, None


def _row_converter(row_dtype):
    """[N] inputs as the ops want them: contiguous, in row_dtype when given (the Triton kernels read fp32)."""
    def rows(t):
        return None if t is None else (t if row_dtype is None else t.to(row_dtype)).contiguous()
    return rows


def _tensor_or_float(value, convert=lambda t: t):
    """The ops' (Tensor?, float) pair for a value that is a tensor or a float: (tensor, 1.0) or (None, value)."""
    return (convert(value), 1.0) if isinstance(value, torch.Tensor) else (None, float(value))


def op_backend(fwd_op, bwd_op, bwd_inplace_op, row_dtype=None):
    """fused_kl_fwd / fused_kl_bwd of dispatch.FusedPass over a backend's three registered ops (the
    C++ ops and the Triton ops share one schema). The ops' temperature convention, the same for every
    backend: T itself, as an [N] tensor (None when scalar) plus a float (1.0 when a tensor); the
    shard as two ints, vocab_start and vocab_size.
    row_dtype: the dtype the ops want [N] inputs in (the Triton kernels read fp32), None for as given."""
    rows = _row_converter(row_dtype)

    def common(args: PassArgs):
        return (args.logits, args.labels, args.ref_logits, *_tensor_or_float(args.temperature, rows),
                args.ignore_index, args.shard.start, args.shard.size)

    def fused_kl_fwd(args: PassArgs, need_entropy: bool, need_full: bool) -> RowStats:
        logp, ref_logp, entropy, full_kl, lse, ref_lse = fwd_op(*common(args), need_entropy, need_full)
        has_ref = args.ref_logits is not None
        return RowStats(logp, ref_logp if has_ref else None, entropy if need_entropy else None,
                        full_kl if need_full else None, lse, ref_lse if has_ref else None)

    def fused_kl_bwd(args: PassArgs, stats: RowStats, grads: RowGrads, inplace: bool) -> torch.Tensor:
        op_args = (*map(rows, grads), *common(args), stats.lse, stats.ref_lse, stats.entropy, stats.full_kl)
        if inplace:
            bwd_inplace_op(*op_args)
            return args.logits
        return bwd_op(*op_args)

    return fused_kl_fwd, fused_kl_bwd


def penalty_op_backend(fwd_op, bwd_op, bwd_inplace_op, row_dtype=None):
    """kl_penalty_fwd / kl_penalty_bwd of dispatch.OnePass over a backend's three one-pass ops (one
    schema for the C++ and Triton ops, csrc/registration.cpp), in op_backend's conventions."""
    rows = _row_converter(row_dtype)

    def common(args: PassArgs, penalty: PenaltyArgs):
        est = penalty.estimator
        return (*_tensor_or_float(args.temperature, rows), args.ignore_index, ESTIMATOR_CODES[est.name],
                est.straight_through, est.log_ratio_clamp, est.kl_clamp, *_tensor_or_float(penalty.kl_coef))

    def kl_penalty_fwd(args: PassArgs, penalty: PenaltyArgs, need_entropy: bool) -> PenaltyStats:
        out = fwd_op(args.logits, args.labels, args.ref_logits, penalty.ref_logprobs, penalty.mask, penalty.cu_seqlens,
                     *common(args, penalty), penalty.padded, need_entropy)
        stats = PenaltyStats(*out)
        return stats._replace(entropy=stats.entropy if need_entropy else None,
                              full_kl=stats.full_kl if penalty.estimator.name == "full" else None,
                              ref_lse=stats.ref_lse if args.ref_logits is not None else None)

    def kl_penalty_bwd(args: PassArgs, penalty: PenaltyArgs, stats: PenaltyStats, grads: PenaltyGrads,
                       inplace: bool) -> torch.Tensor:
        op_args = (*map(rows, grads), args.logits, args.labels, args.ref_logits, penalty.mask, *common(args, penalty),
                   stats.logp, stats.ref_logp, stats.counts, stats.sequence, stats.lse, stats.ref_lse, stats.entropy,
                   stats.full_kl)
        if inplace:
            bwd_inplace_op(*op_args)
            return args.logits
        return bwd_op(*op_args)

    return kl_penalty_fwd, kl_penalty_bwd


def penalty_outputs(logits, padded, cu_seqlens, has_ref, need_entropy, need_full):
    """The one-pass forward's twelve outputs, uninitialised (fwd_outputs' six plus kl, penalty, the [S]
    kl_sum, kl_mean, counts and the [N] int32 sequence ids), in kl_penalty_fwd's order."""
    logp, ref_logp, entropy, full_kl, lse, ref_lse = fwd_outputs(logits, has_ref, need_entropy, need_full)
    B, T = logits.shape[:2]
    S = B if padded else (1 if cu_seqlens is None else max(cu_seqlens.shape[0] - 1, 0))
    new = lambda n: logp.new_empty((n,))  # noqa: E731
    return (logp, new(B * T) if not has_ref else ref_logp, new(B * T), new(B * T), new(S), new(S), new(S),
            logp.new_empty((B * T,), dtype=torch.int32), entropy, full_kl, lse, ref_lse)


def fwd_outputs(logits, has_ref, need_entropy, need_full):
    """The forward's six [N] outputs (logp, ref_logp, entropy, full_kl, lse, ref_lse), uninitialised,
    in the compute dtype; one not asked for is empty. Every fused forward op allocates (or fakes) these."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits.shape[0] * logits.shape[1]
    new = lambda needed: logits.new_empty((rows if needed else 0,), dtype=dtype)  # noqa: E731
    return new(True), new(has_ref), new(need_entropy), new(need_full), new(True), new(has_ref)


def register_fakes() -> None:
    """Shape-only (meta) versions of the C++ ops, for torch.compile and opcheck. Called once the
    extension that defines the schemas has loaded."""

    @torch.library.register_fake("kl_kernels::fused_kl_fwd")
    def _fwd(logits, labels, ref_logits, temperature, scalar_temperature, ignore_index, vocab_start, vocab_size,
             need_entropy, need_full):
        return fwd_outputs(logits, ref_logits is not None, need_entropy, need_full)

    @torch.library.register_fake("kl_kernels::fused_kl_bwd")
    def _bwd(grad_logp, grad_entropy, grad_full, logits, *rest):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("kl_kernels::fused_kl_bwd_")
    def _bwd_inplace(*args):
        return None

    @torch.library.register_fake("kl_kernels::kl_penalty_fwd")
    def _penalty_fwd(logits, labels, ref_logits, ref_logprobs, mask, cu_seqlens, temperature, scalar_temperature,
                     ignore_index, estimator, straight_through, log_ratio_clamp, kl_clamp, kl_coef, scalar_kl_coef,
                     padded, need_entropy):
        return penalty_outputs(logits, padded, cu_seqlens, ref_logits is not None, need_entropy,
                               estimator == ESTIMATOR_CODES["full"])

    @torch.library.register_fake("kl_kernels::kl_penalty_bwd")
    def _penalty_bwd(*args):
        logits = args[6]
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("kl_kernels::kl_penalty_bwd_")
    def _penalty_bwd_inplace(*args):
        return None
