// CUDA kernels of the fused KL pass: torch-free device code (plain nvcc compiles it alone, with
// torch's -D__CUDA_NO_HALF_OPERATORS__ family of flags; tests/test_cuda_compile.py checks that).
// The per-row math is csrc/fused_kl_math.h, the same functions the CPU kernel runs.
//
// One thread block per row. Each thread walks the row with 16-byte loads (8 bf16/fp16 or 4 fp32
// values) when the row allows it, keeping its own online log-sum-exp sums (RowSums); the block
// then merges them in a fixed order (warp shuffles, then one warp over the warps' results), so
// every run gives the same bits. The backward recomputes p from the saved log-sum-exp and
// writes the gradient with the same loads and stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../fused_kl_math.h"

namespace kl_kernels {
namespace cuda {

// Conversions by intrinsic: torch builds define __CUDA_NO_BFLOAT16_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A [B, T, V] tensor with a contiguous vocabulary dim, addressed by row n = b*T + t (64-bit).
template <typename T>
struct Rows {
  T* data;
  int64_t T_len, stride_b, stride_t;
  __device__ __forceinline__ T* row(int64_t n) const {
    return data + (n / T_len) * stride_b + (n % T_len) * stride_t;
  }
};

// An upstream gradient [N] (or [S]) as autograd hands it over: any stride, 0 included (the gradient of a
// sum arrives expanded), so the backward takes it without a copy (a launch each). Null when nothing flows.
struct Upstream {
  const float* data;
  int64_t stride;
  __device__ __forceinline__ float operator[](int64_t i) const { return data[i * stride]; }
  __host__ __device__ __forceinline__ explicit operator bool() const { return data != nullptr; }
};

// kWidth consecutive values, loaded or stored in one go (16 bytes for the policy dtype).
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

template <typename T, int kWidth>
__device__ __forceinline__ bool aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T, kWidth>) == 0;
}

// The one walk over a row, shared by both kernels: calls f(index, policy value, reference value)
// for every index, the block's threads sharing the work. When f returns a float it is stored at
// out[index] in the logits' dtype (out may alias row: each value is read before the same thread
// writes it). row and ref_row may be null: nothing is read from them and 0 is passed. Packs of
// kWidth values (16-byte loads and stores) when every row used is aligned for them, else one value
// at a time.
template <typename scalar_t, typename ref_t, typename F>
__device__ __forceinline__ void map_row(const scalar_t* row, const ref_t* ref_row, scalar_t* out, int64_t V,
                                        F&& f) {
  constexpr bool kStore = !std::is_void_v<std::invoke_result_t<F, int64_t, float, float>>;
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const bool packed = (row == nullptr || aligned<scalar_t, kWidth>(row)) &&
                      (ref_row == nullptr || aligned<ref_t, kWidth>(ref_row)) &&
                      (!kStore || aligned<scalar_t, kWidth>(out));
  int64_t start = 0;
  if (packed) {
    const int64_t packs = V / kWidth;
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      Pack<scalar_t, kWidth> x, y;
      Pack<ref_t, kWidth> xr;
      if (row != nullptr) x = reinterpret_cast<const Pack<scalar_t, kWidth>*>(row)[i];
      if (ref_row != nullptr) xr = reinterpret_cast<const Pack<ref_t, kWidth>*>(ref_row)[i];
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        const float value = row != nullptr ? to_float(x.v[k]) : 0.0f;
        const float ref_value = ref_row != nullptr ? to_float(xr.v[k]) : 0.0f;
        if constexpr (kStore) {
          y.v[k] = from_float<scalar_t>(f(i * kWidth + k, value, ref_value));
        } else {
          f(i * kWidth + k, value, ref_value);
        }
      }
      if constexpr (kStore) reinterpret_cast<Pack<scalar_t, kWidth>*>(out)[i] = y;
    }
    start = packs * kWidth;
  }
  for (int64_t v = start + threadIdx.x; v < V; v += blockDim.x) {
    const float value = row != nullptr ? to_float(row[v]) : 0.0f;
    const float ref_value = ref_row != nullptr ? to_float(ref_row[v]) : 0.0f;
    if constexpr (kStore) {
      out[v] = from_float<scalar_t>(f(v, value, ref_value));
    } else {
      f(v, value, ref_value);
    }
  }
}

