"""A pytest plugin that runs a trainer's own test suite with kl_kernels' patch() active.

    KL_KERNELS_PATCH=verl,openrlhf KL_KERNELS_PATCH_REPORT=counts.json \
        python -m pytest -p patch_plugin <the trainer's test files>

The patches go in before collection (so test modules that import the trainer's functions by name
get the replacements) and come out at the end; the report holds, per replaced function, the calls
served by the fused path and the calls handed back to the trainer's original.
"""
import importlib
import json
import os

_handles = []


def pytest_configure(config):
    for name in filter(None, os.environ.get("KL_KERNELS_PATCH", "").split(",")):
        _handles.append(importlib.import_module(f"kl_kernels.integrations.{name}").patch(quiet=True))


def pytest_unconfigure(config):
    report = {"replaced": [], "counts": {}}
    for handle in _handles:
        report["replaced"] += handle.replaced
        report["counts"].update(handle.counts())
        handle.restore()
    if os.environ.get("KL_KERNELS_PATCH_REPORT"):
        with open(os.environ["KL_KERNELS_PATCH_REPORT"], "w") as out:
            json.dump(report, out, indent=1)
