"""The one adapter in front of every compiled backend (the C++ CPU and CUDA ops, the Triton ops): it
turns the kernel contract's records (contract.PassArgs, PenaltyArgs, RowGrads, PenaltyGrads) into
the ops' positional arguments, declared once here for every backend, and the ops' outputs back into
RowStats / PenaltyStats. The ops share one schema per op (csrc/registration.cpp; the Triton ops the
same signatures), and their fake (meta) implementations live here too.
"""
from __future__ import annotations

import torch

from ..contract import PassArgs, PenaltyArgs, PenaltyGrads, PenaltyStats, RowGrads, RowStats, compute_dtype
from ..estimators import ESTIMATOR_CODES


def _rows(t, dtype):
    """An [N] per-row input (temperature, an upstream gradient, given reference log-probs) as every
    compiled op takes it: contiguous, in the compute dtype."""
    return None if t is None else t.to(dtype).contiguous()


def _upstream(t, dtype):
    """An upstream gradient as every compiled op takes it: in the compute dtype, with its strides as
    autograd hands it over (the gradient of `out.kl_sum.sum()` arrives expanded, stride 0): the kernels
    index it by its stride, so no copy (a launch each on a GPU) precedes the backward op."""
    return None if t is None else t.to(dtype)


def _mask(t):
    """A mask as every compiled op takes it: contiguous, its dtype kept (every kernel reads nonzero of
    any real dtype; a conversion would be one more launch per call)."""
    return None if t is None else t.contiguous()


def _boundaries(t):
    """cu_seqlens as every compiled op takes it: contiguous int32 or int64 (another integer dtype
    becomes int64)."""
    return None if t is None else (t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int64)).contiguous()


def _tensor_or_float(value, convert=lambda t: t):
    """The ops' (Tensor?, float) pair for a value that is a tensor or a float: (tensor, 1.0) or (None, value)."""
    return (convert(value), 1.0) if isinstance(value, torch.Tensor) else (None, float(value))


def op_inputs(args: PassArgs, penalty: PenaltyArgs | None = None) -> dict:
    """Every [N] (and [S + 1]) input of the ops in the dtypes and layout all compiled backends take,
    before any op runs: so the C++ CPU, CUDA and Triton ops receive identical arguments, and a CPU test
    exercises exactly what the CUDA glue receives (whose checks accept nothing else): per-row values
    contiguous in the compute dtype, the mask contiguous, cu_seqlens contiguous int32/int64."""
    dtype = compute_dtype(args.logits.dtype)
    rows = lambda t: _rows(t, dtype)  # noqa: E731
    inputs = dict(temperature=_tensor_or_float(args.temperature, rows), rows=rows,
                  upstream=lambda t: _upstream(t, dtype))
    if penalty is not None:
        inputs.update(ref_logprobs=rows(penalty.ref_logprobs), mask=_mask(penalty.mask),
                      cu_seqlens=_boundaries(penalty.cu_seqlens),
                      kl_coef=_tensor_or_float(penalty.kl_coef, rows))
    return inputs


def _pass_inputs(args: PassArgs, inputs: dict) -> dict:
    """The row pass's arguments by their schema names (csrc/registration.cpp; the Triton ops' signatures
    carry the same names, tests/test_fused_kl_ops.py compares them): every op takes them so."""
    temperature, scalar_temperature = inputs["temperature"]
    return dict(logits=args.logits, labels=args.labels, ref_logits=args.ref_logits, temperature=temperature,
                scalar_temperature=scalar_temperature, ignore_index=args.ignore_index)


def _shard_inputs(args: PassArgs) -> dict:
    """The fused pass's shard (the one-pass penalty ops run unsharded and take none)."""
    return dict(vocab_start=args.shard.start, vocab_size=args.shard.size)


# the ops' names of each record's upstream gradients, in the record's order
_UPSTREAM_NAMES = {RowGrads: ("grad_logp", "grad_entropy", "grad_full"),
                   PenaltyGrads: ("grad_logp", "grad_kl", "grad_penalty", "grad_kl_sum", "grad_kl_mean", "grad_entropy")}


def _upstream_inputs(grads, inputs: dict) -> dict:
    """Upstream gradients (RowGrads, PenaltyGrads) by the ops' argument names."""
    return dict(zip(_UPSTREAM_NAMES[type(grads)], map(inputs["upstream"], grads)))