// One thread's running sums take one value (raw units, as in fused_kl_math.h). The max moves
// rarely after the first values, so this is one exp per value most of the time.
__device__ __forceinline__ void add_value(RowSums<float>& r, float x, float w_sd, float inv_t, bool need_sx,
                                          bool need_sd) {
  if (!(x <= r.m)) raise_max(r, nan_max(r.m, x), inv_t);  // also taken by a NaN x, which sticks
  const float e = r.m == -INFINITY ? 0.0f : __expf((x - r.m) * inv_t);
  r.s += e;
  if (need_sd) r.sd += sd_term(e, w_sd);  // +inf where the reference bans a token the policy can sample
  if (e != 0.0f && need_sx) r.sx += e * (x - r.m);  // a -inf logit adds nothing (not 0 * -inf); kept around
                                                    // the running max (fused_kl_math.h)
}

__device__ __forceinline__ RowSums<float> shuffle_down(const RowSums<float>& r, int offset) {
  return {__shfl_down_sync(0xffffffffu, r.m, offset), __shfl_down_sync(0xffffffffu, r.s, offset),
          __shfl_down_sync(0xffffffffu, r.sx, offset), __shfl_down_sync(0xffffffffu, r.sd, offset)};
}

// The block's merged sums, valid in thread 0; fixed order, so deterministic. scratch: 32 entries.
__device__ __forceinline__ RowSums<float> block_merge(RowSums<float> r, float inv_t, RowSums<float>* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) r = merge(r, shuffle_down(r, offset), inv_t);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch may still be read by a previous merge
  if (lane == 0) scratch[warp] = r;
  __syncthreads();
  if (warp == 0) {
    r = lane < warps ? scratch[lane] : empty_row_sums<float>();
    for (int offset = 16; offset > 0; offset /= 2) r = merge(r, shuffle_down(r, offset), inv_t);
  }
  return r;
}

// A mask of any real dtype read as "nonzero = valid" without converting it first (a launch): the
// element's bits are nonzero, the sign bit aside for floats (-0.0 is zero; NaN is nonzero).
struct AnyMask {
  const void* data;  // null: every row valid
  int element_size;
  bool is_float;
  __device__ __forceinline__ bool valid(int64_t n) const {
    if (data == nullptr) return true;
    uint64_t bits;
    switch (element_size) {
      case 1: bits = static_cast<const uint8_t*>(data)[n]; break;
      case 2: bits = static_cast<const uint16_t*>(data)[n]; break;
      case 4: bits = static_cast<const uint32_t*>(data)[n]; break;
      default: bits = static_cast<const uint64_t*>(data)[n];
    }
    if (is_float) bits &= ~(uint64_t(1) << (8 * element_size - 1));
    return bits != 0;
  }
};

// kl_penalty's epilogue of the forward kernel (on = false: fused_kl_fwd alone)
struct PenaltyFwd {
  bool on;
  const float* ref_logprobs;  // [N] given reference log-probs (null with ref_logits)
  AnyMask mask;
  EstimatorSpec<float> spec;
  const float* kl_coef_ptr;  // 0-dim, or null: then kl_coef
  float kl_coef;
  float *kl, *penalty;  // [N]
};

struct FwdParams {
  const int64_t* labels;     // [N]
  const float* temperature;  // [N] or null: then inv_temperature
  float inv_temperature;
  int64_t N, V, ignore_index;
  VocabShard shard;  // the columns' place in the vocabulary (fused_kl_math.h)
  bool need_entropy, need_full;
  float *logp, *ref_logp, *entropy, *full_kl;  // [N] each; ref_* null without a reference
  double *lse, *ref_lse;  // [N] saved for the backward (fused_kl_math.h saved_lse)
  PenaltyFwd penalty;
};

// The token's kl and penalty from its finished statistics (thread 0 of the row's block).
__device__ __forceinline__ void penalty_epilogue(const FwdParams& p, int64_t n, bool labelled, float logp,
                                                 float ref_logp, float full) {
  const PenaltyFwd& e = p.penalty;
  if (e.ref_logprobs != nullptr) p.ref_logp[n] = ref_logp = labelled ? e.ref_logprobs[n] : 0.0f;
  // select, never multiply: a masked row's NaN or infinite log-ratio reaches no output
  const bool use = labelled && e.mask.valid(n);
  const float kl = use ? estimate(e.spec, logp, ref_logp, full).value : 0.0f;
  p.penalty.kl[n] = kl;
  p.penalty.penalty[n] = -(e.kl_coef_ptr != nullptr ? *e.kl_coef_ptr : e.kl_coef) * kl;
}

