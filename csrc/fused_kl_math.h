// Per-row math of the fused KL pass, shared by every C++ kernel (CPU and CUDA).
// Torch-free and host/device-inline so that plain nvcc can compile it with the device code.
//
// Notation: z = policy row, z' = reference row, T = temperature, inv_t = 1/T, y = label.
// A row is reduced to running sums around its running max m (online log-sum-exp). Kernels keep
// them in raw logit units, m = max z, with the temperature inside exp (max(z/T) = max(z)/T for
// T > 0), and convert once per row with scaled():
//   s   = sum_v e^((z_v - m)/T)                    -> lse = m/T + log s
//   sx  = sum_v e^((z_v - m)/T) (z_v - m)          -> entropy H = log s - (sx/T) / s
//   sd  = sum_v e^((z_v - m)/T) (z_v - z'_v)       -> KL(p||q) = (sd/T) / s - lse + ref_lse (full_kl)
// sx is shifted by m: each term is at most T/e in size, so it neither overflows for huge logits
// (a raw sum of e * z does once |z| > ~3.4e38 / V) nor cancels against lse when logits are large.
// Terms with e^(...) == 0 count as 0, so a -inf logit (a banned token) adds nothing rather
// than 0 * -inf = NaN; NaN logits still propagate through m. A row whose lse is +inf (a +inf
// logit, or one that overflows once divided by T) has no defined softmax: lse becomes NaN, and
// with it every output and gradient of the row, as in every backend.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KL_HOST_DEVICE inline
#endif

