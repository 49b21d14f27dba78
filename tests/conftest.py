import os
import zlib

# The Triton interpreter must be chosen before triton is first imported (it runs kernels on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kl_kernels  # noqa: E402



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh but reproducible random inputs per test
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(params=["reference", "cpu"], ids=lambda b: b)
def backend(request):
    info = {b.name: b for b in kl_kernels.available_backends()}[request.param]
    if not info.available:
        pytest.skip(f"backend {request.param} unavailable: {info.reason}")
    return request.param