def op_backend(fwd_op, bwd_op, bwd_inplace_op):
    """fused_kl_fwd / fused_kl_bwd of contract.FusedPass over a backend's three registered ops (the
    C++ ops and the Triton ops share one schema), called by the schema's argument names. The ops'
    temperature convention, the same for every backend: T itself, as an [N] tensor (None when scalar)
    plus a float (1.0 when a tensor); the shard as two ints, vocab_start and vocab_size; [N] inputs as
    op_inputs makes them."""

    def fused_kl_fwd(args: PassArgs, need_entropy: bool, need_full: bool) -> RowStats:
        logp, ref_logp, entropy, full_kl, lse, ref_lse = fwd_op(**_pass_inputs(args, op_inputs(args)),
                                                                **_shard_inputs(args), need_entropy=need_entropy,
                                                                need_full=need_full)
        has_ref = args.ref_logits is not None
        return RowStats(logp, ref_logp if has_ref else None, entropy if need_entropy else None,
                        full_kl if need_full else None, lse, ref_lse if has_ref else None)

    def fused_kl_bwd(args: PassArgs, stats: RowStats, grads: RowGrads, inplace: bool) -> torch.Tensor:
        inputs = op_inputs(args)
        op_args = dict(**_upstream_inputs(grads, inputs), **_pass_inputs(args, inputs), **_shard_inputs(args),
                       lse=stats.lse, ref_lse=stats.ref_lse, entropy=stats.entropy, full_kl=stats.full_kl)
        if inplace:
            bwd_inplace_op(**op_args)
            return args.logits
        return bwd_op(**op_args)

    return fused_kl_fwd, fused_kl_bwd


def _penalty_inputs(args: PassArgs, penalty: PenaltyArgs, inputs: dict) -> dict:
    """kl_penalty's arguments by their schema names (both one-pass ops; the forward adds ref_logprobs,
    cu_seqlens, padded and need_entropy, the backward its upstream gradients and the saved outputs)."""
    est = penalty.estimator
    kl_coef, scalar_kl_coef = inputs["kl_coef"]
    return dict(_pass_inputs(args, inputs), mask=inputs["mask"], estimator=ESTIMATOR_CODES[est.name],
                straight_through=est.straight_through, log_ratio_clamp=est.log_ratio_clamp, kl_clamp=est.kl_clamp,
                kl_coef=kl_coef, scalar_kl_coef=scalar_kl_coef)


def penalty_op_backend(fwd_op, bwd_op, bwd_inplace_op):
    """kl_penalty_fwd / kl_penalty_bwd of contract.OnePass over a backend's three one-pass ops (one
    schema for the C++ and Triton ops, csrc/registration.cpp), in op_backend's conventions."""

    def kl_penalty_fwd(args: PassArgs, penalty: PenaltyArgs, need_entropy: bool) -> PenaltyStats:
        inputs = op_inputs(args, penalty)
        out = fwd_op(**_penalty_inputs(args, penalty, inputs), ref_logprobs=inputs["ref_logprobs"], cu_seqlens=inputs["cu_seqlens"],
                     padded=penalty.padded, need_entropy=need_entropy)
        stats = PenaltyStats(*out)
        return stats._replace(entropy=stats.entropy if need_entropy else None,
                              full_kl=stats.full_kl if penalty.estimator.name == "full" else None,
                              ref_lse=stats.ref_lse if args.ref_logits is not None else None)

    def kl_penalty_bwd(args: PassArgs, penalty: PenaltyArgs, stats: PenaltyStats, grads: PenaltyGrads,
                       inplace: bool) -> torch.Tensor:
        inputs = op_inputs(args, penalty)
        op_args = dict(**_upstream_inputs(grads, inputs), **_penalty_inputs(args, penalty, inputs), logp=stats.logp,
                       ref_logp=stats.ref_logp, counts=stats.counts, sequence=stats.sequence, lse=stats.lse,
                       ref_lse=stats.ref_lse, entropy=stats.entropy, full_kl=stats.full_kl)
        if inplace:
            bwd_inplace_op(**op_args)
            return args.logits
        return bwd_op(**op_args)

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
    in the compute dtype, but lse and ref_lse (saved for the backward) in float64 whatever the logits
    (csrc/fused_kl_math.h saved_lse); one not asked for is empty. Every fused forward op allocates (or
    fakes) these."""
    dtype = compute_dtype(logits.dtype)
    rows = logits.shape[0] * logits.shape[1]
    new = lambda needed, kind=dtype: logits.new_empty((rows if needed else 0,), dtype=kind)  # noqa: E731
    return (new(True), new(has_ref), new(need_entropy), new(need_full), new(True, torch.float64),
            new(has_ref, torch.float64))


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

    @torch.library.register_fake("kl_kernels::kept_counts")
    def _kept_counts(ids, columns):
        return ids.new_empty(ids.shape, dtype=torch.bool)