template <typename scalar_t, typename ref_t>
__global__ void fused_kl_fwd_kernel(Rows<const scalar_t> logits, Rows<const ref_t> ref_logits, bool has_ref,
                                    FwdParams p) {
  __shared__ RowSums<float> scratch[32];
  const int64_t n = blockIdx.x;
  const int64_t label = p.labels[n];
  const bool valid = label != p.ignore_index;
  if (!valid) {  // an ignored row (prompt tokens, padding) is 0 in every output: none of it is read
    if (threadIdx.x == 0) {
      p.logp[n] = 0.0f, p.lse[n] = 0.0;
      if (has_ref) p.ref_logp[n] = 0.0f, p.ref_lse[n] = 0.0;
      if (p.need_entropy) p.entropy[n] = 0.0f;
      if (p.need_full) p.full_kl[n] = 0.0f;
      if (p.penalty.on) penalty_epilogue(p, n, false, 0.0f, 0.0f, 0.0f);
    }
    return;  // the whole block: no barrier is left waiting
  }
  const float inv_t = p.temperature != nullptr ? 1.0f / p.temperature[n] : p.inv_temperature;
  const scalar_t* row = logits.row(n);
  const ref_t* ref_row = has_ref ? ref_logits.row(n) : nullptr;
  const bool need_sx = p.need_entropy, need_sd = p.need_full;
  RowSums<float> policy = empty_row_sums<float>(), reference = empty_row_sums<float>();
  map_row(row, ref_row, static_cast<scalar_t*>(nullptr), p.V, [&](int64_t, float x, float xr) {
    add_value(policy, x, x - xr, inv_t, need_sx, need_sd);
    if (has_ref) add_value(reference, xr, 0.0f, inv_t, false, false);
  });
  policy = block_merge(policy, inv_t, scratch);
  if (has_ref) reference = block_merge(reference, inv_t, scratch);
  if (threadIdx.x != 0) return;

  const RowSums<float> ps = scaled(policy, inv_t);
  const float lse = log_sum_exp(ps);
  p.lse[n] = saved_lse(policy, inv_t);
  // a label outside the vocabulary only gets here with validate=False: NaN in its row, nothing read;
  // one in another rank's shard has no mass here: -inf
  const bool bad = p.shard.bad(label), owned = p.shard.owns(label, p.V);
  const int64_t col = label - p.shard.start;
  const float nan = __int_as_float(0x7fc00000), inf = __int_as_float(0x7f800000);
  auto out = [&](float value) { return bad ? nan : value; };
  const float logp = out(owned ? label_logprob(policy, to_float(row[col]), inv_t, lse) : -inf);
  p.logp[n] = logp;
  if (p.need_entropy) p.entropy[n] = out(entropy(ps, lse));
  float ref_logp = 0.0f, full = 0.0f;
  if (has_ref) {
    const RowSums<float> qs = scaled(reference, inv_t);
    const float ref_lse = log_sum_exp(qs);
    p.ref_lse[n] = saved_lse(reference, inv_t);
    p.ref_logp[n] = ref_logp = out(owned ? label_logprob(reference, to_float(ref_row[col]), inv_t, ref_lse) : -inf);
    if (p.need_full) p.full_kl[n] = full = out(full_kl(policy, reference, inv_t, lse, ref_lse));
  }
  if (p.penalty.on) penalty_epilogue(p, n, true, logp, ref_logp, full);
}

// kl_penalty's second launch: one block per sequence adds its rows' kl in a fixed order (a strided
// float64 sum per thread, then a fixed tree: deterministic, no atomics), counts its valid rows and
// writes each row's sequence id for the backward. Packed boundaries are cu_seqlens clamped into
// [0, N] and made non-decreasing (a running max, as the CPU kernel), so validate=False never reads
// out of bounds; the first and last blocks mark rows outside every sequence with -1.
struct SumParams {
  const float* kl;  // [N]
  const int64_t* labels;
  AnyMask mask;
  const void* cu_seqlens;  // [n_cu] int32 or int64, null: padded (T rows each) or one sequence of all N
  int cu_element_size;
  int64_t n_cu, N, T, S, ignore_index;
  bool padded;
  float *kl_sum, *kl_mean, *counts;  // [S]
  int32_t* sequence;                 // [N]
};

constexpr int kSumThreads = 256;

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, T* scratch, Op op) {  // fixed order; result in every thread
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int half = kSumThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + half]);
    __syncthreads();
  }
  const T result = scratch[0];
  __syncthreads();
  return result;
}

