"""The `triton` backend: the fused pass over the logits as Triton kernels (the contract.FusedPass and OnePass of backends/reference.py).

Forward, one program per row: the policy row and (when given) the reference row are read once,
tile by tile, into running online log-sum-exp sums kept in raw logit units with the temperature
inside exp, as csrc/fused_kl_math.h does for the C++ kernels:
    s  = sum_v e_v,  sx = sum_v e_v (z_v - m),  sd = sum_v e_v (z_v - z'_v),   e_v = exp((z_v - m) / T)
    lse = m/T + log s,  H = log s - (sx/T)/s,  KL(p||q) = (sd/T)/s - ((m - m')/T + log(s/s')).
The label logits are single loads. Outputs are [N] float32. For kl_penalty (PENALTY) the same
kernel goes on to the token's estimator (_estimate: estimators.py in Triton, a compile-time
choice), mask and penalty, and a second launch (_sequence_sums_kernel) adds kl per sequence.

Backward, one program per row: p is recomputed from the saved lse and the gradient written in
the logits' dtype (into the logits themselves with inplace_backward). For kl_penalty the row first
gathers the upstream gradients of kl, penalty, kl_sum and kl_mean through the estimator's slope.

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

from ...estimators import ESTIMATOR_CODES
from ..adapter import fwd_outputs, op_backend, penalty_op_backend, penalty_outputs

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
def _saved_lse(m, s, inv_t):
    """The lse a row saves for its backward, in float64: m/T + log s without a float32 rounding of
    the sum, which every p of the backward would carry (csrc/fused_kl_math.h saved_lse)."""
    lse = m.to(tl.float64) * inv_t.to(tl.float64) + tl.log(s).to(tl.float64)
    return tl.where(lse == float("inf"), float("nan"), lse)


@triton.jit
def _log_prob(x, inv_t, lse):
    """z/T - lse with a float64 saved lse split into a float32 head and tail: the product exact inside
    the fma, so p carries none of lse's size in its error (csrc/fused_kl_math.h lse_parts)."""
    head = lse.to(tl.float32)
    tail = (lse - head.to(tl.float64)).to(tl.float32)
    return tl.fma(x, inv_t, -head) - tail


@triton.jit
def _label_logprob(z_y, m, s, inv_t, lse):
    """(z_y - m)/T - log s: the difference with the max exact, then one rounding (not z_y/T - m/T,
    which an fma contraction can leave half an ulp of z/T off; not z_y/T - lse). NaN with the row's
    lse (csrc/fused_kl_math.h's label_logprob)."""
    return (z_y - m) * inv_t - tl.log(s) + (lse - lse)


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
    # e * w with 0 where e == 0: a -inf logit (e = 0, w = -inf) adds nothing instead of NaN; +inf where
    # w is (z' = -inf, z > -inf: the reference bans a token the policy can sample, csrc/fused_kl_math.h sd_term)
    return tl.sum(tl.where(w == float("inf"), w, tl.where(e == 0.0, 0.0, e * w)), axis=0)


