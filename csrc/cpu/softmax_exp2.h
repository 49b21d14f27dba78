// The CPU kernels' 2^y (csrc/cpu/fused_kl.cpp), in a header of its own so that the test library
// (csrc/tools/testing.cpp) runs the very same code, compiled with the same instruction-set flags.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace kl_kernels {

using at::vec::Vectorized;

// 2^y for the softmax terms, which the kernels write as powers of two: e^((z - m)/T) =
// 2^((z - m) * log2(e)/T), the constant folded into 1/T once per row (as GPU softmaxes do), so the
// range reduction is exact in one subtraction instead of a two-step Cody-Waite. Two of these per
// logit are the forward's whole cost. With AVX-512: n = round(y), f = y - n in [-1/2, 1/2] (exact:
// the nearest integer, unlike floor, keeps the digits of y just below 0, the terms near the max that
// the sums are made of), 2^f by a degree-6 polynomial fitted for minimax relative error on
// [-1/2, 1/2] (3.0e-9 before float32 rounding; coefficients rounded one at a time, the rest
// refitted), and vscalefps for 2^n, which is exact at the ends: y is first raised to -151, where
// p(f) * 2^-151 rounds to 0 even as a denormal, so -inf (a banned token) gives exactly 0; NaN stays
// NaN (max with y second returns y). Finite y above 128 overflow to +inf as 2^y does. Measured
// within 0.8 ulp of float64 2^y on [-151, 1] (every 97th float32; tests/test_fused_kl_ops.py holds
// it to 2 ulp); the e^x it replaced (Cody-Waite + Taylor to r^7) took 12 instructions, this 10.
// AVX2 runs the same polynomial (results below 2^-126 flush to 0); elsewhere ATen's exp2 (Sleef).
constexpr double kLog2e = 1.44269504088896340736;

// 2^f on [-1/2, 1/2], highest degree first (Horner)
constexpr int kExp2Terms = 7;
constexpr float kExp2Poly[kExp2Terms] = {0x1.416b5ep-13f, 0x1.5f0830p-10f, 0x1.3b2de0p-7f, 0x1.c6af7cp-5f,
                                         0x1.ebfbdcp-3f,  0x1.62e430p-1f,  1.0f};

template <typename acc_t>
Vectorized<acc_t> softmax_exp2(const Vectorized<acc_t>& y) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 v = _mm512_max_ps(_mm512_set1_ps(-151.0f), y);
    const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(v, n);  // in [-1/2, 1/2], exact
    __m512 p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int k = 1; k < kExp2Terms; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[k]));  // Horner
    return _mm512_scalef_ps(p, n);  // p * 2^n
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    // the same polynomial; AVX2 has no vscalefps, so 2^n is built in the exponent bits, for n in
    // [-127, 128]: -127 gives the bits of 0.0 (so -inf, and every y below -126.5, is exactly 0: such a
    // term is below 2^-126 of the row's largest, and a denormal would be as good as 0), 128 gives
    // +inf (so does every y from 127.5: the callers' y stay below ~93). min/max with y second keep
    // NaN, which the polynomial carries to the result.
    const __m256 v = _mm256_min_ps(_mm256_set1_ps(128.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), y));
    const __m256 n = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(v, n);
    __m256 p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int k = 1; k < kExp2Terms; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[k]));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
  }
#endif
  return y.exp2();
}

}  // namespace kl_kernels
