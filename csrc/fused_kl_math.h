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

// Factor that rescales sums kept around old_max to new_max (0 when nothing was summed yet).
template <typename acc_t>
KL_HOST_DEVICE acc_t rescale(acc_t old_max, acc_t new_max) {
  return old_max == -INFINITY ? acc_t(0) : std::exp(old_max - new_max);
}

// Merge two partial reductions of the same row (tiles, threads or warps).
template <typename acc_t>
KL_HOST_DEVICE RowSums<acc_t> merge(RowSums<acc_t> a, RowSums<acc_t> b) {
  acc_t m = a.m > b.m ? a.m : b.m;
  if (a.m != a.m || b.m != b.m) m = a.m != a.m ? a.m : b.m;  // NaN wins
  if (m == -INFINITY) return a;
  const acc_t fa = rescale(a.m, m), fb = rescale(b.m, m);
  return {m, a.s * fa + b.s * fb, a.sx * fa + b.sx * fb, a.sd * fa + b.sd * fb};
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

// Row state of the backward: d out / d z_v = (coef_y [v == y] + p_v * f(v)) / T with
//   f(v) = -g_logp - g_H (log p_v + H) + g_F (log p_v - log q_v - KL).
template <typename acc_t>
struct RowGrad {
  acc_t g_logp, g_entropy, g_full, entropy, kl, lse, ref_lse, inv_t;
};

template <typename acc_t>
KL_HOST_DEVICE acc_t grad_element(const RowGrad<acc_t>& g, acc_t x, acc_t xr) {
  const acc_t log_p = x - g.lse;
  const acc_t p = std::exp(log_p);
  if (p == acc_t(0)) return acc_t(0);  // a -inf logit has zero gradient, not 0 * inf
  acc_t f = -g.g_logp - g.g_entropy * (log_p + g.entropy);
  if (g.g_full != acc_t(0)) f += g.g_full * (log_p - (xr - g.ref_lse) - g.kl);
  return p * f * g.inv_t;
}

}  // namespace kl_kernels