@triton.jit
def _expm1(x):
    """e^x - 1 with the digits that cancel kept (Kahan: (u - 1) x / log u, u = e^x): tl has no expm1."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(um1 == 0.0, x, tl.where((um1 == -1.0) | (u == float("inf")), um1, um1 * x / tl.log(u)))


@triton.jit
def _clamp_keep_nan(x, bound):
    return tl.where(x < -bound, -bound, tl.where(x > bound, bound, x))


@triton.jit
def _estimate(logp, ref_logp, full, ESTIMATOR: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
              LOG_RATIO_CLAMP: tl.constexpr, KL_CLAMP: tl.constexpr):
    """(value, slope) of one token's KL estimate: csrc/fused_kl_math.h's estimate(), the Triton form of
    estimators.py. ESTIMATOR: estimators.ESTIMATOR_CODES (0 k1, 1 abs, 2 k2, 3 k3, 4 full); clamps
    0.0 = none. slope: d value / d logp, or d value / d full for `full`."""
    if ESTIMATOR == 4:
        value = full
        slope = tl.full((), 1.0, tl.float32)
    elif (ESTIMATOR == 0) and (LOG_RATIO_CLAMP == 0.0):
        value = logp - ref_logp
        slope = tl.full((), 1.0, tl.float32)
    else:
        raw = ref_logp - logp  # r; d r / d logp = -1
        r = raw
        if LOG_RATIO_CLAMP > 0.0:
            r = _clamp_keep_nan(raw, LOG_RATIO_CLAMP)
        if ESTIMATOR == 0:
            value = -r
            slope = tl.full((), 1.0, tl.float32)
        elif ESTIMATOR == 1:
            value = tl.abs(r)
            slope = tl.where(r > 0.0, -1.0, tl.where(r < 0.0, 1.0, 0.0))  # torch: sgn(NaN) = 0
        elif ESTIMATOR == 2:
            value = 0.5 * r * r
            slope = -r
        else:
            em1 = _expm1(r)
            value = tl.where(r == float("inf"), float("inf"), em1 - r)
            slope = tl.where(r == float("inf"), 0.0, -em1)
        if LOG_RATIO_CLAMP > 0.0:
            # 0 where the clamp holds r, by select: torch.clamp's gradient is 0 there even for a NaN slope
            slope = tl.where((raw >= -LOG_RATIO_CLAMP) & (raw <= LOG_RATIO_CLAMP), slope, 0.0)
    if KL_CLAMP > 0.0:
        if ESTIMATOR == 4:
            slope = tl.where((value >= -KL_CLAMP) & (value <= KL_CLAMP), slope, 0.0)
        else:
            slope = tl.where((value > KL_CLAMP) | (value < -KL_CLAMP), 0.0, slope)
        value = _clamp_keep_nan(value, KL_CLAMP)
    if STRAIGHT_THROUGH:
        slope = logp - ref_logp
    return value, slope


@triton.jit
def _fused_kl_fwd_kernel(
    logits_ptr,  # [B, T, V] fp16/bf16/fp32 policy logits, vocabulary dim contiguous
    ref_logits_ptr,  # [B, T, V] reference logits, any of those dtypes (unused without HAS_REF)
    labels_ptr,  # [N] int64
    temperature_ptr,  # [N] fp32 per-row temperature (unused without HAS_TEMPERATURE_TENSOR)
    logp_ptr, ref_logp_ptr, entropy_ptr, full_kl_ptr,  # [N] fp32 outputs
    lse_ptr, ref_lse_ptr,  # [N] fp64 saved for the backward
    T, V, ignore_index, vocab_start, vocab_size,  # the columns are ids [vocab_start, vocab_start + V) of vocab_size
    stride_logits_b, stride_logits_t, stride_ref_b, stride_ref_t,
    # kl_penalty's epilogue (PENALTY only): given ref log-probs [N], mask [N] (nonzero = valid), the
    # kl and penalty outputs [N] fp32, kl_coef as a float or a 0-dim fp32 tensor
    ref_logprobs_ptr, mask_ptr, kl_ptr, penalty_ptr, kl_coef, kl_coef_ptr,
    INV_TEMPERATURE: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr, HAS_REF: tl.constexpr,
    NEED_ENTROPY: tl.constexpr, NEED_FULL: tl.constexpr, BLOCK_V: tl.constexpr,
    PENALTY: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COEF_TENSOR: tl.constexpr, ESTIMATOR: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr, LOG_RATIO_CLAMP: tl.constexpr, KL_CLAMP: tl.constexpr,
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
                # an infinite sd stays infinite, even when scale underflows to 0 (fused_kl_math.h raise_max)
                sd = tl.where(sd == float("inf"), sd, sd * scale) + _weighted(e, x - xr)
            ref_m, ref_scale, ref_e = _online_lse_step(ref_m, xr, inv_t)
            ref_s = ref_s * ref_scale + tl.sum(ref_e, axis=0)

    lse = _log_sum_exp(m, s, inv_t)
    tl.store(lse_ptr + row, tl.where(valid, _saved_lse(m, s, inv_t), 0.0))
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
    logp = tl.where(valid, logp + bad, 0.0)
    ref_logp = tl.zeros_like(logp)
    full = tl.zeros_like(logp)
    if HAS_REF:
        ref_lse = _log_sum_exp(ref_m, ref_s, inv_t)
        tl.store(ref_lse_ptr + row, tl.where(valid, _saved_lse(ref_m, ref_s, inv_t), 0.0))
        ref_z_y = tl.load(ref_row_ptr + safe_col, mask=valid & owned, other=0.0).to(tl.float32)
        ref_logp = tl.where(owned, _label_logprob(ref_z_y, ref_m, ref_s, inv_t, ref_lse), float("-inf"))
        ref_logp = tl.where(valid, ref_logp + bad, 0.0)
        tl.store(ref_logp_ptr + row, ref_logp)
        if NEED_FULL:
            # lse - ref_lse from the raw maxima and sums (csrc/fused_kl_math.h full_kl): the two lse
            # are ~max z/T, their difference would lose a small KL's digits; NaN with either lse
            gap = (m - ref_m) * inv_t + tl.log(s / ref_s)
            gap = tl.where((lse != lse) | (ref_lse != ref_lse), float("nan"), gap)
            full = tl.where(valid, sd * inv_t / s - gap + bad, 0.0)
            tl.store(full_kl_ptr + row, full)
    if PENALTY:
        if not HAS_REF:  # given reference log-probs, 0 on ignored rows as every output
            ref_logp = tl.where(valid, tl.load(ref_logprobs_ptr + row).to(tl.float32), 0.0)
            tl.store(ref_logp_ptr + row, ref_logp)
        use = valid
        if HAS_MASK:
            use = use & (tl.load(mask_ptr + row) != 0)
        # select, never multiply: a masked row's NaN or infinite log-ratio reaches no output
        value, _ = _estimate(tl.where(use, logp, 0.0), tl.where(use, ref_logp, 0.0), tl.where(use, full, 0.0),
                             ESTIMATOR, STRAIGHT_THROUGH, LOG_RATIO_CLAMP, KL_CLAMP)
        kl = tl.where(use, value, 0.0)
        if HAS_COEF_TENSOR:
            kl_coef = tl.load(kl_coef_ptr).to(tl.float32)
        tl.store(kl_ptr + row, kl)
        tl.store(penalty_ptr + row, -kl_coef * kl)


@triton.jit
def _sequence_sums_kernel(
    kl_ptr, labels_ptr, mask_ptr, cu_seqlens_ptr,  # [N] fp32 kl, [N] int64 labels, [N] mask, [S+1] boundaries
    kl_sum_ptr, kl_mean_ptr, counts_ptr,  # [S] fp32 outputs
    sequence_ptr,  # [N] int32: each row's sequence, -1 for rows outside every one
    N, T, n_cu, n_seq, ignore_index,
    PADDED: tl.constexpr, HAS_CU: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per sequence: kl_sum, the valid-row count and kl_mean, adding its rows in order in
    float64 (deterministic, no atomics; no drift over long sequences). Packed boundaries are
    cu_seqlens clamped into [0, N] and made non-decreasing (a running max), as the C++ kernels do,
    so validate=False never reads out of bounds."""
    seq = tl.program_id(0).to(tl.int64)
    if PADDED:
        start = seq * T
        end = start + T
    elif HAS_CU:
        start = tl.zeros((), tl.int64)
        end = tl.zeros((), tl.int64)
        for i0 in range(0, seq + 2, BLOCK):
            idx = i0 + tl.arange(0, BLOCK)
            c = tl.load(cu_seqlens_ptr + idx, mask=(idx <= seq + 1) & (idx < n_cu), other=0).to(tl.int64)
            c = tl.minimum(tl.maximum(c, 0), N)
            start = tl.maximum(start, tl.max(tl.where(idx <= seq, c, 0), axis=0))
            end = tl.maximum(end, tl.max(c, axis=0))
    else:
        start = tl.zeros((), tl.int64)
        end = start + N
    # packed boundaries cover one range [first start, last end): the rows before and after it belong
    # to no sequence (validate=False only), marked by the first and the last program
    if seq == 0:
        for r0 in range(0, start, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            tl.store(sequence_ptr + rows, -1, mask=rows < start)
    if seq == n_seq - 1:
        for r0 in range(end, N, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            tl.store(sequence_ptr + rows, -1, mask=rows < N)
    total = tl.zeros((), tl.float64)
    count = tl.zeros((), tl.int64)
    for r0 in range(start, end, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        inside = rows < end
        total += tl.sum(tl.load(kl_ptr + rows, mask=inside, other=0.0).to(tl.float64), axis=0)
        use = inside & (tl.load(labels_ptr + rows, mask=inside, other=ignore_index) != ignore_index)
        if HAS_MASK:
            use = use & (tl.load(mask_ptr + rows, mask=inside, other=0) != 0)
        count += tl.sum(use.to(tl.int64), axis=0)
        tl.store(sequence_ptr + rows, seq.to(tl.int32), mask=inside)
    kl_sum = total.to(tl.float32)
    counted = count.to(tl.float32)
    tl.store(kl_sum_ptr + seq, kl_sum)
    tl.store(counts_ptr + seq, counted)
    tl.store(kl_mean_ptr + seq, kl_sum / tl.maximum(counted, 1.0))  # a sequence with no valid row: 0 / 1


@triton.jit
def _fused_kl_bwd_kernel(
    grad_ptr,  # [B, T, V] output gradient in the logits' dtype (the logits themselves if in place)
    logits_ptr,  # [B, T, V] fp16/bf16/fp32 policy logits
    ref_logits_ptr,  # [B, T, V] reference logits (only with HAS_GRAD_FULL)
    labels_ptr,  # [N] int64
    temperature_ptr,  # [N] fp32 (only with HAS_TEMPERATURE_TENSOR)
    grad_logp_ptr, grad_entropy_ptr, grad_full_ptr,  # [N] fp32 upstream gradients (each optional)
    # their strides, as autograd hands them over (0: the gradient of a sum, expanded): read without a copy
    stride_grad_logp, stride_grad_entropy, stride_grad_full,
    lse_ptr, ref_lse_ptr, entropy_ptr, full_kl_ptr,  # [N] fp32 saved by the forward
    T, V, ignore_index, vocab_start, vocab_size,
    stride_grad_b, stride_grad_t, stride_logits_b, stride_logits_t, stride_ref_b, stride_ref_t,
    # kl_penalty's chain (PENALTY only): upstream gradients of kl, penalty [N] and kl_sum, kl_mean [S];
    # the forward's counts [S], sequence ids [N] int32, logp and ref_logp [N]; mask; kl_coef
    grad_kl_ptr, grad_penalty_ptr, grad_kl_sum_ptr, grad_kl_mean_ptr, counts_ptr, sequence_ptr, logp_ptr,
    ref_logp_ptr, mask_ptr, kl_coef, kl_coef_ptr,
    stride_grad_kl, stride_grad_penalty, stride_grad_kl_sum, stride_grad_kl_mean,
    INV_TEMPERATURE: tl.constexpr, HAS_TEMPERATURE_TENSOR: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, HAS_GRAD_FULL: tl.constexpr, BLOCK_V: tl.constexpr,
    PENALTY: tl.constexpr, HAS_GRAD_KL: tl.constexpr, HAS_GRAD_PENALTY: tl.constexpr, HAS_GRAD_KL_SUM: tl.constexpr,
    HAS_GRAD_KL_MEAN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COEF_TENSOR: tl.constexpr, ESTIMATOR: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr, LOG_RATIO_CLAMP: tl.constexpr, KL_CLAMP: tl.constexpr,
):
    """d/dz_v = (g_logp [v == y] + p_v f_v) / T, f_v = -g_logp - g_H (log p_v + H) + g_F (log p_v - log q_v - KL).
    With PENALTY, g_logp (sampled estimators) or g_F (`full`) first gets the gradient through the
    token's kl: (g_kl - kl_coef g_penalty + g_kl_sum[s] + g_kl_mean[s] / count[s]) times the estimator's
    slope, on valid rows, 0 (not 0 * inf) where nothing flows (csrc/fused_kl_math.h kl_upstream)."""
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
    ref_lse = tl.zeros((), tl.float64)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row * stride_grad_logp)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row * stride_grad_entropy)
        entropy = tl.load(entropy_ptr + row)
    if HAS_GRAD_FULL:
        kl = tl.load(full_kl_ptr + row)
        ref_lse = tl.load(ref_lse_ptr + row)
        if not PENALTY:
            g_full = tl.load(grad_full_ptr + row * stride_grad_full)
    if PENALTY:
        seq = tl.load(sequence_ptr + row)
        in_seq = seq >= 0  # -1: outside every sequence (packed, validate=False): no sum term
        seq = tl.where(in_seq, seq, 0).to(tl.int64)
        upstream = tl.zeros((), tl.float32)
        if HAS_GRAD_KL:
            upstream += tl.load(grad_kl_ptr + row * stride_grad_kl)
        if HAS_GRAD_PENALTY:
            if HAS_COEF_TENSOR:
                kl_coef = tl.load(kl_coef_ptr).to(tl.float32)
            upstream -= kl_coef * tl.load(grad_penalty_ptr + row * stride_grad_penalty)
        if HAS_GRAD_KL_SUM:
            upstream += tl.where(in_seq, tl.load(grad_kl_sum_ptr + seq * stride_grad_kl_sum), 0.0)
        if HAS_GRAD_KL_MEAN:
            mean = tl.load(grad_kl_mean_ptr + seq * stride_grad_kl_mean) / tl.maximum(tl.load(counts_ptr + seq), 1.0)
            upstream += tl.where(in_seq, mean, 0.0)
        use = label != ignore_index
        if HAS_MASK:
            use = use & (tl.load(mask_ptr + row) != 0)
        upstream = tl.where(use, upstream, 0.0)
        logp_row = tl.where(use, tl.load(logp_ptr + row), 0.0)
        _, slope = _estimate(logp_row, tl.where(use, tl.load(ref_logp_ptr + row), 0.0), tl.where(use, kl, 0.0),
                             ESTIMATOR, STRAIGHT_THROUGH, LOG_RATIO_CLAMP, KL_CLAMP)
        through = tl.where(upstream == 0.0, 0.0, upstream * slope)
        if ESTIMATOR == 4:
            g_full = through
        else:
            g_logp += through
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
        log_p = _log_prob(x, inv_t, lse)
        f = -g_logp + tl.zeros_like(log_p)
        if HAS_GRAD_ENTROPY:
            f -= g_entropy * (log_p + entropy)
        if HAS_GRAD_FULL:
            xr = tl.load(ref_row_ptr + cols, mask=cols < read_len, other=0.0).to(tl.float32)
            # full's term only where its gradient flows: a masked row's reference NaN stays out
            f += tl.where(g_full != 0.0, g_full * (log_p - _log_prob(xr, inv_t, ref_lse) - kl), 0.0)
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
            *(lse,) * 4, 0.0, lse,  # no penalty epilogue
            INV_TEMPERATURE=1.0 / scalar_temperature, HAS_TEMPERATURE_TENSOR=temperature is not None, HAS_REF=has_ref,
            NEED_ENTROPY=need_entropy, NEED_FULL=need_full, BLOCK_V=block_v, num_warps=num_warps,
            PENALTY=False, HAS_MASK=False, HAS_COEF_TENSOR=False, **_estimator_constants(0, False, None, None))
    return logp, ref_logp, entropy, full_kl, lse, ref_lse


