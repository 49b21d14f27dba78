"""Autograd around a backend's fused pass.

A backend implements dispatch.FusedPass: `fused_kl_fwd(args, need_entropy, need_full)` -> RowStats and
`fused_kl_bwd(args, stats, grads, inplace)` -> the logits' gradient, on dispatch.PassArgs (reference.py
is the PyTorch truth; op_backend below adapts the C++ and Triton ops). The forward saves only O(N)
row statistics besides the inputs; the backward recomputes softmax from the saved log-sum-exp in one
more pass over the logits.
"""
from __future__ import annotations

import torch

from .dispatch import PassArgs, RowGrads, RowStats
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


def op_backend(fwd_op, bwd_op, bwd_inplace_op, row_dtype=None):
    """fused_kl_fwd / fused_kl_bwd of dispatch.FusedPass over a backend's three registered ops (the
    C++ ops and the Triton ops share one schema). The ops' temperature convention, the same for every
    backend: T itself, as an [N] tensor (None when scalar) plus a float (1.0 when a tensor); the
    shard as two ints, vocab_start and vocab_size.
    row_dtype: the dtype the ops want [N] inputs in (the Triton kernels read fp32), None for as given."""
    def rows(t):
        return None if t is None else (t if row_dtype is None else t.to(row_dtype)).contiguous()

    def common(args: PassArgs):
        temperature = args.temperature
        split = (rows(temperature), 1.0) if isinstance(temperature, torch.Tensor) else (None, float(temperature))
        return (args.logits, args.labels, args.ref_logits, *split, args.ignore_index, args.shard.start,
                args.shard.size)

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
