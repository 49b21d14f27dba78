// The CPU allocation counter of csrc/memory_tracking.cpp, exposed by kl_kernels._C (registration.cpp).
#pragma once

#include <cstdint>
#include <utility>

namespace kl_kernels {

void track_cpu_memory(bool enable);               // wrap (or unwrap) the CPU allocator
std::pair<int64_t, int64_t> cpu_memory_stats();   // (live bytes allocated while tracking, their peak)
void reset_cpu_memory_peak();                     // peak = live

}  // namespace kl_kernels