def _stride(upstream):
    # an upstream gradient's stride (0 when absent: its loads are compiled out)
    return 0 if upstream is None else upstream.stride(0)


def _or(tensor, stand_in):
    # an absent optional pointer: any tensor stands in, its kernel branch is compiled out
    return stand_in if tensor is None else tensor


def _launch_bwd(grad, grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                scalar_temperature, ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy, full_kl,
                penalty=None):
    """penalty: kl_penalty's chain, a dict of the PENALTY arguments of _fused_kl_bwd_kernel (tensors or
    None) plus its constexprs; None for the row backward alone."""
    B, T, V = logits.shape
    if B * T == 0:
        return
    use_ref = grad_full is not None or (penalty is not None and penalty["ESTIMATOR"] == ESTIMATOR_CODES["full"])
    ref = ref_logits if (use_ref and ref_logits is not None) else logits
    block_v, num_warps = _launch_config(V)
    # every constexpr is passed, none left to its default: torch.compile's Triton analysis wants them all
    chain = dict(penalty or dict(PENALTY=False, HAS_GRAD_KL=False, HAS_GRAD_PENALTY=False, HAS_GRAD_KL_SUM=False,
                                 HAS_GRAD_KL_MEAN=False, HAS_MASK=False, HAS_COEF_TENSOR=False,
                                 **_estimator_constants(0, False, None, None)))
    chain_strides = [_stride(chain.get(name)) for name in _PENALTY_BWD_POINTERS[:4]]
    pointers = [_or(chain.pop(name, None), lse) for name in _PENALTY_BWD_POINTERS]
    wrap_triton(_fused_kl_bwd_kernel)[(B * T,)](
        grad, logits, ref, labels, _or(temperature, lse), _or(grad_logp, lse), _or(grad_entropy, lse),
        _or(grad_full, lse), _stride(grad_logp), _stride(grad_entropy), _stride(grad_full),
        lse, _or(ref_lse, lse), _or(entropy, lse), _or(full_kl, lse),
        T, V, ignore_index, vocab_start, vocab_size, grad.stride(0), grad.stride(1), logits.stride(0), logits.stride(1),
        ref.stride(0), ref.stride(1), *pointers, chain.pop("kl_coef", 0.0), _or(chain.pop("kl_coef_tensor", None), lse),
        *chain_strides, INV_TEMPERATURE=1.0 / scalar_temperature, HAS_TEMPERATURE_TENSOR=temperature is not None,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        HAS_GRAD_FULL=use_ref, BLOCK_V=block_v, num_warps=num_warps, **chain)