namespace kl_kernels {

// The columns a kernel sees are the slice [start, start + V) of a vocabulary of `size` ids: all of it
// (start 0, size V), or one tensor-parallel rank's shard (kl_kernels/sharding.py). Labels are ids of
// the whole vocabulary. A label outside it is bad (only with validate=False: the row is NaN); a
// label in another rank's shard has no column here: the row's sums are this shard's, its label
// log-prob is -inf (no mass of the label here) and the backward adds no label term.
struct VocabShard {
  int64_t start, size;
  KL_HOST_DEVICE bool bad(int64_t label) const { return label < 0 || label >= size; }
  KL_HOST_DEVICE bool owns(int64_t label, int64_t V) const { return label >= start && label - start < V; }
  KL_HOST_DEVICE bool fits(int64_t V) const { return start >= 0 && start <= size - V; }  // no overflow
};

template <typename acc_t>
struct RowSums {
  acc_t m, s, sx, sd;
};

template <typename acc_t>
KL_HOST_DEVICE RowSums<acc_t> empty_row_sums() {
  return {-INFINITY, acc_t(0), acc_t(0), acc_t(0)};
}

// max that keeps a NaN once seen, so a NaN row stays NaN through every rescale
template <typename acc_t>
KL_HOST_DEVICE acc_t nan_max(acc_t a, acc_t b) {
  return a != a ? a : b != b ? b : (a > b ? a : b);
}

// The online log-sum-exp step: move the sums to the running max new_max (>= r.m, raw units).
template <typename acc_t>
KL_HOST_DEVICE void raise_max(RowSums<acc_t>& r, acc_t new_max, acc_t inv_t) {
  if (r.m == -INFINITY) {  // nothing summed yet: every sum is 0 and stays 0
    r.m = new_max;
    return;
  }
  const acc_t factor = std::exp((r.m - new_max) * inv_t);
  // sx is kept around m: sum e (z - m_new) = sum e (z - m) + (m - m_new) sum e
  r.sx = (r.sx + (r.m - new_max) * r.s) * factor;
  r.s *= factor;
  // an infinite sd (sd_term: a token the reference bans) stays infinite, even when factor underflows to 0
  if (r.sd != acc_t(INFINITY)) r.sd *= factor;
  r.m = new_max;
}

// One term of the full KL's sum sd, e * (z - z') for e = e^((z - m)/T): 0 where e == 0 (a -inf policy
// logit adds nothing, not 0 * -inf); +inf, whatever e, where z' = -inf and z > -inf: the reference bans
// a token the policy can sample, so KL(p||q) is infinite however small p is (not 0 once e underflows,
// nor 0 * inf = NaN when the sums are later moved to a higher max).
template <typename acc_t>
KL_HOST_DEVICE acc_t sd_term(acc_t e, acc_t w) {
  return w == acc_t(INFINITY) ? w : e == acc_t(0) ? acc_t(0) : e * w;
}

// Two partial sums of one row (tiles, threads, warps) -> the sums of both, around the larger max.
template <typename acc_t>
KL_HOST_DEVICE RowSums<acc_t> merge(RowSums<acc_t> a, RowSums<acc_t> b, acc_t inv_t) {
  const acc_t m = nan_max(a.m, b.m);
  raise_max(a, m, inv_t);
  raise_max(b, m, inv_t);
  return {m, a.s + b.s, a.sx + b.sx, a.sd + b.sd};
}

// Raw-unit sums -> the units of z/T that log_sum_exp, entropy and full_kl read.
template <typename acc_t>
KL_HOST_DEVICE RowSums<acc_t> scaled(const RowSums<acc_t>& r, acc_t inv_t) {
  return {r.m * inv_t, r.s, r.sx * inv_t, r.sd * inv_t};
}

template <typename acc_t>
KL_HOST_DEVICE acc_t log_sum_exp(const RowSums<acc_t>& r) {
  const acc_t lse = r.m + std::log(r.s);
  return lse == INFINITY ? acc_t(NAN) : lse;
}

// The lse a row saves for its backward, in double: m/T + log s formed without a float rounding of
// the sum (|lse| 2^-24: 6e-4 at lse = 1e4), which every p = exp(z/T - lse) of the backward would
// carry into the gradient (issue 28). The backward splits it into a float head and tail (lse_parts).
template <typename acc_t>
KL_HOST_DEVICE double saved_lse(const RowSums<acc_t>& raw, acc_t inv_t) {
  const double lse = double(raw.m) * double(inv_t) + double(std::log(raw.s));
  return lse == INFINITY ? double(NAN) : lse;
}

// A saved lse as head + tail in acc_t: z/T - lse = fma(z, 1/T, -head) - tail keeps z/T's product exact
// and rounds where the result is small (near the max), so p carries none of lse's size in its error.
template <typename acc_t>
struct LseParts {
  acc_t head, tail;
};

template <typename acc_t>
KL_HOST_DEVICE LseParts<acc_t> lse_parts(double lse) {
  const acc_t head = static_cast<acc_t>(lse);
  return {head, static_cast<acc_t>(lse - double(head))};
}

// log p_y = (z_y - m)/T - log s from the raw (unscaled) sums and the raw label logit. The difference
// with the max is exact (a confident token, z_y = m, gets exactly -log s), then rounded once by 1/T.
// Not z_y/T - m/T: two rounded products whose difference a compiler may contract into one fma that
// keeps one product's rounding (half an ulp of z/T: +0.39 at T = 0.001, z = 1e4, issue 28), and not
// z_y/T - lse, a multiple of lse's ulp (1.5e-5 at lse = 250). NaN with the row's lse.
template <typename acc_t>
KL_HOST_DEVICE acc_t label_logprob(const RowSums<acc_t>& raw, acc_t label_logit, acc_t inv_t, acc_t lse) {
  return lse != lse ? lse : (label_logit - raw.m) * inv_t - std::log(raw.s);
}

template <typename acc_t>
KL_HOST_DEVICE acc_t entropy(const RowSums<acc_t>& r, acc_t lse) {
  return lse != lse ? lse : std::log(r.s) - r.sx / r.s;  // NaN with the row's lse
}

// KL(p||q) = (sd/T)/s - (lse - ref_lse) from the raw (unscaled) sums of both rows: the gap as
// (m - m')/T + log(s/s'), not as the difference of the two lse, which are ~max z/T each, so that
// difference would lose every digit of a small KL below lse's ulp (3e-5 at lse = 400; torch's
// log_softmax keeps them). m - m' is exact when the rows' maxima are within 2x. NaN with either lse.
template <typename acc_t>
KL_HOST_DEVICE acc_t full_kl(const RowSums<acc_t>& p, const RowSums<acc_t>& q, acc_t inv_t, acc_t lse, acc_t ref_lse) {
  if (lse != lse || ref_lse != ref_lse) return acc_t(NAN);
  return p.sd * inv_t / p.s - ((p.m - q.m) * inv_t + std::log(p.s / q.s));
}

// Row state of the backward: d out / d z_v = (g_logp [v == y] + p_v * f(v)) / T with
//   f(v) = -g_logp - g_H (log p_v + H) + g_F (log p_v - log q_v - KL);
// where p_v == 0 (a -inf logit) the gradient is 0, not 0 * inf.
template <typename acc_t>
struct RowGrad {
  acc_t g_logp, g_entropy, g_full, entropy, kl;
  LseParts<acc_t> lse, ref_lse;
  acc_t inv_t;
};

// f(v) above, for one value (GPU) or one SIMD vector of values (CPU, ATen Vectorized<acc_t>):
// every argument has the vector's type; log_q is read only with use_ref.
template <typename vec_t>
KL_HOST_DEVICE vec_t logit_factor(vec_t log_p, vec_t log_q, vec_t g_logp, vec_t g_entropy, vec_t entropy,
                                  vec_t g_full, vec_t kl, bool use_ref) {
  vec_t f = -g_logp - g_entropy * (log_p + entropy);
  if (use_ref) f = f + g_full * (log_p - log_q - kl);
  return f;
}

// ---- The KL estimator of one token (kl_kernels/estimators.py is the truth; this is its C++ form,
// shared by the CPU and CUDA kernels, and the Triton helpers in kl_kernels/backends/triton/fused_kl.py).
// Kinds as estimators.ESTIMATOR_CODES. r = log(q/p) = ref_logp - logp, clamped first when a
// log-ratio clamp is set (verl's low_var_kl); the kl clamp bounds the value (the sampled estimators'
// gradient is 0 where it bites; `full`'s follows torch.clamp: 0 strictly outside the bounds).
enum EstimatorKind : int64_t { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3, kFull = 4 };

template <typename acc_t>
struct EstimatorSpec {
  int64_t kind;
  bool straight_through;  // the "+" forms: the value of `kind`, the gradient of unclamped k2
  acc_t log_ratio_clamp, kl_clamp;  // +inf: none
};

// value, and its derivative by logp (sampled estimators) or by the exact KL (`full`)
template <typename acc_t>
struct Estimate {
  acc_t value, slope;
};

// clamp that keeps NaN (std::min / std::max would not), with torch.clamp's inclusive gradient mask
template <typename acc_t>
KL_HOST_DEVICE acc_t clamp_keep_nan(acc_t x, acc_t bound) {
  return x < -bound ? -bound : x > bound ? bound : x;
}

template <typename acc_t>
KL_HOST_DEVICE Estimate<acc_t> estimate(const EstimatorSpec<acc_t>& e, acc_t logp, acc_t ref_logp, acc_t full) {
  const acc_t inf = INFINITY;
  Estimate<acc_t> out;
  if (e.kind == kFull) {
    out = {full, acc_t(1)};
  } else if (e.kind == kK1 && e.log_ratio_clamp == inf) {
    out = {logp - ref_logp, acc_t(1)};  // one subtraction, not a negated reverse ratio (as estimators.py)
  } else {
    acc_t r = ref_logp - logp;  // d r / d logp = -1, or 0 where the log-ratio clamp holds it (a select:
    bool held = false;          // torch.clamp's gradient is 0 there even when the slope is NaN)
    if (e.log_ratio_clamp != inf) {
      held = !(r >= -e.log_ratio_clamp && r <= e.log_ratio_clamp);
      r = clamp_keep_nan(r, e.log_ratio_clamp);
    }
    switch (e.kind) {
      case kK1: out = {-r, acc_t(1)}; break;
      case kAbs: out = {std::fabs(r), r > 0 ? acc_t(-1) : r < 0 ? acc_t(1) : acc_t(0)}; break;  // torch: sgn(NaN) = 0
      case kK2: out = {acc_t(0.5) * r * r, -r}; break;
      default:  // k3 = e^r - r - 1, via expm1 for the digits that cancel; +inf at r = +inf (slope 0: a constant)
        out = r == inf ? Estimate<acc_t>{inf, acc_t(0)} : Estimate<acc_t>{std::expm1(r) - r, -std::expm1(r)};
    }
    if (held) out.slope = 0;
  }
  if (e.kl_clamp != inf) {
    const bool inside = out.value >= -e.kl_clamp && out.value <= e.kl_clamp;
    // a sampled estimator is bounded where it bites (strictly outside) and keeps NaN; `full` is torch.clamp
    if (e.kind == kFull ? !inside : (out.value > e.kl_clamp || out.value < -e.kl_clamp)) out.slope = 0;
    out.value = clamp_keep_nan(out.value, e.kl_clamp);
  }
  if (e.straight_through) out.slope = logp - ref_logp;
  return out;
}

// The gradient a token's kl receives from kl, penalty, kl_sum and kl_mean, times the estimator's
// slope; 0 (not 0 * inf) where nothing flows, as autograd's select would give.
template <typename acc_t>
KL_HOST_DEVICE acc_t kl_upstream(acc_t g_kl, acc_t g_penalty, acc_t kl_coef, acc_t g_sum, acc_t g_mean, acc_t count) {
  return g_kl - kl_coef * g_penalty + g_sum + g_mean / (count > acc_t(1) ? count : acc_t(1));
}

template <typename acc_t>
KL_HOST_DEVICE acc_t times_slope(acc_t upstream, acc_t slope) {
  return upstream == acc_t(0) ? acc_t(0) : upstream * slope;
}

}  // namespace kl_kernels
