"""The `cpu` and `cuda` backends: the C++ kernels of csrc/cpu and csrc/cuda, registered per device
key under the same schemas (csrc/registration.cpp) and reached through torch.ops.kl_kernels."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)
from .ops import op_backend, register_fakes

register_fakes()

_OPS = ("fused_kl_fwd", "fused_kl_bwd", "fused_kl_bwd_")


def unavailable_reason(dispatch_key: str) -> str | None:
    for op in _OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kl_kernels::{op}", dispatch_key):
            why = " (built without CUDA: needs a CUDA build of torch and CUDA_HOME at install)" \
                if dispatch_key == "CUDA" else ""
            return f"the C++ extension has no {dispatch_key} kernel for kl_kernels::{op}{why}"
    return None


fused_kl_fwd, fused_kl_bwd = op_backend(torch.ops.kl_kernels.fused_kl_fwd, torch.ops.kl_kernels.fused_kl_bwd,
                                       torch.ops.kl_kernels.fused_kl_bwd_)
