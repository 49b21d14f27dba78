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

template <typename T>
cuda::Rows<T> rows(const Tensor& t) {
  return {reinterpret_cast<T*>(t.data_ptr()), t.size(1), t.stride(0), t.stride(1)};
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

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_kl_fwd_cuda(
    const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& ref_logits,
    const std::optional<Tensor>& temperature, double scalar_temperature, int64_t ignore_index, int64_t vocab_start,
    int64_t vocab_size, bool need_entropy, bool need_full) {
  check_common(logits, labels, ref_logits, temperature);
  const VocabShard shard = checked_shard(vocab_start, vocab_size, logits.size(2));
  KL_CHECK_ARG(!need_full || ref_logits.has_value(), "need_full", "needs ref_logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0) * logits.size(1), V = logits.size(2);
  const bool has_ref = ref_logits.has_value();
  const auto stats = [&](bool needed) { return at::empty({needed ? N : 0}, logits.options().dtype(at::kFloat)); };
  Tensor logp = stats(true), ref_logp = stats(has_ref), entropy = stats(need_entropy), full = stats(need_full),
         lse = stats(true), ref_lse = stats(has_ref);
  cuda::FwdParams p{labels.data_ptr<int64_t>(), ptr<float>(temperature), static_cast<float>(1.0 / scalar_temperature),
                    N, V, ignore_index, shard, need_entropy, need_full, logp.data_ptr<float>(),
                    has_ref ? ref_logp.data_ptr<float>() : nullptr, need_entropy ? entropy.data_ptr<float>() : nullptr,
                    need_full ? full.data_ptr<float>() : nullptr, lse.data_ptr<float>(),
                    has_ref ? ref_lse.data_ptr<float>() : nullptr};
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
                       const std::optional<Tensor>& full_kl, const Tensor& grad) {
  check_common(logits, labels, ref_logits, temperature);
  const VocabShard shard = checked_shard(vocab_start, vocab_size, logits.size(2));
  check_rows(grad, "grad");
  const int64_t N = logits.size(0) * logits.size(1), V = logits.size(2);
  for (const auto& [t, name] : {std::pair{&grad_logp, "grad_logp"}, {&grad_entropy, "grad_entropy"},
                                {&grad_full, "grad_full"}}) {
    check_rowwise(*t, N, name, at::kFloat);
  }
  check_rowwise(lse, N, "lse", at::kFloat);
  KL_CHECK_ARG(!grad_entropy.has_value() || entropy.has_value(), "entropy", "is needed for grad_entropy");
  if (grad_entropy.has_value()) check_rowwise(entropy, N, "entropy", at::kFloat);
  if (grad_full.has_value()) {
    KL_CHECK_ARG(ref_logits.has_value() && ref_lse.has_value() && full_kl.has_value(), "grad_full",
                 "needs ref_logits, ref_lse and full_kl");
    check_rowwise(ref_lse, N, "ref_lse", at::kFloat);
    check_rowwise(full_kl, N, "full_kl", at::kFloat);
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda::BwdParams p{labels.data_ptr<int64_t>(), ptr<float>(temperature), static_cast<float>(1.0 / scalar_temperature),
                    N, V, ignore_index, shard, ptr<float>(grad_logp), ptr<float>(grad_entropy), ptr<float>(grad_full),
                    lse.data_ptr<float>(), grad_full.has_value() ? ptr<float>(ref_lse) : nullptr,
                    grad_entropy.has_value() ? ptr<float>(entropy) : nullptr,
                    grad_full.has_value() ? ptr<float>(full_kl) : nullptr};
  const Tensor& reference = grad_full.has_value() ? *ref_logits : logits;
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

}  // namespace

TORCH_LIBRARY_IMPL(kl_kernels, CUDA, m) {
  m.impl("fused_kl_fwd", &fused_kl_fwd_cuda);
  m.impl("fused_kl_bwd", &fused_kl_bwd_cuda);
  m.impl("fused_kl_bwd_", &fused_kl_bwd_inplace_cuda);
}

}  // namespace kl_kernels
