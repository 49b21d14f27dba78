"""The `triton` backend: the fused pass over the logits as Triton kernels (the reference.py contract).

Forward, one program per row: the policy row and (when given) the reference row are read once,
tile by tile, into running online log-sum-exp sums kept in raw logit units with the temperature
inside exp, as csrc/fused_kl_math.h does for the C++ kernels:
    s  = sum_v e_v,  sx = sum_v e_v (z_v - m),  sd = sum_v e_v (z_v - z'_v),   e_v = exp((z_v - m) / T)
    lse = m/T + log s,  H = log s - (sx/T)/s,  KL(p||q) = (sd/T)/s - lse + ref_lse.
The label logits are single loads. Outputs are [N] float32. The estimator, masks and sequence
sums are O(N) and stay in api.py's epilogue, shared by every backend (one definition of each
estimator), so these kernels never depend on the estimator.

Backward, one program per row: p is recomputed from the saved lse and the gradient written in
the logits' dtype (into the logits themselves with inplace_backward).

One program per row is deterministic (a fixed reduction order); no atomics. Row offsets are
int64. The ops are torch.library.triton_op, so torch.compile(fullgraph=True) traces them.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from ..ops import fwd_outputs, op_backend

# TRITON_INTERPRET=1 (CPU tests): @triton.jit gives interpreted kernels, which wrap_triton hands
# back unwrapped, so torch.compile would run them on fake tensors. There the ops are plain custom
# ops with shape-only fakes (opaque to the compiler); compiled kernels use triton_op, which lets
# torch.compile see the kernels themselves.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_register_op = custom_op if INTERPRETED else triton_op

# Largest vocabulary tile: 4096 values over 8 warps is 16 per thread, two 16-byte loads in bf16.
# Tests lower it to force several tiles per row on small vocabularies.
MAX_BLOCK_V = 4096


@triton.jit
def _online_lse_step(m, x, inv_t):
    """One tile of the online log-sum-exp, shared by every kernel here.

    m: running max of the row so far (raw units, -inf at the start); x: [BLOCK_V] fp32 raw logits,
    -inf off the row. Returns the new running max, the factor that moves sums kept around m to it,
    and the tile's terms e = exp((x - m_new)/T). NaN in x reaches e and so every sum.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # all -inf so far (banned tokens, the padding of a tile): exp(-inf - -inf) must not be NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp((m - m_safe) * inv_t), tl.exp((x - m_safe) * inv_t)


@triton.jit
def _log_sum_exp(m, s, inv_t):
    """lse of a row from its online sums (raw max m, sum s). +inf (a +inf logit, or one that
    overflows once divided by T) leaves no softmax: NaN, so the row is NaN (csrc/fused_kl_math.h)."""
    lse = m * inv_t + tl.log(s)
    return tl.where(lse == float("inf"), float("nan"), lse)


@triton.jit
def _label_logprob(z_y, m, s, inv_t, lse):
    """(z_y - m)/T - log s, not z_y/T - lse: a confident token (z_y = m) keeps its digits; NaN with
    the row's lse (csrc/fused_kl_math.h's label_logprob)."""
    return (z_y * inv_t - m * inv_t) - tl.log(s) + (lse - lse)


