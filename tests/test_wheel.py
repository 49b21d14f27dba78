"""The wheel as shipped, not the editable install: built here with `pip wheel`, unpacked into a fresh
directory and imported from there by a process that cannot see this checkout. It pins the torch it
was built against, records the commit, holds a CPU kernel per instruction set, and with AVX2
forced (torch's ATEN_CPU_CAPABILITY convention) loads and runs the AVX2 build, which holds no
AVX-512 instruction."""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from test_extension_build import CPU_BUILD_CHECK, X86, needs_x86_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps", "-w",
                    str(out), ROOT], check=True, capture_output=True, text=True)
    (path,) = glob.glob(str(out / "kl_kernels-*.whl"))
    site = out / "site"
    with zipfile.ZipFile(path) as archive:  # what `pip install` would put in site-packages
        archive.extractall(site)
    return path, site


@needs_x86_build
@pytest.mark.slow
def test_wheel_metadata_pins_torch_and_records_the_commit(wheel):
    path, site = wheel
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in metadata
    assert any(n.startswith("kl_kernels/_cpu_avx2") for n in names)
    assert any(n.startswith("kl_kernels/_cpu_avx512") for n in names)
    info = (site / "kl_kernels" / "_build_info.py").read_text()
    assert "COMMIT = '" in info and f"TORCH = {torch.__version__!r}" in info


@needs_x86_build
@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_wheel_runs_the_cpu_backend_from_its_own_directory(wheel, capability, tmp_path):
    _, site = wheel
    # the checkout's kl_kernels must not be the one imported
    code = f"import kl_kernels; assert kl_kernels.__file__.startswith({str(site)!r}), kl_kernels.__file__\n" \
        + CPU_BUILD_CHECK
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATEN_CPU_CAPABILITY")}
    env["PYTHONPATH"] = str(site)
    if capability != "default":
        env["ATEN_CPU_CAPABILITY"] = capability
    # run from an empty directory: the checkout's kl_kernels must not be importable
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    isa, error = result.stdout.split()
    want = capability if capability != "default" else \
        {"AVX512": "avx512", "AVX2": "avx2"}[torch.backends.cpu.get_cpu_capability()]
    assert isa == want and float(error) < 1e-5


@needs_x86_build
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("objdump") is None or not X86, reason="needs objdump")
def test_wheel_avx2_build_has_no_avx512_instruction(wheel):
    _, site = wheel
    (library,) = glob.glob(str(site / "kl_kernels" / "_cpu_avx2*.so"))
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                          check=True).stdout
    assert "vfmadd" in text or "vmulps" in text
    assert "zmm" not in text
