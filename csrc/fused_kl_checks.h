// Argument checks shared by the CPU and CUDA glue (torch-side: TORCH_CHECK; fused_kl_math.h stays
// torch-free for plain nvcc).
#pragma once

#include <c10/util/Exception.h>

#include "fused_kl_math.h"

namespace kl_kernels {

// The V columns as a slice of the vocabulary (fused_kl_math.h's VocabShard), checked to lie inside it.
inline VocabShard checked_shard(int64_t vocab_start, int64_t vocab_size, int64_t V) {
  const VocabShard shard{vocab_start, vocab_size};
  TORCH_CHECK(shard.fits(V), "kl_kernels: vocab_start and vocab_size must place the ", V,
              " columns inside the vocabulary, got ", vocab_start, " and ", vocab_size);
  return shard;
}

}  // namespace kl_kernels

// kl_penalty_fwd's arguments and outputs, and kl_penalty_bwd's arguments in three parts around the
// logits (csrc/registration.cpp), so the CPU and CUDA glue declare them once: the backward's six
// upstream gradients, the rest, and a call of the device's kl_penalty_bwd_into with them that writes
// `grad`. The glue includes <ATen/core/Tensor.h>, <optional> and <tuple> and has `using at::Tensor`
// before these are expanded.
#define KL_PENALTY_FWD_ARGS                                                                                        \
  const Tensor &logits, const Tensor &labels, const std::optional<Tensor>&ref_logits,                             \
      const std::optional<Tensor>&ref_logprobs, const std::optional<Tensor>&mask,                                 \
      const std::optional<Tensor>&cu_seqlens, const std::optional<Tensor>&temperature, double scalar_temperature, \
      int64_t ignore_index, int64_t estimator, bool straight_through, std::optional<double> log_ratio_clamp,      \
      std::optional<double> kl_clamp, const std::optional<Tensor>&kl_coef, double scalar_kl_coef, bool padded,    \
      bool need_entropy
// logp, ref_logp, kl, penalty, kl_sum, kl_mean, counts, sequence, entropy, full_kl, lse, ref_lse
#define KL_PENALTY_FWD_OUTPUTS                                                                                     \
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
#define KL_PENALTY_BWD_ARGS                                                                                        \
  const std::optional<Tensor>&grad_logp, const std::optional<Tensor>&grad_kl,                                      \
      const std::optional<Tensor>&grad_penalty, const std::optional<Tensor>&grad_kl_sum,                           \
      const std::optional<Tensor>&grad_kl_mean, const std::optional<Tensor>&grad_entropy
#define KL_PENALTY_BWD_REST                                                                                        \
  const Tensor &labels, const std::optional<Tensor>&ref_logits, const std::optional<Tensor>&mask,                 \
      const std::optional<Tensor>&temperature, double scalar_temperature, int64_t ignore_index, int64_t estimator, \
      bool straight_through, std::optional<double> log_ratio_clamp, std::optional<double> kl_clamp,               \
      const std::optional<Tensor>&kl_coef, double scalar_kl_coef, const Tensor &logp, const Tensor &ref_logp,     \
      const Tensor &counts, const Tensor &sequence, const Tensor &lse,                                             \
      const std::optional<Tensor>&ref_lse, const std::optional<Tensor>&entropy_out,                              \
      const std::optional<Tensor>&full_out
#define KL_PENALTY_BWD_CALL(logits, grad)                                                                          \
  kl_penalty_bwd_into(grad_logp, grad_kl, grad_penalty, grad_kl_sum, grad_kl_mean, grad_entropy, logits, labels,  \
                      ref_logits, mask, temperature, scalar_temperature, ignore_index, estimator, straight_through, \
                      log_ratio_clamp, kl_clamp, kl_coef, scalar_kl_coef, logp, ref_logp, counts, sequence, lse,   \
                      ref_lse, entropy_out, full_out, grad)