__device__ __forceinline__ int64_t boundary(const SumParams& p, int64_t i) {  // clamped into [0, N]
  const int64_t c = p.cu_element_size == 4 ? static_cast<const int32_t*>(p.cu_seqlens)[i]
                                           : static_cast<const int64_t*>(p.cu_seqlens)[i];
  return c < 0 ? 0 : c > p.N ? p.N : c;
}

__global__ void __launch_bounds__(kSumThreads) sequence_sums_kernel(SumParams p) {
  __shared__ double sums[kSumThreads];
  __shared__ int64_t ints[kSumThreads];
  const int64_t s = blockIdx.x;
  int64_t start, end;
  if (p.padded) {
    start = s * p.T, end = start + p.T;
  } else if (p.cu_seqlens == nullptr) {
    start = 0, end = p.N;
  } else {  // running max of the boundaries up to s and s + 1
    int64_t a = 0, b = 0;
    for (int64_t i = threadIdx.x; i <= s + 1 && i < p.n_cu; i += kSumThreads) {
      const int64_t c = boundary(p, i);
      if (i <= s && c > a) a = c;
      if (c > b) b = c;
    }
    auto max_op = [](int64_t x, int64_t y) { return x > y ? x : y; };
    start = block_reduce(a, ints, max_op);
    end = block_reduce(b, ints, max_op);
  }
  if (s == 0)
    for (int64_t n = threadIdx.x; n < start; n += kSumThreads) p.sequence[n] = -1;
  if (s == p.S - 1)
    for (int64_t n = end + threadIdx.x; n < p.N; n += kSumThreads) p.sequence[n] = -1;
  double total = 0;
  int64_t used = 0;
  for (int64_t n = start + threadIdx.x; n < end; n += kSumThreads) {
    total += p.kl[n];
    used += p.labels[n] != p.ignore_index && p.mask.valid(n);
    p.sequence[n] = static_cast<int32_t>(s);
  }
  total = block_reduce(total, sums, [](double x, double y) { return x + y; });
  used = block_reduce(used, ints, [](int64_t x, int64_t y) { return x + y; });
  if (threadIdx.x == 0) {
    const float sum = static_cast<float>(total), count = static_cast<float>(used);
    p.kl_sum[s] = sum;
    p.counts[s] = count;
    p.kl_mean[s] = sum / (count > 1.0f ? count : 1.0f);  // a sequence with no valid row: 0 / 1
  }
}

inline void launch_sequence_sums(const SumParams& p, cudaStream_t stream) {
  if (p.S == 0) return;
  sequence_sums_kernel<<<static_cast<unsigned>(p.S), kSumThreads, 0, stream>>>(p);
}

// kl_penalty's chain in the backward kernel (on = false: fused_kl_bwd alone): the gradients of kl,
// penalty [N] and kl_sum, kl_mean [S] reach the row's logp (or, for `full`, its exact KL)
struct PenaltyBwd {
  bool on;
  Upstream grad_kl, grad_penalty, grad_kl_sum, grad_kl_mean;  // each null when nothing flows
  const float *counts, *logp, *ref_logp;
  const int32_t* sequence;
  AnyMask mask;
  EstimatorSpec<float> spec;
  const float* kl_coef_ptr;
  float kl_coef;
};

struct BwdParams {
  const int64_t* labels;
  const float* temperature;
  float inv_temperature;
  int64_t N, V, ignore_index;
  VocabShard shard;
  Upstream grad_logp, grad_entropy, grad_full;  // [N] each, or null
  const double *lse, *ref_lse;                         // saved by the forward (null when unused)
  const float *entropy, *full_kl;
  PenaltyBwd penalty;
};

// The row's upstream gradient through its kl (fused_kl_math.h kl_upstream, times_slope)
__device__ __forceinline__ float through_kl(const BwdParams& p, int64_t n, int64_t label) {
  const PenaltyBwd& c = p.penalty;
  if (label == p.ignore_index || !c.mask.valid(n)) return 0.0f;
  const int64_t s = c.sequence[n];  // -1: outside every sequence, no sum term
  const float upstream = kl_upstream(
      c.grad_kl ? c.grad_kl[n] : 0.0f, c.grad_penalty ? c.grad_penalty[n] : 0.0f,
      c.grad_penalty ? (c.kl_coef_ptr ? *c.kl_coef_ptr : c.kl_coef) : 0.0f,
      c.grad_kl_sum && s >= 0 ? c.grad_kl_sum[s] : 0.0f, c.grad_kl_mean && s >= 0 ? c.grad_kl_mean[s] : 0.0f,
      s >= 0 ? c.counts[s] : 1.0f);
  const float full = c.spec.kind == kFull ? p.full_kl[n] : 0.0f;
  return times_slope(upstream, estimate(c.spec, c.logp[n], c.ref_logp[n], full).slope);
}

