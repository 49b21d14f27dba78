import os
import zlib

import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter, which must be chosen before
# triton is first imported (kl_kernels imports it). With a GPU they run compiled, on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kl_kernels  # noqa: E402
from kl_kernels.dispatch import BACKENDS  # noqa: E402

# Every backend this machine can run; cpu and triton are asserted to be present in
# test_fused_kl_ops.py, so a broken build fails there instead of shrinking this list.
# A CUDA build without a GPU (a build machine) has the cuda kernels but nothing to run them on.
BACKENDS_UNDER_TEST = [info.name for info in kl_kernels.available_backends()
                       if info.available and (info.name != "cuda" or torch.cuda.is_available())]
# GPU backends run on CUDA tensors when there is a GPU (the tests make their inputs on the default
# device); triton runs on CPU tensors under the interpreter otherwise.
GPU_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.home == "cuda")


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", default=False,
                     help="also run the tests marked slow (large N x V, wheel builds): `./run.sh test --all`; "
                          "without it they are deselected, so the default suite fits a laptop (README)")


def pytest_configure(config):
    config.addinivalue_line("markers", "float64_only: the test works in float64 (gradcheck); backends "
                                       "without float64 are deselected")


def _dtype_unsupported(item):
    params = getattr(item, "callspec", None)
    if params is None or "backend" not in params.params:
        return False
    dtypes = BACKENDS[params.params["backend"]].dtypes
    wanted = params.params.get("dtype")
    if "float64_only" in item.keywords:
        wanted = torch.float64
    return wanted is not None and wanted not in dtypes


# Cases of otherwise quick tests that take the default suite's longest minutes (issue 38: the default
# suite fits 10 minutes and 4 GB on 2 cores); each has a quick sibling that stays in it: 4 gloo ranks
# (2 stay), the Triton interpreter's largest float64 comparisons of the hidden-state head and of the
# low-precision error (the reference and cpu backends run the same cases, and the Triton kernels'
# own tests stay), Triton's compiler on every flag set (one set per arch stays).
SLOW_CASES = {
    "test_sharding.py": lambda params: params.get("world_size") == 4,
    "test_linear.py::test_against_float64": lambda params: params.get("backend") == "triton",
    "test_linear.py::test_odd_shapes_and_strided_hidden": lambda params: params.get("backend") == "triton",
    "test_fused_kl.py::test_low_precision_error_at_most_twice_pytorch": lambda params: params.get("backend") == "triton",
    "test_triton_compile.py::test_triton_kernels_compile_for_gpu":
        lambda params: (params.get("flags"), params.get("arch")) not in (("all", "90"), ("penalty-full", "80")),
    "test_lab.py": lambda params: True,
}


def _slow(item):
    if "slow" in item.keywords:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    path = item.nodeid.split("[")[0].split("/")[-1]
    return any((path == key or path.startswith(key + "::")) and is_slow(params) for key, is_slow in SLOW_CASES.items())


def _left_out(config, item):
    # without --all (or an explicit -m), the slow tests wait for `./run.sh test --all`
    if _slow(item):
        item.add_marker(pytest.mark.slow)
    return _slow(item) and not config.getoption("--all") and not config.getoption("-m")


def pytest_collection_modifyitems(config, items):
    # backend x dtype pairs the backend does not serve (triton/cuda have no float64) are not
    # generated; test_validation checks that such a pair raises
    deselected = [item for item in items if _dtype_unsupported(item) or _left_out(config, item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not (_dtype_unsupported(item) or _left_out(config, item))]
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "requires_cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh but reproducible random inputs per test
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(params=BACKENDS_UNDER_TEST)
def backend(request, monkeypatch):
    if request.param == "triton":
        # several vocabulary tiles per row even at test sizes (the interpreter is slow per tile)
        from kl_kernels.backends.triton import fused_kl
        monkeypatch.setattr(fused_kl, "MAX_BLOCK_V", 256)
    if request.param in GPU_BACKENDS and torch.cuda.is_available():
        torch.set_default_device("cuda")
        yield request.param
        torch.set_default_device(None)
    else:
        yield request.param
