"""patch(): swap the fused path into an installed trainer where it does O(N x V) work, and put the
originals back (docs/contract.md section 7).

Each replacement wraps the trainer's own function: it binds the call to the installed function's
signature (read from it, not written here), serves what the fused path supports, and calls the
original for anything else (a parameter it does not know, a value it does not serve, an argument
the original would reject), so a patched trainer never raises where the unpatched one would not.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..dispatch import ENV_VAR, select_backend


class Fallback(Exception):
    """Raised inside a fused implementation: this call goes to the trainer's original (the message says why)."""


@dataclass
class Replacement:
    """One O(N x V) function of a trainer.

    fused(bound_arguments, original) computes the call on the fused path or raises Fallback; it sees
    the arguments by the installed signature's names, defaults applied. `known` lists the
    parameters fused understands: a call that passes any other parameter a non-default value goes
    to the original."""

    module: str
    name: str
    fused: Callable
    known: tuple[str, ...]
    fused_calls: int = field(default=0, init=False)
    fallback_reasons: dict = field(default_factory=dict, init=False)  # why a call went to the original: count

    @property
    def original_calls(self) -> int:
        return sum(self.fallback_reasons.values())

    def wrap(self, original):
        if _is_autograd_function(original):
            # called as Cls.apply(...): a class whose apply is the wrapper
            apply = self._wrap_callable(original.apply, _apply_signature(original))
            return type(original.__name__, (), {"apply": staticmethod(apply), "__kl_kernels_replacement__": self,
                                                "__doc__": original.__doc__})
        owner = getattr(original, "__self__", None)
        if _is_autograd_function(owner):  # `f = Cls.apply`
            return self._wrap_callable(original, _apply_signature(owner))
        return self._wrap_callable(original, inspect.signature(original))

    def _wrap_callable(self, original, signature):
        unknown = [p for p in signature.parameters.values()
                   if p.name not in self.known and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        record = self

        @functools.wraps(original)
        def replacement(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return record._call_original(original, "arguments do not bind", args, kwargs)
            bound.apply_defaults()
            passed = bound.arguments
            for parameter in unknown:
                if parameter.name in passed and not _is_default(passed[parameter.name], parameter.default):
                    return record._call_original(original, f"parameter {parameter.name!r} is not served",
                                                 args, kwargs)
            try:
                result = record.fused(passed, original)
            except Fallback as why:
                return record._call_original(original, str(why), args, kwargs)
            record.fused_calls += 1
            return result

        replacement.__kl_kernels_replacement__ = self
        return replacement

    def _call_original(self, original, reason, args, kwargs):
        self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1
        return original(*args, **kwargs)


def _is_autograd_function(value) -> bool:
    return isinstance(value, type) and issubclass(value, torch.autograd.Function)


def _apply_signature(function: type) -> inspect.Signature:
    """What Cls.apply takes: forward's signature without ctx."""
    forward = inspect.signature(function.forward)
    return forward.replace(parameters=list(forward.parameters.values())[1:])


def _is_default(value, default) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor) or type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - an object whose == cannot answer is not the default
        return False


def fused_backend(logits: torch.Tensor, dtype: torch.dtype | None = None):
    """The backend for these logits (computed in `dtype`, default theirs), or Fallback when only
    the pure-PyTorch reference could serve them (no faster than the trainer's own code, so the
    trainer keeps the call)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise Fallback("logits are not a floating tensor")
    dtype = logits.dtype if dtype is None else dtype
    try:
        chosen = select_backend(None, logits.device, (dtype,))
    except (RuntimeError, ValueError) as error:  # KL_KERNELS_BACKEND names one that cannot serve
        raise Fallback(str(error)) from None
    if chosen.name == "reference" and os.environ.get(ENV_VAR) != "reference":
        raise Fallback(f"no fused kernel for {logits.device.type} / {dtype}")
    return chosen.name


def real_temperature(value) -> float:
    """A positive finite Python/NumPy number, else Fallback (the trainer decides what it means)."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise Fallback("temperature is not a plain number")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise Fallback("temperature is not a number") from None
    if not (value > 0 and value < float("inf")):
        raise Fallback("temperature is not positive and finite")
    return value


def labels_for(logits: torch.Tensor, labels) -> torch.Tensor:
    """labels that index logits row by row, else Fallback."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64, torch.int16,
                                                                    torch.uint8, torch.int8):
        raise Fallback("labels are not an integer tensor")
    if labels.shape != logits.shape[:-1] or labels.device != logits.device:
        raise Fallback("labels do not match the logits' leading shape or device")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise Fallback("empty vocabulary")
    return labels


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


class Patch:
    """The replacements swapped into one trainer; a context manager, or call `.restore()`.

    Besides the defining module, every loaded module of the package that imported an original by
    name (`from x import f`) holds its own reference and is patched too.
    `replaced` lists 'module.name' of each attribute swapped; `left_alone` maps each function not
    replaced to the reason; `report()` says both, and patch() prints it unless quiet."""

    def __init__(self, package: str, tested: tuple[str, str], replacements: list[Replacement],
                 left_alone: dict[str, str], quiet: bool = False):
        try:
            importlib.import_module(package)
        except ImportError as error:
            raise ImportError(f"kl_kernels.integrations: the trainer package {package!r} is not installed "
                              f"or does not import ({error})") from error
        self.package = package
        self.version = _installed_version(package)
        self.tested = tested
        if self.version is not None and not (_version_tuple(tested[0]) <= _version_tuple(self.version)
                                             < _version_tuple(tested[1])):
            warnings.warn(f"kl_kernels.integrations: {package} {self.version} is outside the versions this patch "
                          f"was tested against (>= {tested[0]}, < {tested[1]}); each replacement still falls "
                          "back to the original for any call it does not recognise", stacklevel=3)
        self.replacements = replacements
        self.left_alone = dict(left_alone)
        self._saved: list[tuple[object, str, object]] = []
        self._originals = {}  # id(replacement) -> original, for modules first imported while patched
        swap = {}  # id(original) -> replacement
        for item in replacements:
            try:
                module = importlib.import_module(item.module)
            except ImportError as error:
                self.left_alone[f"{item.module}.{item.name}"] = f"module does not import here ({error})"
                continue
            original = getattr(module, item.name, None)
            if original is None:
                self.left_alone[f"{item.module}.{item.name}"] = f"not in {package} {self.version}"
                continue
            replacement = item.wrap(original)
            swap[id(original)] = replacement
            self._originals[id(replacement)] = original
        for module in self._package_modules():
            for name, value in list(vars(module).items()):
                if id(value) in swap:
                    self._saved.append((module, name, value))
                    setattr(module, name, swap[id(value)])
        if not quiet:
            print(self.report(), file=sys.stderr)

    def _package_modules(self):
        for module_name, module in list(sys.modules.items()):
            if module is not None and (module_name == self.package or module_name.startswith(self.package + ".")):
                yield module

    @property
    def replaced(self) -> list[str]:
        return [f"{module.__name__}.{name}" for module, name, _ in self._saved]

    def counts(self) -> dict[str, tuple[int, int]]:
        """'module.name' -> (calls served by the fused path, calls handed to the original)."""
        return {f"{r.module}.{r.name}": (r.fused_calls, r.original_calls) for r in self.replacements}

    def fallback_reasons(self) -> dict[str, dict[str, int]]:
        """'module.name' -> {why a call went to the original: how many times}."""
        return {f"{r.module}.{r.name}": dict(r.fallback_reasons) for r in self.replacements if r.fallback_reasons}

    def report(self) -> str:
        lines = [f"kl_kernels patched {self.package} {self.version} (tested >= {self.tested[0]}, < {self.tested[1]}):"]
        lines += [f"  replaced {name}" for name in self.replaced] or ["  replaced nothing"]
        lines += [f"  left alone {name}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)

    def restore(self) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved = []
        # a module of the package first imported while patched copied a replacement: give it the original
        for module in self._package_modules():
            for name, value in list(vars(module).items()):
                if id(value) in self._originals:
                    setattr(module, name, self._originals[id(value)])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get(package), "__version__", None)


def fused_rows(logits, labels, *, temperature=1.0, return_entropy=False, inplace_backward=False, row_mask=None,
               process_group=None):
    """token_logprobs for a trainer's call: labels checked by static facts (no host sync), rows
    where row_mask is 0 skipped (0 out, never read), or Fallback. process_group: the logits are this
    rank's vocabulary shard (labels are global ids)."""
    from ..api import token_logprobs

    fused_backend(logits)
    if labels is None:  # entropy only: any in-range label, its log-prob is not used
        labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    labels = labels_for(logits, labels)
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.shape != labels.shape or row_mask.device != labels.device:
            raise Fallback("row_mask does not match the labels")
        labels = labels.masked_fill(row_mask == 0, SKIP)
    return token_logprobs(logits, labels, temperature=temperature, ignore_index=SKIP, return_entropy=return_entropy,
                          validate=False, inplace_backward=inplace_backward, process_group=process_group)


SKIP = -100  # the ignore_index fused_rows gives to skipped rows


def logprobs_verl_style(a, flash: bool):
    """verl's logprobs_from_logits(logits, labels, inplace_backward) (SkyRL carries a copy): float32 where the
    trainer would take flash-attn's cross entropy (`flash`), else the logits' dtype, as its own fallback. The
    gradient is written over the logits only on that path, as flash-attn's does, and only over an
    intermediate of the graph, never a leaf the caller holds."""
    logits = a["logits"]
    inplace = bool(flash and a.get("inplace_backward", True) and isinstance(logits, torch.Tensor)
                   and logits.grad_fn is not None)
    logp = fused_rows(logits, a["labels"], inplace_backward=inplace)
    return logp if flash else logp.to(logits.dtype)


def entropy_in_logits_dtype(a, original):
    """A trainer's entropy_from_logits(logits): fused, returned in the logits' dtype."""
    logits = a["logits"]
    return fused_rows(logits, None, return_entropy=True)[1].to(logits.dtype)
