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
  if (e != 0.0f) {  // a -inf logit adds nothing (not 0 * -inf)
    if (need_sx) r.sx += e * (x - r.m);  // kept around the running max (fused_kl_math.h)
    if (need_sd) r.sd += e * w_sd;
  }
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

struct FwdParams {
  const int64_t* labels;     // [N]
  const float* temperature;  // [N] or null: then inv_temperature
  float inv_temperature;
  int64_t N, V, ignore_index;
  VocabShard shard;  // the columns' place in the vocabulary (fused_kl_math.h)
  bool need_entropy, need_full;
  float *logp, *ref_logp, *entropy, *full_kl, *lse, *ref_lse;  // [N] each; ref_* null without a reference
};

template <typename scalar_t, typename ref_t>
__global__ void fused_kl_fwd_kernel(Rows<const scalar_t> logits, Rows<const ref_t> ref_logits, bool has_ref,
                                    FwdParams p) {
  __shared__ RowSums<float> scratch[32];
  const int64_t n = blockIdx.x;
  const int64_t label = p.labels[n];
  const bool valid = label != p.ignore_index;
  if (!valid) {  // an ignored row (prompt tokens, padding) is 0 in every output: none of it is read
    if (threadIdx.x == 0) {
      p.logp[n] = p.lse[n] = 0.0f;
      if (has_ref) p.ref_logp[n] = p.ref_lse[n] = 0.0f;
      if (p.need_entropy) p.entropy[n] = 0.0f;
      if (p.need_full) p.full_kl[n] = 0.0f;
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
  p.lse[n] = lse;
  // a label outside the vocabulary only gets here with validate=False: NaN in its row, nothing read;
  // one in another rank's shard has no mass here: -inf
  const bool bad = p.shard.bad(label), owned = p.shard.owns(label, p.V);
  const int64_t col = label - p.shard.start;
  const float nan = __int_as_float(0x7fc00000), inf = __int_as_float(0x7f800000);
  auto out = [&](float value) { return bad ? nan : value; };
  p.logp[n] = out(owned ? label_logprob(ps, to_float(row[col]) * inv_t, lse) : -inf);
  if (p.need_entropy) p.entropy[n] = out(entropy(ps, lse));
  if (has_ref) {
    const RowSums<float> qs = scaled(reference, inv_t);
    const float ref_lse = log_sum_exp(qs);
    p.ref_lse[n] = ref_lse;
    p.ref_logp[n] = out(owned ? label_logprob(qs, to_float(ref_row[col]) * inv_t, ref_lse) : -inf);
    if (p.need_full) p.full_kl[n] = out(full_kl(ps, lse, ref_lse));
  }
}

struct BwdParams {
  const int64_t* labels;
  const float* temperature;
  float inv_temperature;
  int64_t N, V, ignore_index;
  VocabShard shard;
  const float *grad_logp, *grad_entropy, *grad_full;  // [N] each, or null
  const float *lse, *ref_lse, *entropy, *full_kl;      // saved by the forward (null when unused)
};

// grad may alias logits (inplace_backward): each value is read before the same thread writes it.
template <typename scalar_t, typename ref_t>
__global__ void fused_kl_bwd_kernel(Rows<scalar_t> grad, Rows<const scalar_t> logits, Rows<const ref_t> ref_logits,
                                    BwdParams p) {
  const int64_t n = blockIdx.x;
  const bool use_ref = p.grad_full != nullptr;
  RowGrad<float> r{p.grad_logp ? p.grad_logp[n] : 0.0f, p.grad_entropy ? p.grad_entropy[n] : 0.0f,
                   use_ref ? p.grad_full[n] : 0.0f, p.grad_entropy ? p.entropy[n] : 0.0f,
                   use_ref ? p.full_kl[n] : 0.0f, p.lse[n], use_ref ? p.ref_lse[n] : 0.0f,
                   p.temperature != nullptr ? 1.0f / p.temperature[n] : p.inv_temperature};
  const int64_t label = p.labels[n];
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
    const float log_p = x * r.inv_t - r.lse;
    const float prob = __expf(log_p);
    const float f = grad_weight(log_p, xr * r.inv_t - r.ref_lse, r.g_logp, r.g_entropy, r.entropy, r.g_full, r.kl,
                                row_ref);
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
