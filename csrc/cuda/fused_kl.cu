// The CUDA kernels of fused_kl.cuh registered for the CUDA dispatch key of the schemas in
// csrc/registration.cpp: argument checks, outputs, the current stream, one dtype switch.
// c10/cuda rather than ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may not have.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../fused_kl_checks.h"
#include "fused_kl.cuh"

namespace kl_kernels {
namespace {

using at::Tensor;

#define KL_CHECK_ARG(cond, arg, ...) TORCH_CHECK(cond, "kl_kernels (cuda): ", arg, " ", __VA_ARGS__)

template <typename T>
struct Tag {
  using type = T;
};

// The one dtype switch: calls f(Tag<device type>) for the tensor's dtype.
template <typename F>
void dtype_switch(at::ScalarType dtype, const char* arg, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: KL_CHECK_ARG(false, arg, "must be float16, bfloat16 or float32 for the cuda backend, got ", dtype);
  }
}

void check_rows(const Tensor& t, const char* arg) {
  KL_CHECK_ARG(t.is_cuda(), arg, "must be a CUDA tensor");
  KL_CHECK_ARG(t.dim() == 3, arg, "must be [B, T, V], got ", t.sizes());
  KL_CHECK_ARG(t.size(2) <= 1 || t.stride(2) == 1, arg, "must have a contiguous vocabulary dim, got strides ",
               t.strides());
}

void check_rowwise(const std::optional<Tensor>& t, int64_t N, const char* arg, at::ScalarType dtype) {
  if (!t.has_value()) return;
  KL_CHECK_ARG(t->is_cuda() && t->dim() == 1 && t->numel() == N && t->is_contiguous() && t->scalar_type() == dtype,
               arg, "must be a contiguous [", N, "] ", dtype, " CUDA tensor, got ", t->sizes(), " ", t->scalar_type());
}

// an upstream gradient: any stride (autograd expands the gradient of a sum), one value per row or sequence
void check_upstream(const std::optional<Tensor>& t, int64_t n, const char* arg) {
  if (!t.has_value()) return;
  KL_CHECK_ARG(t->is_cuda() && t->dim() == 1 && t->numel() == n && t->scalar_type() == at::kFloat, arg,
               "must be a [", n, "] float32 CUDA tensor (any stride), got ", t->sizes(), " ", t->scalar_type());
}

cuda::Upstream upstream(const std::optional<Tensor>& t) {
  return t.has_value() ? cuda::Upstream{.data = t->data_ptr<float>(), .stride = t->stride(0)}
                       : cuda::Upstream{.data = nullptr, .stride = 0};
}

template <typename T>
cuda::Rows<T> rows(const Tensor& t) {
  return {.data = reinterpret_cast<T*>(t.data_ptr()), .T_len = t.size(1), .stride_b = t.stride(0),
          .stride_t = t.stride(1)};
}

template <typename T>
const T* ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

void check_common(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& ref_logits,
                  const std::optional<Tensor>& temperature) {
  check_rows(logits, "logits");
  const int64_t N = logits.size(0) * logits.size(1);
  KL_CHECK_ARG(N < (int64_t(1) << 31), "logits", "may have at most 2^31 - 1 rows (one block each), got ", N);
  check_rowwise(labels, N, "labels", at::kLong);
  check_rowwise(temperature, N, "temperature", at::kFloat);
  if (ref_logits.has_value()) {
    check_rows(*ref_logits, "ref_logits");
    KL_CHECK_ARG(ref_logits->sizes() == logits.sizes(), "ref_logits", "must have the logits' shape ", logits.sizes(),
                 ", got ", ref_logits->sizes());
  }
}

using FwdOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// fused_kl_fwd's launch; `penalty` adds kl_penalty's epilogue (its kl / penalty outputs already set)
FwdOutputs forward(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& ref_logits,
                   const std::optional<Tensor>& temperature, double scalar_temperature, int64_t ignore_index,
                   int64_t vocab_start, int64_t vocab_size, bool need_entropy, bool need_full, cuda::PenaltyFwd penalty);

FwdOutputs fused_kl_fwd_cuda(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& ref_logits,
                             const std::optional<Tensor>& temperature, double scalar_temperature, int64_t ignore_index,
                             int64_t vocab_start, int64_t vocab_size, bool need_entropy, bool need_full) {
  return forward(logits, labels, ref_logits, temperature, scalar_temperature, ignore_index, vocab_start, vocab_size,
                 need_entropy, need_full, cuda::PenaltyFwd{});
}

FwdOutputs forward(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& ref_logits,
                   const std::optional<Tensor>& temperature, double scalar_temperature, int64_t ignore_index,
                   int64_t vocab_start, int64_t vocab_size, bool need_entropy, bool need_full, cuda::PenaltyFwd penalty) {
  check_common(logits, labels, ref_logits, temperature);
  const VocabShard shard = checked_shard(vocab_start, vocab_size, logits.size(2));
  KL_CHECK_ARG(!need_full || ref_logits.has_value(), "need_full", "needs ref_logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0) * logits.size(1), V = logits.size(2);
  const bool has_ref = ref_logits.has_value();
  const auto stats = [&](bool needed) { return at::empty({needed ? N : 0}, logits.options().dtype(at::kFloat)); };
  const bool has_ref_logp = has_ref || penalty.ref_logprobs != nullptr;
  // the saved lse is double (fused_kl_math.h saved_lse)
  const auto saved = [&](bool needed) { return at::empty({needed ? N : 0}, logits.options().dtype(at::kDouble)); };
  Tensor logp = stats(true), ref_logp = stats(has_ref_logp), entropy = stats(need_entropy), full = stats(need_full),
         lse = saved(true), ref_lse = saved(has_ref);
  // parameter structs are filled by field name (designated initialisers, in declaration order)
  cuda::FwdParams p{.labels = labels.data_ptr<int64_t>(),
                    .temperature = ptr<float>(temperature),
                    .inv_temperature = static_cast<float>(1.0 / scalar_temperature),
                    .N = N, .V = V, .ignore_index = ignore_index,
                    .shard = shard,
                    .need_entropy = need_entropy, .need_full = need_full,
                    .logp = logp.data_ptr<float>(),
                    .ref_logp = has_ref_logp ? ref_logp.data_ptr<float>() : nullptr,
                    .entropy = need_entropy ? entropy.data_ptr<float>() : nullptr,
                    .full_kl = need_full ? full.data_ptr<float>() : nullptr,
                    .lse = lse.data_ptr<double>(),
                    .ref_lse = has_ref ? ref_lse.data_ptr<double>() : nullptr,
                    .penalty = penalty};
  const Tensor& reference = has_ref ? *ref_logits : logits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dtype_switch(logits.scalar_type(), "logits", [&](auto policy_tag) {
    using scalar_t = typename decltype(policy_tag)::type;
    dtype_switch(reference.scalar_type(), "ref_logits", [&](auto ref_tag) {
      using ref_t = typename decltype(ref_tag)::type;
      cuda::launch_fused_kl_fwd<scalar_t, ref_t>(rows<const scalar_t>(logits), rows<const ref_t>(reference), has_ref,
                                                 p, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, ref_logp, entropy, full, lse, ref_lse};
}

void fused_kl_bwd_into(const std::optional<Tensor>& grad_logp, const std::optional<Tensor>& grad_entropy,
                       const std::optional<Tensor>& grad_full, const Tensor& logits, const Tensor& labels,
                       const std::optional<Tensor>& ref_logits, const std::optional<Tensor>& temperature,
                       double scalar_temperature, int64_t ignore_index, int64_t vocab_start, int64_t vocab_size,
                       const Tensor& lse, const std::optional<Tensor>& ref_lse, const std::optional<Tensor>& entropy,
                       const std::optional<Tensor>& full_kl, const Tensor& grad,
                       cuda::PenaltyBwd penalty = cuda::PenaltyBwd{}) {
  check_common(logits, labels, ref_logits, temperature);
  const VocabShard shard = checked_shard(vocab_start, vocab_size, logits.size(2));
  check_rows(grad, "grad");
  const int64_t N = logits.size(0) * logits.size(1), V = logits.size(2);
  for (const auto& [t, name] : {std::pair{&grad_logp, "grad_logp"}, {&grad_entropy, "grad_entropy"},
                                {&grad_full, "grad_full"}}) {
    check_upstream(*t, N, name);
  }
  check_rowwise(lse, N, "lse", at::kDouble);
  KL_CHECK_ARG(!grad_entropy.has_value() || entropy.has_value(), "entropy", "is needed for grad_entropy");
  if (grad_entropy.has_value()) check_rowwise(entropy, N, "entropy", at::kFloat);
  const bool use_ref = grad_full.has_value() || (penalty.on && penalty.spec.kind == kFull);
  if (use_ref) {
    KL_CHECK_ARG(ref_logits.has_value() && ref_lse.has_value() && full_kl.has_value(), "grad_full",
                 "needs ref_logits, ref_lse and full_kl");
    check_rowwise(ref_lse, N, "ref_lse", at::kDouble);
    check_rowwise(full_kl, N, "full_kl", at::kFloat);
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda::BwdParams p{.labels = labels.data_ptr<int64_t>(),
                    .temperature = ptr<float>(temperature),
                    .inv_temperature = static_cast<float>(1.0 / scalar_temperature),
                    .N = N, .V = V, .ignore_index = ignore_index,
                    .shard = shard,
                    .grad_logp = upstream(grad_logp), .grad_entropy = upstream(grad_entropy),
                    .grad_full = upstream(grad_full),
                    .lse = lse.data_ptr<double>(), .ref_lse = use_ref ? ptr<double>(ref_lse) : nullptr,
                    .entropy = grad_entropy.has_value() ? ptr<float>(entropy) : nullptr,
                    .full_kl = use_ref ? ptr<float>(full_kl) : nullptr,
                    .penalty = penalty};
  const Tensor& reference = use_ref ? *ref_logits : logits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dtype_switch(logits.scalar_type(), "logits", [&](auto policy_tag) {
    using scalar_t = typename decltype(policy_tag)::type;
    dtype_switch(reference.scalar_type(), "ref_logits", [&](auto ref_tag) {
      using ref_t = typename decltype(ref_tag)::type;
      cuda::launch_fused_kl_bwd<scalar_t, ref_t>(rows<scalar_t>(grad), rows<const scalar_t>(logits),
                                                 rows<const ref_t>(reference), p, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor fused_kl_bwd_cuda(const std::optional<Tensor>& grad_logp, const std::optional<Tensor>& grad_entropy,
                         const std::optional<Tensor>& grad_full, const Tensor& logits, const Tensor& labels,
                         const std::optional<Tensor>& ref_logits, const std::optional<Tensor>& temperature,
                         double scalar_temperature, int64_t ignore_index, int64_t vocab_start, int64_t vocab_size,
                         const Tensor& lse, const std::optional<Tensor>& ref_lse, const std::optional<Tensor>& entropy,
                         const std::optional<Tensor>& full_kl) {
  check_rows(logits, "logits");
  Tensor grad = at::empty(logits.sizes(), logits.options());
  fused_kl_bwd_into(grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature, scalar_temperature,
                    ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy, full_kl, grad);
  return grad;
}

void fused_kl_bwd_inplace_cuda(const std::optional<Tensor>& grad_logp, const std::optional<Tensor>& grad_entropy,
                               const std::optional<Tensor>& grad_full, Tensor& logits, const Tensor& labels,
                               const std::optional<Tensor>& ref_logits, const std::optional<Tensor>& temperature,
                               double scalar_temperature, int64_t ignore_index, int64_t vocab_start,
                               int64_t vocab_size, const Tensor& lse, const std::optional<Tensor>& ref_lse,
                               const std::optional<Tensor>& entropy, const std::optional<Tensor>& full_kl) {
  fused_kl_bwd_into(grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature, scalar_temperature,
                    ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy, full_kl, logits);
}

// ---- kl_penalty in two launches forward (the row kernel with the estimator epilogue, then
// sequence_sums_kernel) and one backward (the row kernel with the chain from all six outputs).

cuda::AnyMask any_mask(const std::optional<Tensor>& mask, int64_t N) {
  if (!mask.has_value()) return {.data = nullptr, .element_size = 0, .is_float = false};
  KL_CHECK_ARG(mask->is_cuda() && mask->numel() == N && mask->is_contiguous(), "mask",
               "must be a contiguous CUDA tensor with one value per row (", N, "), got ", mask->sizes());
  KL_CHECK_ARG(!mask->is_complex(), "mask", "must be real");
  return {.data = mask->data_ptr(), .element_size = static_cast<int>(mask->element_size()),
          .is_float = mask->is_floating_point()};
}

EstimatorSpec<float> spec_of(int64_t estimator, bool straight_through, std::optional<double> log_ratio_clamp,
                             std::optional<double> kl_clamp) {
  KL_CHECK_ARG(estimator >= kK1 && estimator <= kFull, "estimator", "must be a code 0-4 (estimators.py), got ", estimator);
  return {.kind = estimator, .straight_through = straight_through,
          .log_ratio_clamp = log_ratio_clamp ? static_cast<float>(*log_ratio_clamp) : INFINITY,
          .kl_clamp = kl_clamp ? static_cast<float>(*kl_clamp) : INFINITY};
}

const float* coef_ptr(const std::optional<Tensor>& kl_coef) {
  if (!kl_coef.has_value()) return nullptr;
  KL_CHECK_ARG(kl_coef->is_cuda() && kl_coef->numel() == 1 && kl_coef->scalar_type() == at::kFloat, "kl_coef",
               "must be a one-element float32 CUDA tensor");
  return kl_coef->data_ptr<float>();
}

KL_PENALTY_FWD_OUTPUTS kl_penalty_fwd_cuda(KL_PENALTY_FWD_ARGS) {
  check_common(logits, labels, ref_logits, temperature);
  KL_CHECK_ARG(ref_logits.has_value() != ref_logprobs.has_value(), "ref_logits", "or ref_logprobs: exactly one is needed");
  const int64_t B = logits.size(0), T = logits.size(1), N = B * T;
  check_rowwise(ref_logprobs, N, "ref_logprobs", at::kFloat);
  const bool full = estimator == kFull;
  int64_t S = B;
  if (!padded) S = cu_seqlens.has_value() ? std::max<int64_t>(cu_seqlens->numel() - 1, 0) : 1;
  if (cu_seqlens.has_value()) {
    KL_CHECK_ARG(cu_seqlens->is_cuda() && cu_seqlens->dim() == 1 && cu_seqlens->is_contiguous() &&
                     (cu_seqlens->scalar_type() == at::kInt || cu_seqlens->scalar_type() == at::kLong),
                 "cu_seqlens", "must be a contiguous 1-D int32 or int64 CUDA tensor");
    KL_CHECK_ARG(S < (int64_t(1) << 31), "cu_seqlens", "may hold at most 2^31 - 1 sequences");
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto options = logits.options().dtype(at::kFloat);
  Tensor kl = at::empty({N}, options), penalty = at::empty({N}, options), kl_sum = at::empty({S}, options),
         kl_mean = at::empty({S}, options), counts = at::empty({S}, options),
         sequence = at::empty({N}, options.dtype(at::kInt));
  const cuda::AnyMask valid = any_mask(mask, N);
  cuda::PenaltyFwd epilogue{.on = true,
                            .ref_logprobs = ptr<float>(ref_logprobs),
                            .mask = valid,
                            .spec = spec_of(estimator, straight_through, log_ratio_clamp, kl_clamp),
                            .kl_coef_ptr = coef_ptr(kl_coef),
                            .kl_coef = static_cast<float>(scalar_kl_coef),
                            .kl = kl.data_ptr<float>(), .penalty = penalty.data_ptr<float>()};
  auto [logp, ref_logp, entropy, full_kl, lse, ref_lse] =
      forward(logits, labels, ref_logits, temperature, scalar_temperature, ignore_index, 0, logits.size(2),
              need_entropy, full, epilogue);
  if (!padded && S == 0) sequence.fill_(-1);  // cu_seqlens of one entry: every row outside
  cuda::SumParams sums{.kl = kl.data_ptr<float>(),
                       .labels = labels.data_ptr<int64_t>(),
                       .mask = valid,
                       .cu_seqlens = cu_seqlens.has_value() ? cu_seqlens->data_ptr() : nullptr,
                       .cu_element_size = cu_seqlens.has_value() ? static_cast<int>(cu_seqlens->element_size()) : 8,
                       .n_cu = cu_seqlens.has_value() ? cu_seqlens->numel() : 0,
                       .N = N, .T = T, .S = S, .ignore_index = ignore_index,
                       .padded = padded,
                       .kl_sum = kl_sum.data_ptr<float>(), .kl_mean = kl_mean.data_ptr<float>(),
                       .counts = counts.data_ptr<float>(),
                       .sequence = sequence.data_ptr<int32_t>()};
  cuda::launch_sequence_sums(sums, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, ref_logp, kl, penalty, kl_sum, kl_mean, counts, sequence, entropy, full_kl, lse, ref_lse};
}

void kl_penalty_bwd_into(KL_PENALTY_BWD_ARGS, const Tensor& logits, KL_PENALTY_BWD_REST, const Tensor& grad) {
  check_rows(logits, "logits");
  const int64_t N = logits.size(0) * logits.size(1), S = counts.numel();
  for (const auto& [t, name] : {std::pair{&grad_kl, "grad_kl"}, {&grad_penalty, "grad_penalty"}}) {
    check_upstream(*t, N, name);
  }
  for (const auto& [t, name] : {std::pair{&grad_kl_sum, "grad_kl_sum"}, {&grad_kl_mean, "grad_kl_mean"}}) {
    check_upstream(*t, S, name);
  }
  check_rowwise(logp, N, "logp", at::kFloat);
  check_rowwise(ref_logp, N, "ref_logp", at::kFloat);
  check_rowwise(counts, S, "counts", at::kFloat);
  check_rowwise(sequence, N, "sequence", at::kInt);
  const bool on = grad_kl || grad_penalty || grad_kl_sum || grad_kl_mean;
  cuda::PenaltyBwd chain{.on = on,
                         .grad_kl = upstream(grad_kl), .grad_penalty = upstream(grad_penalty),
                         .grad_kl_sum = upstream(grad_kl_sum), .grad_kl_mean = upstream(grad_kl_mean),
                         .counts = counts.data_ptr<float>(), .logp = logp.data_ptr<float>(),
                         .ref_logp = ref_logp.data_ptr<float>(),
                         .sequence = sequence.data_ptr<int32_t>(),
                         .mask = any_mask(mask, N),
                         .spec = spec_of(estimator, straight_through, log_ratio_clamp, kl_clamp),
                         .kl_coef_ptr = coef_ptr(kl_coef),
                         .kl_coef = static_cast<float>(scalar_kl_coef)};
  fused_kl_bwd_into(grad_logp, grad_entropy, std::nullopt, logits, labels, ref_logits, temperature,
                    scalar_temperature, ignore_index, 0, logits.size(2), lse, ref_lse, entropy_out, full_out, grad, chain);
}

Tensor kl_penalty_bwd_cuda(KL_PENALTY_BWD_ARGS, const Tensor& logits, KL_PENALTY_BWD_REST) {
  check_rows(logits, "logits");
  Tensor grad = at::empty(logits.sizes(), logits.options());
  KL_PENALTY_BWD_CALL(logits, grad);
  return grad;
}

void kl_penalty_bwd_inplace_cuda(KL_PENALTY_BWD_ARGS, Tensor& logits, KL_PENALTY_BWD_REST) {
  KL_PENALTY_BWD_CALL(logits, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_kernels, CUDA, m) {
  m.impl("kl_penalty_fwd", &kl_penalty_fwd_cuda);
  m.impl("kl_penalty_bwd", &kl_penalty_bwd_cuda);
  m.impl("kl_penalty_bwd_", &kl_penalty_bwd_inplace_cuda);
  m.impl("fused_kl_fwd", &fused_kl_fwd_cuda);
  m.impl("fused_kl_bwd", &fused_kl_bwd_cuda);
  m.impl("fused_kl_bwd_", &fused_kl_bwd_inplace_cuda);
}

}  // namespace kl_kernels
