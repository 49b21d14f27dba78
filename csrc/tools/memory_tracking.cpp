// A counting wrapper around the CPU allocator, for kl-bench's peak-memory column on the CPU: the
// CPU allocator has no peak counter (CUDA's has), and the process's resident high-water mark
// depends on what malloc kept from earlier steps (the same row measured 0 MB, then 62.5 MB).
// While tracking, every ATen CPU allocation is counted at its requested size until its storage is
// freed; the peak of those live bytes is exact and the same from run to run. Allocations made
// outside ATen's allocator (oneDNN scratch space, Python objects) are not seen.
#include <Python.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <exception>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>


namespace kl_kernels {
namespace {

std::atomic<int64_t> live_bytes{0};
std::atomic<int64_t> peak_bytes{0};

struct Block {  // the wrapped allocator's DataPtr and the size it was asked for
  c10::DataPtr inner;
  int64_t size;
};

// Blocks by data pointer: the DataPtr handed out has its data pointer as context, as raw_allocate
// (used by oneDNN's bf16 matmuls) requires, so the wrapped allocation is found here on release.
std::mutex blocks_mutex;
std::unordered_map<void*, Block>& blocks() {
  static auto* table = new std::unordered_map<void*, Block>();
  return *table;
}

void release(void* pointer) {
  std::unordered_map<void*, Block>::node_type node;
  {
    std::lock_guard<std::mutex> lock(blocks_mutex);
    node = blocks().extract(pointer);
  }
  if (!node.empty()) live_bytes -= node.mapped().size;
  // node's destructor frees the memory through the wrapped allocator's own deleter, outside the lock
}

class CountingAllocator final : public c10::Allocator {
 public:
  c10::Allocator* inner = nullptr;

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr data = inner->allocate(n);
    void* pointer = data.get();
    if (pointer == nullptr) return data;  // nothing allocated (n = 0): nothing to count
    const int64_t now = live_bytes += static_cast<int64_t>(n);
    int64_t peak = peak_bytes.load();
    while (now > peak && !peak_bytes.compare_exchange_weak(peak, now)) {
    }
    {
      std::lock_guard<std::mutex> lock(blocks_mutex);
      blocks().emplace(pointer, Block{std::move(data), static_cast<int64_t>(n)});
    }
    return {pointer, pointer, &release, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Never destroyed: a storage allocated while tracking may be freed after tracking stopped.
CountingAllocator& counting() {
  static auto* allocator = new CountingAllocator();
  return *allocator;
}

}  // namespace

void track_cpu_memory(bool enable) {
  CountingAllocator& allocator = counting();
  c10::Allocator* current = c10::GetCPUAllocator();
  if (enable && current != &allocator) {
    allocator.inner = current;
    c10::SetCPUAllocator(&allocator, /*priority=*/0);
    TORCH_CHECK(c10::GetCPUAllocator() == &allocator,
                "kl_kernels: another CPU allocator was installed with a higher priority; cannot track memory");
  } else if (!enable && current == &allocator) {
    c10::SetCPUAllocator(allocator.inner, /*priority=*/0);
  }
}

std::pair<int64_t, int64_t> cpu_memory_stats() { return {live_bytes.load(), peak_bytes.load()}; }

void reset_cpu_memory_peak() { peak_bytes = live_bytes.load(); }

}  // namespace kl_kernels

// kl_kernels.tools._memory's functions (this file is the whole extension, kl-bench's alone):
//   track_cpu_memory(bool), reset_cpu_memory_peak(), cpu_memory_stats() -> (live bytes, peak bytes)
namespace {

PyObject* py_track_cpu_memory(PyObject*, PyObject* enable) {
  const int on = PyObject_IsTrue(enable);
  if (on < 0) return nullptr;
  try {
    kl_kernels::track_cpu_memory(on != 0);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_reset_cpu_memory_peak(PyObject*, PyObject*) {
  kl_kernels::reset_cpu_memory_peak();
  Py_RETURN_NONE;
}

PyObject* py_cpu_memory_stats(PyObject*, PyObject*) {
  const auto [live, peak] = kl_kernels::cpu_memory_stats();
  return Py_BuildValue("(LL)", static_cast<long long>(live), static_cast<long long>(peak));
}

PyMethodDef methods[] = {
    {"track_cpu_memory", py_track_cpu_memory, METH_O, "count CPU allocations (True) or stop (False)"},
    {"reset_cpu_memory_peak", py_reset_cpu_memory_peak, METH_NOARGS, "peak = live bytes"},
    {"cpu_memory_stats", py_cpu_memory_stats, METH_NOARGS, "(live bytes, peak bytes) counted while tracking"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__memory(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_memory", nullptr, -1, methods};
  return PyModule_Create(&module);
}
