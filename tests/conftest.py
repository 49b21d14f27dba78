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


def pytest_collection_modifyitems(config, items):
    # backend x dtype pairs the backend does not serve (triton/cuda have no float64) are not
    # generated; test_validation checks that such a pair raises
    deselected = [item for item in items if _dtype_unsupported(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not _dtype_unsupported(item)]
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