// grad may alias logits (inplace_backward): each value is read before the same thread writes it.
template <typename scalar_t, typename ref_t>
__global__ void fused_kl_bwd_kernel(Rows<scalar_t> grad, Rows<const scalar_t> logits, Rows<const ref_t> ref_logits,
                                    BwdParams p) {
  const int64_t n = blockIdx.x;
  const bool chain_full = p.penalty.on && p.penalty.spec.kind == kFull;
  const bool use_ref = static_cast<bool>(p.grad_full) || chain_full;
  RowGrad<float> r{p.grad_logp ? p.grad_logp[n] : 0.0f, p.grad_entropy ? p.grad_entropy[n] : 0.0f,
                   p.grad_full ? p.grad_full[n] : 0.0f, p.grad_entropy ? p.entropy[n] : 0.0f,
                   use_ref ? p.full_kl[n] : 0.0f, lse_parts<float>(p.lse[n]),
                   lse_parts<float>(use_ref ? p.ref_lse[n] : 0.0),
                   p.temperature != nullptr ? 1.0f / p.temperature[n] : p.inv_temperature};
  const int64_t label = p.labels[n];
  if (p.penalty.on) {  // every thread computes it: a few flops, no barrier
    const float through = through_kl(p, n, label);
    if (chain_full) r.g_full += through; else r.g_logp += through;
  }
  scalar_t* out = grad.row(n);
  // nothing flows back from ignored or fully masked rows: an exact 0, even for NaN logits (not read)
  if (label == p.ignore_index || (r.g_logp == 0.0f && r.g_entropy == 0.0f && r.g_full == 0.0f)) {
    map_row(static_cast<const scalar_t*>(nullptr), static_cast<const ref_t*>(nullptr), out, p.V,
            [](int64_t, float, float) { return 0.0f; });
    return;
  }
  const bool bad = p.shard.bad(label);
  // the label's own term at its column of this shard; none when another rank's shard owns it
  const int64_t label_col = p.shard.owns(label, p.V) ? label - p.shard.start : -1;
  // full's term only where its gradient flows: a row whose kl is masked never reads its reference
  const bool row_ref = use_ref && r.g_full != 0.0f;
  const ref_t* ref_row = row_ref ? ref_logits.row(n) : nullptr;
  map_row(logits.row(n), ref_row, out, p.V, [&](int64_t v, float x, float xr) {
    // z/T - lse: the product exact inside the fma, lse's head then its tail (fused_kl_math.h lse_parts)
    const float log_p = __fmaf_rn(x, r.inv_t, -r.lse.head) - r.lse.tail;
    const float prob = __expf(log_p);
    const float log_q = __fmaf_rn(xr, r.inv_t, -r.ref_lse.head) - r.ref_lse.tail;
    const float f = logit_factor(log_p, log_q, r.g_logp, r.g_entropy, r.entropy, r.g_full, r.kl, row_ref);
    float g = prob == 0.0f ? 0.0f : prob * f * r.inv_t;  // a -inf logit: 0, not 0 * inf
    if (v == label_col) g += r.g_logp * r.inv_t;
    return bad ? __int_as_float(0x7fc00000) : g;
  });
}

// Threads per row: enough 16-byte loads in flight for a long row, few idle threads on a short one.
inline int threads_for(int64_t V) { return V >= 16384 ? 512 : V >= 2048 ? 256 : 128; }

template <typename scalar_t, typename ref_t>
void launch_fused_kl_fwd(Rows<const scalar_t> logits, Rows<const ref_t> ref_logits, bool has_ref,
                         const FwdParams& p, cudaStream_t stream) {
  if (p.N == 0) return;
  fused_kl_fwd_kernel<scalar_t, ref_t><<<static_cast<unsigned>(p.N), threads_for(p.V), 0, stream>>>(
      logits, ref_logits, has_ref, p);
}

template <typename scalar_t, typename ref_t>
void launch_fused_kl_bwd(Rows<scalar_t> grad, Rows<const scalar_t> logits, Rows<const ref_t> ref_logits,
                         const BwdParams& p, cudaStream_t stream) {
  if (p.N == 0) return;
  fused_kl_bwd_kernel<scalar_t, ref_t><<<static_cast<unsigned>(p.N), threads_for(p.V), 0, stream>>>(
      grad, logits, ref_logits, p);
}

}  // namespace cuda
}  // namespace kl_kernels
