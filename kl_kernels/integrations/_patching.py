"""patch(): swap drop-in functions into an installed trainer, and put the originals back."""
from __future__ import annotations

import importlib
import sys


class Patch:
    """Replaces attributes of a trainer's modules; usable as a context manager or by hand
    (`handle = patch(); ...; handle.restore()`). Besides the defining modules, every loaded module
    of the package that imported one of the originals by name (`from x import f`) is patched too,
    since it holds its own reference."""

    def __init__(self, package: str, targets: dict[str, dict[str, object]]):
        try:
            importlib.import_module(package)
        except ImportError as error:
            raise ImportError(f"kl_kernels.integrations: the trainer package {package!r} is not installed "
                              f"or does not import ({error})") from error
        self._package = package
        self._saved: list[tuple[object, str, object]] = []
        self._originals = {}  # id(replacement) -> original, for modules imported while patched
        originals = {}  # id(original object) -> replacement
        for module_name, replacements in targets.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue  # an older or newer layout of the trainer: patch what exists
            for name, replacement in replacements.items():
                if hasattr(module, name):
                    originals[id(getattr(module, name))] = replacement
                    self._originals[id(replacement)] = getattr(module, name)
        for module in self._package_modules():
            for name, value in list(vars(module).items()):
                if id(value) in originals:
                    self._saved.append((module, name, value))
                    setattr(module, name, originals[id(value)])
        if not self._saved:
            raise ImportError(f"kl_kernels.integrations: found none of {sorted({n for r in targets.values() for n in r})} "
                              f"in {package!r}; is this a supported version?")

    def _package_modules(self):
        for module_name, module in list(sys.modules.items()):
            if module is not None and (module_name == self._package or module_name.startswith(self._package + ".")):
                yield module

    @property
    def patched(self) -> list[str]:
        """'module.name' of every attribute replaced."""
        return [f"{module.__name__}.{name}" for module, name, _ in self._saved]

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
