"""Input checks shared by the public functions (docs/contract.md section 5).

Shape, dtype and device checks always run; checks that read tensor values (and so sync with the
device) run only when the caller passes validate=True. Every message names the argument, what was
expected and what came.
"""
from __future__ import annotations

import math
import numbers

import torch

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(value, arg: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(value, arg: str) -> torch.Tensor:
    tensor(value, arg)
    if value.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{arg} must be float16, bfloat16, float32 or float64, got dtype {value.dtype}")
    return value


# the integer dtypes ATen computes with (uint16/32/64 lack comparisons and conversions on CPU)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def integer(value, arg: str) -> torch.Tensor:
    tensor(value, arg)
    if value.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{arg} must be an integer tensor (int64, int32, int16, int8 or uint8), got dtype {value.dtype}")
    return value


def has_values(value: torch.Tensor) -> bool:
    """Whether value checks can read this tensor: meta tensors (shape-only tracing) have no values."""
    return value.device.type != "meta"


def real_mask(value, arg: str) -> torch.Tensor:
    tensor(value, arg)
    if value.is_complex():
        raise TypeError(f"{arg} must be bool, integer or floating, got dtype {value.dtype}")
    return value


def shape(value: torch.Tensor, expected, arg: str, what: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{arg} must have shape {tuple(expected)} ({what}), got {tuple(value.shape)}")


def same_device(device: torch.device, **tensors) -> None:
    for arg, value in tensors.items():
        if value is not None and value.device != device:
            raise ValueError(f"{arg} must be on the device of logits ({device}), got {value.device}")


def nonnegative_coef(value, arg: str = "kl_coef", validate: bool = True) -> None:
    """A number (or 0-dim tensor) >= 0 and finite."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{arg} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if validate and not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"{arg} must be a finite number >= 0, got {float(value)!r}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{arg} must be a finite number >= 0, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{arg} must be a finite number >= 0, got {value!r}")


def ignore_index(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"ignore_index must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:  # the kernels compare it with int64 labels
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return int(value)


def temperature_float(value) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def temperature_values(value: torch.Tensor) -> None:
    if not bool(((value > 0) & torch.isfinite(value)).all()):
        bad = value[~((value > 0) & torch.isfinite(value))].flatten()[0].item()
        raise ValueError(f"temperature must be > 0 and finite everywhere, found {bad!r}")


def label_values(labels: torch.Tensor, vocab: int, ignore: int) -> None:
    ok = ((labels >= 0) & (labels < vocab)) | (labels == ignore)
    if not bool(ok.all()):
        bad = labels[~ok].flatten()[0].item()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore}, found {bad}")


def cu_seqlens_values(cu_seqlens: torch.Tensor, total: int) -> None:
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if cu_seqlens.numel() > 1 and not bool((cu_seqlens[1:] >= cu_seqlens[:-1]).all()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()[:16]}")
    if last != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens N={total}, got {last}")


def inplace_target(logits: torch.Tensor) -> None:
    """inplace_backward writes the gradient over the logits: rows sharing memory (an expand, a
    stride-0 dim) would be written through each other. Sufficient test, dims by increasing stride
    (size-1 dims carry any stride): each stride steps past everything the smaller dims span."""
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(logits.stride(), logits.shape) if sz > 1):
        if stride <= span:
            raise ValueError("inplace_backward=True needs logits whose elements do not share memory (got strides "
                             f"{tuple(logits.stride())} for shape {tuple(logits.shape)}, e.g. an expand); "
                             "pass inplace_backward=False for a fresh gradient")
        span += stride * (size - 1)


def temperature(temperature, labels_shape, device, dtype, validate, per_sequence=None):
    """A float, or a contiguous [N] tensor of per-token temperatures in the compute dtype.

    per_sequence: (number of sequences B, callable giving each token's sequence index) for the
    packed layout, where a 1-D tensor of length B != N holds one temperature per sequence.
    """
    if isinstance(temperature, torch.Tensor):
        if not (temperature.is_floating_point() or temperature.dtype in INTEGER_DTYPES):
            raise ValueError(f"temperature must be a float or a real (floating or integer) tensor, "
                             f"got dtype {temperature.dtype}")
        same_device(device, temperature=temperature)
        n_tokens = 1
        for size in labels_shape:
            n_tokens *= size
        if validate:
            temperature_values(temperature)
        if per_sequence is not None and temperature.dim() == 1 and temperature.numel() == per_sequence[0] != n_tokens:
            return temperature.to(dtype)[per_sequence[1]()].contiguous()
        try:
            broadcast = torch.broadcast_shapes(temperature.shape, labels_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != tuple(labels_shape):
            raise ValueError(f"temperature must be a float or a tensor broadcastable to the labels' shape "
                             f"{tuple(labels_shape)}, got shape {tuple(temperature.shape)}")
        return temperature.to(dtype).expand(labels_shape).reshape(-1).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    return temperature_float(temperature)
