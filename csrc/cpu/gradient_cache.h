// The CPU backward's gradient buffer: as large as the logits, taken from a one-block cache of the
// last one freed, the CPU's analogue of the CUDA caching allocator.
//
// Why: a fresh gradient of that size is a fresh mapping whose first-touch page faults cost more than
// the kernel (500 MB: 150 ms of 4 KiB faults vs the kernel's 27 ms on 2 cores); transparent huge
// pages make it one fault per 2 MiB, but when the process also does GB-sized work (a training step
// does), the kernel's direct compaction for those pages stalls it (fwd+bwd 404 ms at p50 vs 131 at
// p20 in one kl-bench row). A block whose pages are already in place costs none of that.
//
// The block comes from ATen's CPU allocator (so kl-bench's counter sees it), is handed out only after
// the tensor that held it died, serves any gradient up to its size, and is replaced by a larger one
// when needed: while idle the process holds one gradient's bytes more, which
// torch.ops.kl_kernels.empty_cpu_cache() gives back.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kl_kernels {

// Asking for transparent huge pages (honoured when THP is in `madvise` or `always` mode): one fault
// per 2 MiB for a new block. A hint only: on failure or elsewhere nothing changes.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

class GradientCache {
 public:
  // An uninitialised contiguous tensor shaped and typed as `like`, on the cached block when it is large
  // enough (the kernels write every element of it), else on a new one.
  at::Tensor empty_like(const at::Tensor& like) {
    const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
    std::shared_ptr<Block> block = take(bytes);
    if (!block) {
      release();  // a smaller cached block would only add to the peak
      block = std::make_shared<Block>(Block{c10::GetCPUAllocator()->allocate(std::max<size_t>(bytes, 1)), bytes});
      advise_huge_pages(block->memory.get(), bytes);
    }
    void* data = block->memory.get();
    return at::from_blob(data, like.sizes(), [this, block](void*) { give_back(block); }, like.options());
  }

  // Frees the cached block (none is in use by a live tensor then).
  void release() {
    std::shared_ptr<Block> old;
    std::lock_guard<std::mutex> lock(mutex_);
    old.swap(cached_);
  }

 private:
  struct Block {
    c10::DataPtr memory;
    size_t bytes;
  };

  std::shared_ptr<Block> take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::shared_ptr<Block> block;
    if (cached_ && cached_->bytes >= bytes) block.swap(cached_);
    return block;
  }

  void give_back(const std::shared_ptr<Block>& block) {
    std::shared_ptr<Block> dropped = block;  // freed outside the lock when not kept
    std::lock_guard<std::mutex> lock(mutex_);
    if (!cached_ || block->bytes > cached_->bytes) cached_.swap(dropped);  // keep the larger block
  }

  std::mutex mutex_;
  std::shared_ptr<Block> cached_;
};

inline GradientCache& gradient_cache() {
  static GradientCache* cache = new GradientCache();  // never destroyed: tensors may outlive static teardown
  return *cache;
}

}  // namespace kl_kernels
