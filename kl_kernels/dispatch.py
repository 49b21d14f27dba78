"""Backend records and the choice between them (docs/contract.md section 4).

Each backend declares what it serves and, when it cannot serve some inputs, says why. The choice
uses static facts only (device, dtype), never tensor values, so it costs no host sync.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .contract import FusedPass

ENV_VAR = "KL_KERNELS_BACKEND"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str | None


def _load_reference():
    return importlib.import_module("kl_kernels.backends.reference"), None


def _load_extension(dispatch_key):
    try:
        module = importlib.import_module("kl_kernels.backends.extension")
    except ImportError as error:  # the C++ extension was not built or does not load
        if isinstance(error, ModuleNotFoundError) and error.name != "kl_kernels._C":
            raise  # a module of ours or torch's is missing: a bug to see, not an unbuilt extension
        if isinstance(error, ModuleNotFoundError):
            return None, ("the C++ extension (kl_kernels/_C*.so) is not installed: this copy was installed with "
                          "KL_KERNELS_NO_EXTENSION=1 or its build was skipped; `pip install --no-build-isolation .` "
                          "with a C++ compiler builds it. Every feature runs on the pure-PyTorch `reference` "
                          "backend meanwhile")
        reason = f"the C++ extension kl_kernels._C is not available ({error})"
        # built but not loadable (typically another torch than the one it was compiled against):
        # say so loudly, since automatic dispatch would otherwise run the 7-20x slower reference
        try:
            from ._build_info import TORCH as built_for
        except ImportError:
            built_for = None
        reason += (f"; it was built for torch {built_for}, this is torch {torch.__version__}: reinstall "
                   "kl_kernels against this torch (pip install --no-build-isolation)" if built_for else "")
        if dispatch_key == "CPU":  # once, not once per dispatch key
            warnings.warn(f"kl_kernels: {reason}; falling back to the pure-PyTorch reference backend",
                          RuntimeWarning, stacklevel=2)
        return None, reason
    reason = module.unavailable_reason(dispatch_key)
    return (None if reason else module), reason


def _load_cpu():
    return _load_extension("CPU")


def _load_cuda():
    return _load_extension("CUDA")


def _load_triton():
    try:
        module = importlib.import_module("kl_kernels.backends.triton.fused_kl")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and not (error.name or "").startswith("triton"):
            raise  # a module of ours is missing: a bug to see, not a missing Triton
        return None, f"Triton is not installed or does not load ({error})"
    return module, None


_LOADED: dict = {}  # backend name -> (implementation module or None, reason it is unavailable)


@dataclass(frozen=True)
class Backend:
    """One backend: the single source of its name, where it runs and what it serves. Tests, kl-bench,
    the pytest-benchmark suite and bench/gpu_check.sh derive their backend lists from these records."""
    name: str
    devices: tuple[str, ...]  # torch device types it serves; empty = any
    dtypes: tuple[torch.dtype, ...]
    loader: Callable
    home: str  # the device type it is built for ("any" for the pure-PyTorch reference)
    device_note: str = ""  # said when it cannot serve a device

    @property
    def is_kernel(self) -> bool:
        """A compiled kernel (C++ or Triton), not the pure-PyTorch reference."""
        return self.home != "any"

    @property
    def _loaded(self):
        # a plain dict, not functools.cached_property, whose lock torch.compile cannot trace
        if self.name not in _LOADED:
            _LOADED[self.name] = self.loader()
        return _LOADED[self.name]

    @property
    def impl(self) -> FusedPass:
        return self._loaded[0]

    @property
    def unavailable_reason(self) -> str | None:
        return self._loaded[1]

    def one_pass(self, device: torch.device) -> bool:
        """Whether it runs all of kl_penalty in its own ops on this device (contract.OnePass)."""
        serves = getattr(self.impl, "serves_one_pass", None)
        return serves is not None and serves(device)

    def not_supported_reasons(self, device: torch.device, dtypes) -> list[str]:
        reasons = []
        if self.unavailable_reason is not None:
            reasons.append(self.unavailable_reason)
        if self.devices and device.type not in self.devices:
            reasons.append(f"it runs on {'/'.join(self.devices)} tensors{self.device_note}, got {device.type} tensors")
        for dtype in dtypes:
            if dtype not in self.dtypes:
                reasons.append(f"it does not support dtype {dtype}")
        return reasons


BACKENDS = {
    backend.name: backend
    for backend in (
        Backend("reference", (), _FLOATS, _load_reference, home="any"),
        Backend("cpu", ("cpu",), _FLOATS, _load_cpu, home="cpu"),
        # TRITON_INTERPRET=1 (read when triton is first imported, with this module) runs the Triton
        # kernels on CPU tensors, slowly: how CI tests them
        Backend("triton", ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET", "0") == "1" else ("cuda",),
                (torch.float16, torch.bfloat16, torch.float32), _load_triton, home="cuda",
                device_note=" (cpu tensors only under TRITON_INTERPRET=1)"),
        Backend("cuda", ("cuda",), (torch.float16, torch.bfloat16, torch.float32), _load_cuda, home="cuda"),
    )
}


def native_backends(device_type: str, kernels_only: bool = True) -> list[str]:
    """Names of the available backends built for this device type (kl-bench's and the benchmark
    suite's providers, the GPU check's list); with kernels_only=False the reference too."""
    return [b.name for b in BACKENDS.values() if b.unavailable_reason is None
            and (b.home == device_type or (not kernels_only and not b.is_kernel))]


def available_backends() -> list[BackendInfo]:
    """One BackendInfo per backend; reason says why one is unavailable (None when available): it does
    not load, or it serves no device this machine has (triton and cuda without a GPU: a backend named
    there would raise for every tensor)."""
    infos = []
    for b in BACKENDS.values():
        reason = b.unavailable_reason
        if reason is None and b.devices and not any(_present(device) for device in b.devices):
            reason = f"no {'/'.join(b.devices)} device here: it runs on {'/'.join(b.devices)} tensors{b.device_note}"
        infos.append(BackendInfo(b.name, reason is None, reason))
    return infos


def _present(device_type: str) -> bool:
    return device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available())


def select_backend(backend: str | None, device: torch.device, dtypes) -> Backend:
    """The named backend (argument, else KL_KERNELS_BACKEND) or the automatic choice."""
    source = "backend"
    if backend is None and os.environ.get(ENV_VAR):
        backend, source = os.environ[ENV_VAR], ENV_VAR
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{source} must be one of {', '.join(BACKENDS)} or None; got {backend!r}")
        chosen = BACKENDS[backend]
        reasons = chosen.not_supported_reasons(device, dtypes)
        if reasons:
            raise RuntimeError(f"backend {backend!r} cannot serve these inputs: {'; '.join(reasons)}")
        return chosen
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if not BACKENDS[name].not_supported_reasons(device, dtypes):
            return BACKENDS[name]
    return BACKENDS["reference"]


# Load every backend at import (a shared library and a few registrations, no computation), so that
# torch.compile never has to trace an import when a compiled function first picks a backend.
for _backend in BACKENDS.values():
    _backend.unavailable_reason  # noqa: B018