_PENALTY_BWD_POINTERS = ("grad_kl", "grad_penalty", "grad_kl_sum", "grad_kl_mean", "counts", "sequence", "logp",
                         "ref_logp", "mask")


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


def _estimator_constants(estimator, straight_through, log_ratio_clamp, kl_clamp):
    # compiled in: a run keeps one estimator; 0.0 = no clamp (clamps are > 0)
    return dict(ESTIMATOR=estimator, STRAIGHT_THROUGH=straight_through, LOG_RATIO_CLAMP=log_ratio_clamp or 0.0,
                KL_CLAMP=kl_clamp or 0.0)


# kl_penalty in one pass: the row kernel with the estimator epilogue, then one program per sequence
# for the sums (launch 2); the backward is the row backward with the chain from all six outputs.
# The schemas are the C++ ops' (csrc/registration.cpp); kl_coef stays a runtime argument (adaptive
# controllers change it every step), the estimator and clamps are compile-time constants.
SUMS_BLOCK = 1024


@_register_op("kl_kernels::triton_kl_penalty_fwd", mutates_args=())
def _penalty_fwd_op(logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor],
                    ref_logprobs: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                    cu_seqlens: Optional[torch.Tensor], temperature: Optional[torch.Tensor], scalar_temperature: float,
                    ignore_index: int, estimator: int, straight_through: bool, log_ratio_clamp: Optional[float],
                    kl_clamp: Optional[float], kl_coef: Optional[torch.Tensor], scalar_kl_coef: float, padded: bool,
                    need_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    full = estimator == ESTIMATOR_CODES["full"]
    has_ref = ref_logits is not None
    outputs = penalty_outputs(logits, padded, cu_seqlens, has_ref, need_entropy, full)
    logp, ref_logp, kl, penalty, kl_sum, kl_mean, counts, sequence, entropy, full_kl, lse, ref_lse = outputs
    B, T, V = logits.shape
    N, S = B * T, kl_sum.shape[0]
    mask = None if mask is None else mask.contiguous()
    constants = _estimator_constants(estimator, straight_through, log_ratio_clamp, kl_clamp)
    if N > 0:
        ref = ref_logits if has_ref else logits
        block_v, num_warps = _launch_config(V)
        wrap_triton(_fused_kl_fwd_kernel)[(N,)](
            logits, ref, labels, _or(temperature, logp), logp, ref_logp, entropy, full_kl, lse, ref_lse,
            T, V, ignore_index, 0, V, logits.stride(0), logits.stride(1), ref.stride(0), ref.stride(1),
            _or(None if ref_logprobs is None else ref_logprobs.contiguous(), logp), _or(mask, logp), kl, penalty,
            scalar_kl_coef, _or(kl_coef, logp),
            INV_TEMPERATURE=1.0 / scalar_temperature, HAS_TEMPERATURE_TENSOR=temperature is not None, HAS_REF=has_ref,
            NEED_ENTROPY=need_entropy, NEED_FULL=full, BLOCK_V=block_v, num_warps=num_warps, PENALTY=True,
            HAS_MASK=mask is not None, HAS_COEF_TENSOR=kl_coef is not None, **constants)
    if S > 0:
        cu = None if cu_seqlens is None else cu_seqlens.contiguous()
        wrap_triton(_sequence_sums_kernel)[(S,)](
            kl, labels, _or(mask, kl), _or(cu, labels), kl_sum, kl_mean, counts, sequence, N, T,
            0 if cu is None else cu.shape[0], S, ignore_index, PADDED=padded, HAS_CU=cu is not None,
            HAS_MASK=mask is not None, BLOCK=SUMS_BLOCK)
    elif N > 0:  # cu_seqlens of one entry: no sequence, every row outside
        sequence.fill_(-1)
    return logp, ref_logp, kl, penalty, kl_sum, kl_mean, counts, sequence, entropy, full_kl, lse, ref_lse


