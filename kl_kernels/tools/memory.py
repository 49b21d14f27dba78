"""kl-bench's peak memory: the CUDA allocator's peak, or on the CPU the tools' own allocation counter
(kl_kernels.tools._memory, csrc/tools/memory_tracking.cpp)."""
from __future__ import annotations

import ctypes
import sys

import torch

from .providers import CaseCache
from .timing import make_inputs, make_step

def _cpu_counter():
    """The CPU allocation counter (csrc/tools/memory_tracking.cpp), or None when it was not built."""
    try:
        from . import _memory
    except ImportError:
        return None
    return _memory


class PeakMemory:
    """Peak extra memory of a region: the CUDA allocator's peak; on the CPU the peak of the bytes
    allocated through ATen's CPU allocator while the region runs (tools._memory counts them: exact
    and the same run to run), else, without the extension, the process's resident high-water mark
    (reset through /proc/self/clear_refs, Linux only; it depends on what malloc kept)."""

    def __init__(self, device):
        self.device = device
        self.counter = _cpu_counter() if device.type == "cpu" else None
        self.method = "cuda allocator" if device.type == "cuda" else "cpu allocator" if self.counter else "rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.counter is not None:
            # the CPU backward's cached gradient block (csrc/cpu/gradient_cache.h) is given back first, so
            # that a step's gradient counts as the step's, as the CUDA allocator's peak counts it
            torch.ops.kl_kernels.empty_cpu_cache()
            self.counter.track_cpu_memory(True)
            self.counter.reset_cpu_memory_peak()
            self.base = self.counter.cpu_memory_stats()[0]
        else:
            self.base = self._field("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        elif self.counter is not None:
            self.extra = self.counter.cpu_memory_stats()[1] - self.base
            self.counter.track_cpu_memory(False)
        else:
            self.extra = self._field("VmHWM") - self.base

    @staticmethod
    def _field(name):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
        return 0


_INPUTS = CaseCache()


def case_inputs_once(case, make):
    """make() for the rows of one case, made once and reused by each (the memory pass goes through the
    rows case by case; making [N, V] inputs takes ~1 s a row at N = 2048, V = 32000)."""
    return _INPUTS.get(case, "inputs", make)


def peak_extra_bytes(fn, tokens, vocab, dtype, mode, device):
    """Peak memory the timed part of one step adds over its inputs (after a warm-up step)."""
    inputs = case_inputs_once((tokens, vocab, dtype, device), lambda: make_inputs(tokens, vocab, dtype, device))
    return step_peak_bytes(make_step(fn, inputs, mode), device)


def step_peak_bytes(step, device):
    step.prepare()
    step.run()
    for leaf in step.leaves:
        leaf.grad = None
    step.state.clear()
    step.prepare()
    with PeakMemory(device) as peak:
        step.run()
    return peak.extra


def fix_malloc_for_peaks():
    """glibc keeps freed large blocks resident once its dynamic mmap threshold has grown, which
    hides later peaks from the resident high-water mark; a fixed threshold maps and unmaps every
    large block. Set only for the memory pass: it slows a blocked loop's many allocations."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass
