"""Backend records and the choice between them (docs/contract.md section 4).

Each backend declares what it serves and, when it cannot serve some inputs, says why. The choice
uses static facts only (device, dtype), never tensor values, so it costs no host sync.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch

from .sharding import VocabShard

ENV_VAR = "KL_KERNELS_BACKEND"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str | None


class PassArgs(NamedTuple):
    """What every backend's fused pass reads, forward and backward: the kernel contract's inputs."""
    logits: torch.Tensor  # [B, T, V] policy logits (this rank's vocabulary shard), vocabulary dim contiguous
    labels: torch.Tensor  # [N = B*T] int64, ids of the whole vocabulary
    ref_logits: Optional[torch.Tensor]  # [B, T, V] reference logits (any floating dtype), or None
    temperature: Union[float, torch.Tensor]  # T itself, everywhere: a float, or [N] in the compute dtype
    ignore_index: int
    shard: VocabShard  # where the V columns sit in the vocabulary (sharding.whole(V) when not sharded)


class RowStats(NamedTuple):
    """What every backend's forward returns: [N] each, float32 (float64 for float64 logits); None where
    not asked for. lse / ref_lse are saved for the backward."""
    logp: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    full_kl: Optional[torch.Tensor]
    lse: torch.Tensor
    ref_lse: Optional[torch.Tensor]


class RowGrads(NamedTuple):
    """The upstream gradients the backward takes: [N] each, or None when nothing flows from that output."""
    logp: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    full_kl: Optional[torch.Tensor]


class PenaltyArgs(NamedTuple):
    """What kl_penalty's one-pass ops read besides PassArgs (never sharded: a tensor-parallel call
    merges the rows' statistics across ranks first, then runs api.py's epilogue)."""
    estimator: object  # estimators.Estimator (name, straight_through, log_ratio_clamp, kl_clamp)
    ref_logprobs: Optional[torch.Tensor]  # [N] given reference log-probs (any floating dtype), when no ref_logits
    mask: Optional[torch.Tensor]  # [N] any real dtype, nonzero = valid, or None
    padded: bool  # sequences are the B rows of [B, T, V]; else cu_seqlens
    cu_seqlens: Optional[torch.Tensor]  # packed: [S+1] as the caller gave it (the kernels clamp it); None: one sequence
    kl_coef: Union[float, torch.Tensor]  # a float or a 0-dim tensor


class PenaltyStats(NamedTuple):
    """What the one-pass forward returns: kl_penalty's outputs ([N] and [S]) and what its backward reads."""
    logp: torch.Tensor
    ref_logp: torch.Tensor
    kl: torch.Tensor
    penalty: torch.Tensor
    kl_sum: torch.Tensor
    kl_mean: torch.Tensor
    counts: torch.Tensor  # [S] valid rows per sequence, in the compute dtype
    sequence: torch.Tensor  # [N] int32: each row's sequence, -1 outside every one (packed, validate=False)
    entropy: Optional[torch.Tensor]
    full_kl: Optional[torch.Tensor]
    lse: torch.Tensor
    ref_lse: Optional[torch.Tensor]


class PenaltyGrads(NamedTuple):
    """Upstream gradients of kl_penalty's six differentiable outputs, None where nothing flows."""
    logp: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    penalty: Optional[torch.Tensor]
    kl_sum: Optional[torch.Tensor]
    kl_mean: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]


@runtime_checkable
class FusedPass(Protocol):
    """What a backend implements (reference.py in PyTorch; ops.op_backend over the C++ and Triton ops)."""

    def fused_kl_fwd(self, args: PassArgs, need_entropy: bool, need_full: bool) -> RowStats:
        """One read of the logits (and reference logits): the per-row statistics."""

    def fused_kl_bwd(self, args: PassArgs, stats: RowStats, grads: RowGrads, inplace: bool) -> torch.Tensor:
        """The logits' gradient in their dtype (written into args.logits when inplace), from the
        statistics the forward saved (for a shard: the merged ones of the whole vocabulary)."""


@runtime_checkable
class OnePass(FusedPass, Protocol):
    """A backend that also runs all of kl_penalty in its kernels: at most two launches each way
    (the row pass with the estimator as its epilogue, and the per-sequence sums)."""

    def serves_one_pass(self, device: torch.device) -> bool:
        """Whether the one-pass ops are built for this device."""

    def kl_penalty_fwd(self, args: PassArgs, penalty: PenaltyArgs, need_entropy: bool) -> PenaltyStats:
        """The row pass, the estimator, masks, penalty and per-sequence sums."""

    def kl_penalty_bwd(self, args: PassArgs, penalty: PenaltyArgs, stats: PenaltyStats, grads: PenaltyGrads,
                       inplace: bool) -> torch.Tensor:
        """The logits' gradient from the six outputs' upstream gradients, one more pass."""


def _load_reference():
    return importlib.import_module("kl_kernels.reference"), None


def _load_extension(dispatch_key):
    try:
        module = importlib.import_module("kl_kernels.extension")
    except ImportError as error:  # the C++ extension was not built or does not load
        reason = f"the C++ extension kl_kernels._C is not available ({error})"
        if not isinstance(error, ModuleNotFoundError):
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
        module = importlib.import_module("kl_kernels.triton.fused_kl")
    except ImportError as error:
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
        """Whether it runs all of kl_penalty in its own ops on this device (dispatch.OnePass)."""
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
    """One BackendInfo per backend; reason says why one is unavailable (None when available)."""
    return [BackendInfo(b.name, b.unavailable_reason is None, b.unavailable_reason) for b in BACKENDS.values()]


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
