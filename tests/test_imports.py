"""The package's import graph: no cycle, statically or at run time, and the arrows point one way
(public functions -> dispatch -> backends -> contract; the library never imports its tools)."""
import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import kl_kernels

PACKAGE_DIR = os.path.dirname(kl_kernels.__file__)


def _modules():
    """{dotted name: path} of every Python module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module, path):
    """The package's modules that `module` imports anywhere in its file (top level or inside functions)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = ([base] if node.module else []) + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        targets.update(name for name in names if name in MODULES and name != module)
    return targets


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def _reaches(module):
    seen, todo = set(), [module]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_arrows_point_one_way():
    library = [m for m in MODULES if not m.startswith("kl_kernels.tools")]
    for module in library:
        assert not any(t.startswith("kl_kernels.tools") for t in _reaches(module)), f"{module} reaches the tools"
    assert GRAPH["kl_kernels.contract"] == set(), "contract.py is a leaf (torch only)"
    for module in (m for m in MODULES if m.startswith("kl_kernels.backends")):
        forbidden = {"kl_kernels.dispatch", "kl_kernels.api", "kl_kernels.linear", "kl_kernels.rows", "kl_kernels"}
        assert not _reaches(module) & forbidden, f"{module} imports the registry, the row pass or the public side"
    # the row pass serves both public sides (logits and hidden states) from below them
    assert not _reaches("kl_kernels.rows") & {"kl_kernels.api", "kl_kernels.linear", "kl_kernels.dispatch"}
    assert "kl_kernels.rows" in GRAPH["kl_kernels.api"] and "kl_kernels.rows" in GRAPH["kl_kernels.linear"]
    # the head's matmuls sit below the head's tiling: they know nothing of the row pass or the public side
    assert not _reaches("kl_kernels.projection") & {"kl_kernels.linear", "kl_kernels.rows", "kl_kernels.api",
                                                     "kl_kernels.dispatch"}


@pytest.mark.slow  # a minute of fresh interpreters; the static graph above runs always
@pytest.mark.parametrize("group", [0, 1])
def test_each_module_imports_first_in_a_fresh_interpreter(group):
    """Imported first, each module must load on its own (a cycle that only an import order hides fails here)."""
    modules = sorted(MODULES)[group::2]

    def run(module):
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              cwd=os.path.dirname(PACKAGE_DIR))
        return module, done.returncode, done.stderr[-2000:]

    with ThreadPoolExecutor(2) as pool:
        failures = [(m, err) for m, code, err in pool.map(run, modules) if code != 0]
    assert not failures, failures