def _launch_penalty_bwd(grad, grad_logp, grad_kl, grad_penalty, grad_kl_sum, grad_kl_mean, grad_entropy, logits,
                        labels, ref_logits, mask, temperature, scalar_temperature, ignore_index, estimator,
                        straight_through, log_ratio_clamp, kl_clamp, kl_coef, scalar_kl_coef, logp, ref_logp, counts,
                        sequence, lse, ref_lse, entropy, full_kl):
    through_kl = any(g is not None for g in (grad_kl, grad_penalty, grad_kl_sum, grad_kl_mean))
    chain = None
    if through_kl:
        chain = dict(grad_kl=grad_kl, grad_penalty=grad_penalty, grad_kl_sum=grad_kl_sum, grad_kl_mean=grad_kl_mean,
                     counts=counts, sequence=sequence, logp=logp, ref_logp=ref_logp,
                     mask=None if mask is None else mask.contiguous(), kl_coef=scalar_kl_coef, kl_coef_tensor=kl_coef,
                     PENALTY=True, HAS_GRAD_KL=grad_kl is not None, HAS_GRAD_PENALTY=grad_penalty is not None,
                     HAS_GRAD_KL_SUM=grad_kl_sum is not None, HAS_GRAD_KL_MEAN=grad_kl_mean is not None,
                     HAS_MASK=mask is not None, HAS_COEF_TENSOR=kl_coef is not None,
                     **_estimator_constants(estimator, straight_through, log_ratio_clamp, kl_clamp))
    _launch_bwd(grad, grad_logp, grad_entropy, None, logits, labels, ref_logits, temperature, scalar_temperature,
                ignore_index, 0, logits.shape[2], lse, ref_lse, entropy, full_kl, chain)