@triton.jit
def _row_start(base_ptr, row, T, stride_b, stride_t):
    # row n = b*T + t of a [B, T, V] tensor with any row strides; row is int64, so the offsets are
    # too (B*T*V overflows int32)
    return base_ptr + (row // T) * stride_b + (row % T) * stride_t


@triton.jit
def _inverse_temperature(temperature_ptr, row, INV_TEMPERATURE: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr):
    # 1/T of this row: from the [N] temperature tensor, or the constant of a float temperature
    if HAS_TEMPERATURE_TENSOR:
        inv_t = 1.0 / tl.load(temperature_ptr + row).to(tl.float32)
    else:
        inv_t = tl.full((), INV_TEMPERATURE, tl.float32)
    return inv_t


@triton.jit
def _weighted(e, w):
    # e * w with 0 where e == 0: a -inf logit (e = 0, w = -inf) adds nothing instead of NaN
    return tl.sum(tl.where(e == 0.0, 0.0, e * w), axis=0)


@triton.jit
def _fused_kl_fwd_kernel(
    logits_ptr,  # [B, T, V] fp16/bf16/fp32 policy logits, vocabulary dim contiguous
    ref_logits_ptr,  # [B, T, V] reference logits, any of those dtypes (unused without HAS_REF)
    labels_ptr,  # [N] int64
    temperature_ptr,  # [N] fp32 per-row temperature (unused without HAS_TEMPERATURE_TENSOR)
    logp_ptr, ref_logp_ptr, entropy_ptr, full_kl_ptr, lse_ptr, ref_lse_ptr,  # [N] fp32 outputs
    T, V, ignore_index, vocab_start, vocab_size,  # the columns are ids [vocab_start, vocab_start + V) of vocab_size
    stride_logits_b, stride_logits_t, stride_ref_b, stride_ref_t,
    INV_TEMPERATURE: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr, HAS_REF: tl.constexpr,
    NEED_ENTROPY: tl.constexpr, NEED_FULL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_start(logits_ptr, row, T, stride_logits_b, stride_logits_t)
    ref_row_ptr = _row_start(ref_logits_ptr, row, T, stride_ref_b, stride_ref_t)
    inv_t = _inverse_temperature(temperature_ptr, row, INV_TEMPERATURE, HAS_TEMPERATURE_TENSOR)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # an ignored row (prompt tokens, padding) is 0 in every output: none of it is read
    row_len = tl.where(valid, V, 0)

    m = float("-inf")
    s = 0.0
    sx = 0.0
    sd = 0.0
    ref_m = float("-inf")
    ref_s = 0.0
    for v0 in range(0, row_len, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_row = cols < V
        x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        m_old = m
        m, scale, e = _online_lse_step(m, x, inv_t)
        if NEED_ENTROPY:
            # sx around the running max: sum e (x - m_new) = (sum e_old (x - m_old) + (m_old - m_new) s_old)
            # * scale; nothing summed while m_old is -inf (and -inf * 0 would be NaN)
            shift = tl.where(m_old == float("-inf"), 0.0, m_old - m)
            sx = (sx + shift * s) * scale + _weighted(e, x - m)
        s = s * scale + tl.sum(e, axis=0)
        if HAS_REF:
            xr = tl.load(ref_row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            if NEED_FULL:
                sd = sd * scale + _weighted(e, x - xr)
            ref_m, ref_scale, ref_e = _online_lse_step(ref_m, xr, inv_t)
            ref_s = ref_s * ref_scale + tl.sum(ref_e, axis=0)

    lse = _log_sum_exp(m, s, inv_t)
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    # a label outside the vocabulary only gets here with validate=False: its row is NaN, nothing is
    # read; one in another rank's shard (kl_kernels/sharding.py) has no mass here: log-prob -inf
    bad = tl.where((label >= 0) & (label < vocab_size), 0.0, float("nan"))  # added to each output of the row
    col = label - vocab_start
    owned = (col >= 0) & (col < V)
    safe_col = tl.where(owned, col, 0)
    z_y = tl.load(row_ptr + safe_col, mask=valid & owned, other=0.0).to(tl.float32)
    logp = tl.where(owned, _label_logprob(z_y, m, s, inv_t, lse), float("-inf"))
    tl.store(logp_ptr + row, tl.where(valid, logp + bad, 0.0))
    if NEED_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, tl.log(s) - sx * inv_t / s + (lse - lse) + bad, 0.0))
    if HAS_REF:
        ref_lse = _log_sum_exp(ref_m, ref_s, inv_t)
        tl.store(ref_lse_ptr + row, tl.where(valid, ref_lse, 0.0))
        ref_z_y = tl.load(ref_row_ptr + safe_col, mask=valid & owned, other=0.0).to(tl.float32)
        ref_logp = tl.where(owned, _label_logprob(ref_z_y, ref_m, ref_s, inv_t, ref_lse), float("-inf"))
        tl.store(ref_logp_ptr + row, tl.where(valid, ref_logp + bad, 0.0))
        if NEED_FULL:
            tl.store(full_kl_ptr + row, tl.where(valid, sd * inv_t / s - lse + ref_lse + bad, 0.0))


@triton.jit
def _fused_kl_bwd_kernel(
    grad_ptr,  # [B, T, V] output gradient in the logits' dtype (the logits themselves if in place)
    logits_ptr,  # [B, T, V] fp16/bf16/fp32 policy logits
    ref_logits_ptr,  # [B, T, V] reference logits (only with HAS_GRAD_FULL)
    labels_ptr,  # [N] int64
    temperature_ptr,  # [N] fp32 (only with HAS_TEMPERATURE_TENSOR)
    grad_logp_ptr, grad_entropy_ptr, grad_full_ptr,  # [N] fp32 upstream gradients (each optional)
    lse_ptr, ref_lse_ptr, entropy_ptr, full_kl_ptr,  # [N] fp32 saved by the forward
    T, V, ignore_index, vocab_start, vocab_size,
    stride_grad_b, stride_grad_t, stride_logits_b, stride_logits_t, stride_ref_b, stride_ref_t,
    INV_TEMPERATURE: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, HAS_GRAD_FULL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """d/dz_v = (g_logp [v == y] + p_v f_v) / T, f_v = -g_logp - g_H (log p_v + H) + g_F (log p_v - log q_v - KL)."""
    row = tl.program_id(0).to(tl.int64)
    grad_row_ptr = _row_start(grad_ptr, row, T, stride_grad_b, stride_grad_t)
    row_ptr = _row_start(logits_ptr, row, T, stride_logits_b, stride_logits_t)
    ref_row_ptr = _row_start(ref_logits_ptr, row, T, stride_ref_b, stride_ref_t)
    inv_t = _inverse_temperature(temperature_ptr, row, INV_TEMPERATURE, HAS_TEMPERATURE_TENSOR)
    label = tl.load(labels_ptr + row)
    g_logp = 0.0
    g_entropy = 0.0
    g_full = 0.0
    entropy = 0.0
    kl = 0.0
    ref_lse = 0.0
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    if HAS_GRAD_FULL:
        g_full = tl.load(grad_full_ptr + row)
        kl = tl.load(full_kl_ptr + row)
        ref_lse = tl.load(ref_lse_ptr + row)
    # rows nothing flows back from (ignored, masked) get an exact 0, NaN logits or not, and are
    # not read at all
    keep = (label != ignore_index) & ((g_logp != 0.0) | (g_entropy != 0.0) | (g_full != 0.0))
    read_len = tl.where(keep, V, 0)
    lse = tl.load(lse_ptr + row)
    bad = tl.where((label >= 0) & (label < vocab_size), 0.0, float("nan"))  # validate=False only: a NaN row
    col = label - vocab_start  # the label's column here; outside [0, V) (another shard) it matches none
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_row = cols < V
        x = tl.load(row_ptr + cols, mask=cols < read_len, other=0.0).to(tl.float32)
        log_p = x * inv_t - lse
        f = -g_logp + tl.zeros_like(log_p)
        if HAS_GRAD_ENTROPY:
            f -= g_entropy * (log_p + entropy)
        if HAS_GRAD_FULL:
            xr = tl.load(ref_row_ptr + cols, mask=cols < read_len, other=0.0).to(tl.float32)
            # full's term only where its gradient flows: a masked row's reference NaN stays out
            f += tl.where(g_full != 0.0, g_full * (log_p - (xr * inv_t - ref_lse) - kl), 0.0)
        p = tl.exp(log_p)
        # p == 0 (a -inf logit): the term is 0, not 0 * inf; the label's own term needs no p
        g = tl.where(p == 0.0, 0.0, p * f) + tl.where(cols == col, g_logp, 0.0)
        g = tl.where(keep, g * inv_t + bad, 0.0)
        tl.store(grad_row_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def _launch_config(V: int) -> tuple[int, int]:
    block_v = min(triton.next_power_of_2(max(V, 1)), MAX_BLOCK_V)
    return block_v, 8 if block_v >= 4096 else 4


@_register_op("kl_kernels::triton_fused_kl_fwd", mutates_args=())
def _fwd_op(logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor],
            temperature: Optional[torch.Tensor], scalar_temperature: float, ignore_index: int, vocab_start: int,
            vocab_size: int, need_entropy: bool, need_full: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, V = logits.shape
    N = B * T
    has_ref = ref_logits is not None
    logp, ref_logp, entropy, full_kl, lse, ref_lse = fwd_outputs(logits, has_ref, need_entropy, need_full)
    if N > 0:
        ref = ref_logits if has_ref else logits
        block_v, num_warps = _launch_config(V)
        wrap_triton(_fused_kl_fwd_kernel)[(N,)](
            logits, ref, labels, logp if temperature is None else temperature,
            logp, ref_logp, entropy, full_kl, lse, ref_lse,
            T, V, ignore_index, vocab_start, vocab_size, logits.stride(0), logits.stride(1), ref.stride(0), ref.stride(1),
            INV_TEMPERATURE=1.0 / scalar_temperature, HAS_TEMPERATURE_TENSOR=temperature is not None, HAS_REF=has_ref,
            NEED_ENTROPY=need_entropy, NEED_FULL=need_full, BLOCK_V=block_v, num_warps=num_warps)
    return logp, ref_logp, entropy, full_kl, lse, ref_lse


def _launch_bwd(grad, grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                scalar_temperature, ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy, full_kl):
    B, T, V = logits.shape
    if B * T == 0:
        return
    ref = ref_logits if (grad_full is not None and ref_logits is not None) else logits
    block_v, num_warps = _launch_config(V)
    wrap_triton(_fused_kl_bwd_kernel)[(B * T,)](
        grad, logits, ref, labels, lse if temperature is None else temperature,
        lse if grad_logp is None else grad_logp, lse if grad_entropy is None else grad_entropy,
        lse if grad_full is None else grad_full,
        lse, lse if ref_lse is None else ref_lse, lse if entropy is None else entropy,
        lse if full_kl is None else full_kl,
        T, V, ignore_index, vocab_start, vocab_size, grad.stride(0), grad.stride(1), logits.stride(0), logits.stride(1),
        ref.stride(0), ref.stride(1),
        INV_TEMPERATURE=1.0 / scalar_temperature, HAS_TEMPERATURE_TENSOR=temperature is not None,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        HAS_GRAD_FULL=grad_full is not None, BLOCK_V=block_v, num_warps=num_warps)


@_register_op("kl_kernels::triton_fused_kl_bwd", mutates_args=())
def _bwd_op(grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
            grad_full: Optional[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
            ref_logits: Optional[torch.Tensor], temperature: Optional[torch.Tensor], scalar_temperature: float,
            ignore_index: int, vocab_start: int, vocab_size: int, lse: torch.Tensor, ref_lse: Optional[torch.Tensor],
            entropy: Optional[torch.Tensor], full_kl: Optional[torch.Tensor]) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_bwd(grad, grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                scalar_temperature, ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy, full_kl)
    return grad


# inplace_backward=True: the gradient overwrites the logits, declared as a mutation
@_register_op("kl_kernels::triton_fused_kl_bwd_", mutates_args={"logits"})
def _bwd_inplace_op(grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                    grad_full: Optional[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
                    ref_logits: Optional[torch.Tensor], temperature: Optional[torch.Tensor],
                    scalar_temperature: float, ignore_index: int, vocab_start: int, vocab_size: int,
                    lse: torch.Tensor, ref_lse: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
                    full_kl: Optional[torch.Tensor]) -> None:
    _launch_bwd(logits, grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                scalar_temperature, ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy, full_kl)


# the ops' temperature convention is T (as for the C++ ops); the launchers make 1/T a kernel constant,
# compiled once per value, which trainers keep fixed
fused_kl_fwd, fused_kl_bwd = op_backend(torch.ops.kl_kernels.triton_fused_kl_fwd,
                                       torch.ops.kl_kernels.triton_fused_kl_bwd,
                                       torch.ops.kl_kernels.triton_fused_kl_bwd_, row_dtype=torch.float32)


def _register_interpreter_fakes() -> None:
    def fwd(logits, labels, ref_logits, temperature, scalar_temperature, ignore_index, vocab_start, vocab_size,
            need_entropy, need_full):
        return fwd_outputs(logits, ref_logits is not None, need_entropy, need_full)

    _fwd_op.register_fake(fwd)
    _bwd_op.register_fake(lambda grad_logp, grad_entropy, grad_full, logits, *rest: torch.empty_like(logits))
    _bwd_inplace_op.register_fake(lambda *args: None)


if INTERPRETED:
    _register_interpreter_fakes()
