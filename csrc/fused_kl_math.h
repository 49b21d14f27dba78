// Per-row math of the fused KL pass, shared by every C++ kernel (CPU now, CUDA later).
// Torch-free and host/device-inline so that plain nvcc can compile it with the device code.
//
// Notation: x = z / T (policy row), xr = z' / T (reference row), y = label.
// A row is reduced to running sums around its running max m (online log-sum-exp):
//   s   = sum_v e^(x_v - m)                  -> lse = m + log s
//   sx  = sum_v e^(x_v - m) x_v              -> entropy H = lse - sx / s
//   sd  = sum_v e^(x_v - m) (x_v - xr_v)     -> KL(p||q) = sd / s - lse + ref_lse
// Terms with e^(x_v - m) == 0 count as 0, so a -inf logit (a banned token) adds nothing rather
// than 0 * -inf = NaN; NaN logits still propagate through m.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KL_HOST_DEVICE inline
#endif

namespace kl_kernels {

template <typename acc_t>
struct RowSums {
  acc_t m, s, sx, sd;
};

template <typename acc_t>
KL_HOST_DEVICE RowSums<acc_t> empty_row_sums() {
  return {-INFINITY, acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
KL_HOST_DEVICE acc_t log_sum_exp(const RowSums<acc_t>& r) {
  return r.m + std::log(r.s);
}

template <typename acc_t>
KL_HOST_DEVICE acc_t entropy(const RowSums<acc_t>& r, acc_t lse) {
  return lse - r.sx / r.s;
}

template <typename acc_t>
KL_HOST_DEVICE acc_t full_kl(const RowSums<acc_t>& r, acc_t lse, acc_t ref_lse) {
  return r.sd / r.s - lse + ref_lse;
}

// Row state of the backward: d out / d z_v = (g_logp [v == y] + p_v * f(v)) / T with
//   f(v) = -g_logp - g_H (log p_v + H) + g_F (log p_v - log q_v - KL).
template <typename acc_t>
struct RowGrad {
  acc_t g_logp, g_entropy, g_full, entropy, kl, lse, ref_lse, inv_t;
};
// (p_v == 0, a -inf logit, has gradient 0, not 0 * inf.)


}  // namespace kl_kernels