@_register_op("kl_kernels::triton_kl_penalty_bwd", mutates_args=())
def _penalty_bwd_op(grad_logp: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor],
                    grad_penalty: Optional[torch.Tensor], grad_kl_sum: Optional[torch.Tensor],
                    grad_kl_mean: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], logits: torch.Tensor,
                    labels: torch.Tensor, ref_logits: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                    temperature: Optional[torch.Tensor], scalar_temperature: float, ignore_index: int, estimator: int,
                    straight_through: bool, log_ratio_clamp: Optional[float], kl_clamp: Optional[float],
                    kl_coef: Optional[torch.Tensor], scalar_kl_coef: float, logp: torch.Tensor, ref_logp: torch.Tensor,
                    counts: torch.Tensor, sequence: torch.Tensor, lse: torch.Tensor, ref_lse: Optional[torch.Tensor],
                    entropy: Optional[torch.Tensor], full_kl: Optional[torch.Tensor]) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_penalty_bwd(grad, grad_logp, grad_kl, grad_penalty, grad_kl_sum, grad_kl_mean, grad_entropy, logits,
                        labels, ref_logits, mask, temperature, scalar_temperature, ignore_index, estimator,
                        straight_through, log_ratio_clamp, kl_clamp, kl_coef, scalar_kl_coef, logp, ref_logp, counts,
                        sequence, lse, ref_lse, entropy, full_kl)
    return grad


