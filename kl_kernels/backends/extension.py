"""The `cpu` and `cuda` backends: the C++ kernels of csrc/cpu and csrc/cuda, registered per device
key under the same schemas (csrc/registration.cpp) and reached through torch.ops.kl_kernels.

kl_kernels._C holds the schemas and the CUDA kernels; the CPU kernels come as one library per
instruction set (kl_kernels._cpu_avx512, _cpu_avx2, or _cpu_base off x86), of which the one the
running CPU supports is loaded: ATen's own capability check, so ATEN_CPU_CAPABILITY=avx2 forces the
AVX2 build on an AVX-512 machine.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

# loading the extension registers the schemas, and the CUDA kernels; a missing one raises
# ModuleNotFoundError naming kl_kernels._C (dispatch.py says so as the backends' reason)
importlib.import_module("kl_kernels._C")
from .adapter import op_backend, penalty_op_backend, register_fakes

register_fakes()

# the CPU builds each capability may run, best first
_CPU_BUILDS = {"AVX512": ("avx512", "avx2", "base"), "AVX2": ("avx2", "base")}


def _load_cpu_kernels():
    """(the instruction set of the CPU build loaded, or None, and why none was)."""
    capability = torch.backends.cpu.get_cpu_capability()
    failures = []
    for isa in _CPU_BUILDS.get(capability, ("base",)):
        spec = importlib.util.find_spec(f"kl_kernels._cpu_{isa}")
        if spec is None or spec.origin is None:
            continue
        try:
            torch.ops.load_library(spec.origin)
            return isa, None
        except OSError as error:
            failures.append(f"{spec.origin}: {error}")
    return None, (f"no CPU kernel build loads on this CPU (ATen capability {capability})"
                  + (f": {'; '.join(failures)}" if failures else ""))


CPU_ISA, _CPU_UNAVAILABLE = _load_cpu_kernels()

_OPS = ("fused_kl_fwd", "fused_kl_bwd", "fused_kl_bwd_")


def unavailable_reason(dispatch_key: str) -> str | None:
    if dispatch_key == "CPU" and _CPU_UNAVAILABLE:
        return _CPU_UNAVAILABLE
    for op in _OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kl_kernels::{op}", dispatch_key):
            why = " (built without CUDA: needs a CUDA build of torch and CUDA_HOME at install)" \
                if dispatch_key == "CUDA" else ""
            return f"the C++ extension has no {dispatch_key} kernel for kl_kernels::{op}{why}"
    return None


fused_kl_fwd, fused_kl_bwd = op_backend(torch.ops.kl_kernels.fused_kl_fwd, torch.ops.kl_kernels.fused_kl_bwd,
                                       torch.ops.kl_kernels.fused_kl_bwd_)
kl_penalty_fwd, kl_penalty_bwd = penalty_op_backend(torch.ops.kl_kernels.kl_penalty_fwd,
                                                    torch.ops.kl_kernels.kl_penalty_bwd,
                                                    torch.ops.kl_kernels.kl_penalty_bwd_)
_ONE_PASS_OPS = ("kl_penalty_fwd", "kl_penalty_bwd", "kl_penalty_bwd_")


# device type -> whether kl_penalty's one-pass ops have kernels for it (CPU always; CUDA when built)
_ONE_PASS = {device: all(torch._C._dispatch_has_kernel_for_dispatch_key(f"kl_kernels::{op}", key) for op in _ONE_PASS_OPS)
             for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def serves_one_pass(device: torch.device) -> bool:
    return _ONE_PASS.get(device.type, False)
