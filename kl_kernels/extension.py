"""The `cpu` and `cuda` backends: the C++ kernels of csrc/cpu and csrc/cuda, registered per device
key under the same schemas (csrc/registration.cpp) and reached through torch.ops.kl_kernels."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)
from .ops import register_fakes

register_fakes()

_OPS = ("fused_kl_fwd", "fused_kl_bwd", "fused_kl_bwd_")


def unavailable_reason(dispatch_key: str) -> str | None:
    for op in _OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kl_kernels::{op}", dispatch_key):
            why = " (built without CUDA: needs a CUDA build of torch and CUDA_HOME at install)" \
                if dispatch_key == "CUDA" else ""
            return f"the C++ extension has no {dispatch_key} kernel for kl_kernels::{op}{why}"
    return None


def _split(temperature):
    if isinstance(temperature, torch.Tensor):
        return temperature, 1.0
    return None, float(temperature)


def fused_kl_fwd(logits, labels, ref_logits, temperature, ignore_index, need_entropy, need_full):
    tensor_temperature, scalar_temperature = _split(temperature)
    logp, ref_logp, entropy, full_kl, lse, ref_lse = torch.ops.kl_kernels.fused_kl_fwd(
        logits, labels, ref_logits, tensor_temperature, scalar_temperature, ignore_index, need_entropy, need_full)
    return (logp, ref_logp if ref_logits is not None else None, entropy if need_entropy else None,
            full_kl if need_full else None, lse, ref_lse if ref_logits is not None else None)


def fused_kl_bwd(grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                 ignore_index, lse, ref_lse, entropy, full_kl, inplace):
    tensor_temperature, scalar_temperature = _split(temperature)
    grad_logp, grad_entropy, grad_full = (None if g is None else g.contiguous() for g in (grad_logp, grad_entropy, grad_full))
    args = (grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, tensor_temperature,
            scalar_temperature, ignore_index, lse, ref_lse, entropy, full_kl)
    if inplace:
        torch.ops.kl_kernels.fused_kl_bwd_(*args)
        return logits
    return torch.ops.kl_kernels.fused_kl_bwd(*args)
