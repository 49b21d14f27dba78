"""The CUDA device code compiles with plain nvcc for sm_80 and sm_90, under the flags torch's
extension builds add (no implicit half/bfloat16 conversions or operators). Runs without a GPU;
the kernels' results are checked on a GPU by the suite's cuda backend tests."""
import glob
import os
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(__file__), os.pardir, "csrc")
# what torch.utils.cpp_extension adds to every nvcc command line
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
DTYPES = ["float", "__half", "__nv_bfloat16"]

# every kernel for every policy x reference dtype pair, as the torch glue instantiates them
TRANSLATION_UNIT = '#include "cuda/fused_kl.cuh"\nusing namespace kl_kernels::cuda;\n' + "".join(
    f"template void kl_kernels::cuda::launch_fused_kl_fwd<{p}, {r}>(Rows<const {p}>, Rows<const {r}>, bool, const FwdParams&, "
    f"cudaStream_t);\n"
    f"template void kl_kernels::cuda::launch_fused_kl_bwd<{p}, {r}>(Rows<{p}>, Rows<const {p}>, Rows<const {r}>, const BwdParams&, "
    f"cudaStream_t);\n"
    for p in DTYPES for r in DTYPES)


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_device_code_compiles_with_plain_nvcc(tmp_path, arch):
    source = tmp_path / "instantiate.cu"
    source.write_text(TRANSLATION_UNIT)
    command = [find_nvcc(), "-std=c++17", "-O3", f"-arch={arch}", *TORCH_NVCC_FLAGS, "-I", os.path.abspath(CSRC),
               "-Werror", "all-warnings", "-c", str(source), "-o", str(tmp_path / "instantiate.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "instantiate.o").stat().st_size > 0


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.slow  # half a minute of nvcc on torch's headers; the device code compiles by default
def test_torch_glue_compiles_against_this_torch(tmp_path):
    """csrc/cuda/*.cu (argument checks, outputs, launches) compiled, not linked, against the installed
    torch's headers: the glue's C++ is checked without a CUDA build of torch. A CPU wheel lacks one
    generated header of c10/cuda (build macros); a stand-in defines the shared-library build."""
    from torch.utils.cpp_extension import include_paths
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [flag for path in include_paths() for flag in ("-I", path)]
    for source in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))):
        command = [find_nvcc(), "-std=c++17", "-O0", "-arch=sm_90", *TORCH_NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=_C",
                   *includes, "-Xcompiler", f"-idirafter{tmp_path / 'stub'}", "-I", os.path.abspath(CSRC), "-c", source,
                   "-o", str(tmp_path / "glue.o")]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
