"""A peer's own code run from its pinned wheel without installing its package: the inference engines' samplers
(vLLM, SGLang: their dependency sets need CUDA builds) and SkyRL's scorer (its package needs Python 3.12; these
modules run on 3.11) for the tests and kl-bench.

`Engine` reads the modules a caller names straight from the wheel (`./run.sh test` downloads the wheels into
<venv>/engines: tests/engines/requirements*.txt; KL_KERNELS_WHEELS names another folder) and runs them as they
are. Every other module of the engine's package they import is a stub: an attribute a test does not set is
a do-nothing class (usable as a base class, a decorator or a value), so an import of something the tested
code never calls costs nothing. The modules live under their own names only while they load or run (Engine.active)."""
from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
import zipfile

WHEELS = {"vllm": "vllm-0.33.0-*.whl", "sglang": "sglang-0.5.23-*.whl", "skyrl": "skyrl-0.4.0-*.whl"}


class WheelMissing(ImportError):
    pass


def folder() -> str:
    return os.environ.get("KL_KERNELS_WHEELS", os.path.join(sys.prefix, "engines"))


def wheel(package: str) -> str:
    """The pinned wheel's path, or WheelMissing (a test skips on it)."""
    found = sorted(glob.glob(os.path.join(folder(), WHEELS[package])))
    if not found:
        raise WheelMissing(f"{package}'s pinned wheel ({WHEELS[package]}) is not in {folder()} "
                           "(./run.sh test downloads it)")
    return found[-1]


class _AnyAttribute(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _Anything(metaclass=_AnyAttribute):
    """What a stubbed name is: constructible with any arguments, callable (as a decorator it returns what it
    decorates), a base class, with any attribute, and falsy."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Anything()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __bool__(self):
        return False


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Anything,), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, archive, package, real, values):
        self.archive, self.package, self.real, self.values = archive, package, set(real), values

    def find_spec(self, name, path=None, target=None):
        if name != self.package and not name.startswith(self.package + "."):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)  # submodules come here too

    def create_module(self, spec):
        return None if spec.name in self.real else _StubModule(spec.name)

    def exec_module(self, module):
        name = module.__name__
        module.__path__ = []
        for attribute, value in self.values.get(name, {}).items():
            setattr(module, attribute, value)
        if name in self.real:
            stem = name.replace(".", "/")
            path = f"{stem}/__init__.py" if f"{stem}/__init__.py" in self.archive.namelist() else f"{stem}.py"
            module.__file__ = f"{self.archive.filename}/{path}"
            exec(compile(self.archive.read(path).decode(), module.__file__, "exec"), module.__dict__)


class Engine:
    """The modules of an engine's wheel that a test runs. They leave sys.modules once loaded (no test sees
    a stub where it looks for the real package); `with engine.active():` puts them back, with the finder,
    around a call whose code imports lazily."""

    def __init__(self, engine: str, real, values=None):
        """engine: the package (a key of WHEELS); real: the dotted names to run from the wheel; values:
        {module: {name: value}} set in a (stubbed or real) module before it runs."""
        self.name, self.finder, self.loaded = engine, _Finder(zipfile.ZipFile(wheel(engine)), engine, real, values or {}), {}
        with self.active():
            for name in real:
                importlib.import_module(name)

    def __getitem__(self, name):
        return self.loaded[name]

    def _ours(self, name):
        return name == self.name or name.startswith(self.name + ".")

    @contextlib.contextmanager
    def active(self):
        saved = {name: module for name, module in sys.modules.items() if self._ours(name)}
        for name in saved:
            del sys.modules[name]
        sys.modules.update(self.loaded)
        sys.meta_path.insert(0, self.finder)
        try:
            yield self
        finally:
            sys.meta_path.remove(self.finder)
            for name in [name for name in sys.modules if self._ours(name)]:
                self.loaded[name] = sys.modules.pop(name)
            sys.modules.update(saved)
