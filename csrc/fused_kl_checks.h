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