@_register_op("kl_kernels::triton_kl_penalty_bwd_", mutates_args={"logits"})
def _penalty_bwd_inplace_op(grad_logp: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor],
                            grad_penalty: Optional[torch.Tensor], grad_kl_sum: Optional[torch.Tensor],
                            grad_kl_mean: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                            logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor],
                            mask: Optional[torch.Tensor], temperature: Optional[torch.Tensor],
                            scalar_temperature: float, ignore_index: int, estimator: int, straight_through: bool,
                            log_ratio_clamp: Optional[float], kl_clamp: Optional[float],
                            kl_coef: Optional[torch.Tensor], scalar_kl_coef: float, logp: torch.Tensor,
                            ref_logp: torch.Tensor, counts: torch.Tensor, sequence: torch.Tensor, lse: torch.Tensor,
                            ref_lse: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
                            full_kl: Optional[torch.Tensor]) -> None:
    _launch_penalty_bwd(logits, grad_logp, grad_kl, grad_penalty, grad_kl_sum, grad_kl_mean, grad_entropy, logits,
                        labels, ref_logits, mask, temperature, scalar_temperature, ignore_index, estimator,
                        straight_through, log_ratio_clamp, kl_clamp, kl_coef, scalar_kl_coef, logp, ref_logp, counts,
                        sequence, lse, ref_lse, entropy, full_kl)


