// Test-only ops, in a library of their own (kl_kernels.tools._testing_<isa>, one per CPU build like
// the kernels'), so that the shipped kl_kernels._C registers the library's ops only. Loaded by
// tests/test_fused_kl_ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/softmax_exp2.h"

namespace kl_kernels {
namespace {

// The kernels' 2^y over a tensor, so that tests can hold it to float64.
at::Tensor softmax_exp2_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "softmax_exp2: x must be a float32 or float64 CPU tensor");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "softmax_exp2_cpu", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t n = in.numel(), whole = n / Vec::size() * Vec::size();
    for (int64_t i = 0; i < whole; i += Vec::size()) softmax_exp2(Vec::loadu(src + i)).store(dst + i);
    if (whole < n) softmax_exp2(Vec::loadu(src + whole, n - whole)).store(dst + whole, n - whole);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kl_kernels_testing, m) {
  // the CPU kernels' 2^y (the softmax terms, y = log2 of each term), elementwise
  m.def("softmax_exp2(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(kl_kernels_testing, CPU, m) { m.impl("softmax_exp2", &softmax_exp2_cpu); }

}  // namespace kl_kernels
