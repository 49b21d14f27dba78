"""Autograd around a backend's fused pass.

A backend provides `fused_kl_fwd` / `fused_kl_bwd` (see reference.py for the contract). The
forward saves only O(N) row statistics besides the inputs; the backward recomputes softmax from
the saved log-sum-exp in one more pass over the logits.
"""
from __future__ import annotations

import torch

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
    """shard: where the logits' columns sit in the vocabulary (sharding.VocabShard); with a process
    group the per-row statistics of every rank's shard are merged after the kernel (sharding.merge),
    and the backward's kernel gets the merged ones."""

    @staticmethod
    def forward(ctx, impl, logits, labels, ref_logits, temperature, ignore_index, shard, need_entropy, need_full,
                inplace):
        stats = impl.fused_kl_fwd(logits, labels, ref_logits, temperature, ignore_index, shard.start, shard.size,
                                  need_entropy, need_full)
        if shard.group is not None:
            stats = merge(shard, labels, ignore_index, *stats)
        logp, ref_logp, entropy, full_kl, lse, ref_lse = stats
        ctx.impl, ctx.ignore_index, ctx.shard, ctx.inplace = impl, ignore_index, shard, inplace
        ctx.set_materialize_grads(False)  # an unused output costs nothing in the backward
        ctx.scalar_temperature = None if isinstance(temperature, torch.Tensor) else temperature
        tensor_temperature = temperature if isinstance(temperature, torch.Tensor) else None
        ctx.save_for_backward(logits, labels, ref_logits if need_full else None, tensor_temperature,
                              lse, ref_lse if need_full else None, entropy, full_kl)
        if ref_logp is not None:
            ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp, entropy, full_kl

    @staticmethod
    def backward(ctx, grad_logp, grad_ref_logp, grad_entropy, grad_full):
        first_order_only()
        logits, labels, ref_logits, tensor_temperature, lse, ref_lse, entropy, full_kl = ctx.saved_tensors
        temperature = tensor_temperature if tensor_temperature is not None else ctx.scalar_temperature
        if grad_logp is None and grad_entropy is None and grad_full is None:
            return (None,) * 10
        grad = ctx.impl.fused_kl_bwd(grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                                     ctx.ignore_index, ctx.shard.start, ctx.shard.size, lse, ref_lse, entropy,
                                     full_kl, ctx.inplace)
        return None, grad, None, None, None, None, None, None, None, None


def op_backend(fwd_op, bwd_op, bwd_inplace_op, row_dtype=None):
    """fused_kl_fwd / fused_kl_bwd of the reference.py contract over a backend's three registered ops
    (the C++ ops and the Triton ops share one schema). The ops' temperature convention, the same for
    every backend: T itself, as an [N] tensor (None when scalar) plus a float (1.0 when a tensor).
    row_dtype: the dtype the ops want [N] inputs in (the Triton kernels read fp32), None for as given."""
    def rows(t):
        return None if t is None else (t if row_dtype is None else t.to(row_dtype)).contiguous()

    def split(temperature):
        if isinstance(temperature, torch.Tensor):
            return rows(temperature), 1.0
        return None, float(temperature)

    def fused_kl_fwd(logits, labels, ref_logits, temperature, ignore_index, vocab_start, vocab_size, need_entropy,
                     need_full):
        logp, ref_logp, entropy, full_kl, lse, ref_lse = fwd_op(
            logits, labels, ref_logits, *split(temperature), ignore_index, vocab_start, vocab_size, need_entropy,
            need_full)
        has_ref = ref_logits is not None
        return (logp, ref_logp if has_ref else None, entropy if need_entropy else None,
                full_kl if need_full else None, lse, ref_lse if has_ref else None)

    def fused_kl_bwd(grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                     ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy, full_kl, inplace):
        args = (rows(grad_logp), rows(grad_entropy), rows(grad_full), logits, labels, ref_logits, *split(temperature),
                ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy, full_kl)
        if inplace:
            bwd_inplace_op(*args)
            return logits
        return bwd_op(*args)

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