kl_penalty_fwd, kl_penalty_bwd = penalty_op_backend(torch.ops.kl_kernels.triton_kl_penalty_fwd,
                                                    torch.ops.kl_kernels.triton_kl_penalty_bwd,
                                                    torch.ops.kl_kernels.triton_kl_penalty_bwd_)


def serves_one_pass(device: torch.device) -> bool:
    return True  # wherever the backend runs (CUDA; CPU tensors under the interpreter)


# the ops' temperature convention is T (as for the C++ ops); the launchers make 1/T a kernel constant,
# compiled once per value, which trainers keep fixed
fused_kl_fwd, fused_kl_bwd = op_backend(torch.ops.kl_kernels.triton_fused_kl_fwd,
                                       torch.ops.kl_kernels.triton_fused_kl_bwd,
                                       torch.ops.kl_kernels.triton_fused_kl_bwd_)


def _register_interpreter_fakes() -> None:
    def fwd(logits, labels, ref_logits, temperature, scalar_temperature, ignore_index, vocab_start, vocab_size,
            need_entropy, need_full):
        return fwd_outputs(logits, ref_logits is not None, need_entropy, need_full)

    _fwd_op.register_fake(fwd)
    _penalty_fwd_op.register_fake(
        lambda logits, labels, ref_logits, ref_logprobs, mask, cu_seqlens, temperature, scalar_temperature,
        ignore_index, estimator, straight_through, log_ratio_clamp, kl_clamp, kl_coef, scalar_kl_coef, padded,
        need_entropy: penalty_outputs(logits, padded, cu_seqlens, ref_logits is not None, need_entropy,
                                      estimator == ESTIMATOR_CODES["full"]))
    _penalty_bwd_op.register_fake(lambda *args: torch.empty_like(args[6]))
    _penalty_bwd_inplace_op.register_fake(lambda *args: None)
    _bwd_op.register_fake(lambda grad_logp, grad_entropy, grad_full, logits, *rest: torch.empty_like(logits))
    _bwd_inplace_op.register_fake(lambda *args: None)


if INTERPRETED:
    _register_interpreter_fakes()
