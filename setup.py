"""Builds kl_kernels and its C++ extension kl_kernels._C from csrc/ with torch's cpp_extension.

The extension has the CPU kernels always and the CUDA kernels (csrc/cuda) when torch is a CUDA
build and a CUDA toolkit is found (CUDA_HOME, else nvcc on PATH): decided from torch.version.cuda
and the toolkit, not from a visible GPU, so it builds on a GPU-less build machine. Targets sm_80
and sm_90 plus PTX unless TORCH_CUDA_ARCH_LIST says otherwise; KL_KERNELS_NO_CUDA=1 skips CUDA.

Install with `pip install --no-build-isolation -e .` after installing torch: an isolated build
would download another (CUDA) torch to compile against. KL_KERNELS_NO_EXTENSION=1 skips the
extension; the package then runs on the pure-PyTorch `reference` backend.
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("KL_KERNELS_NO_EXTENSION", "0") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/registration.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp: at::parallel_for is inlined from the headers and is serial without it
    flags = ["-O3", "-fopenmp"]
    # ATen's Vectorized<> is 16 floats wide with AVX-512 and 8 with AVX2; without such flags it
    # falls back to scalar loops (3x slower here). Chosen from the build machine's CPU, since the
    # extension is built where it runs; KL_KERNELS_CPU_FLAGS="..." overrides.
    cpu_flags = os.environ.get("KL_KERNELS_CPU_FLAGS")
    if cpu_flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpu_info = set(f.read().split())
        except OSError:
            cpu_info = set()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= cpu_info:
            cpu_flags = "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c " \
                        "-DCPU_CAPABILITY_AVX512 -DCPU_CAPABILITY=AVX512"
        elif {"avx2", "fma", "f16c"} <= cpu_info:
            cpu_flags = "-mavx2 -mfma -mf16c -DCPU_CAPABILITY_AVX2 -DCPU_CAPABILITY=AVX2"
        else:
            cpu_flags = ""
    flags += cpu_flags.split()
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and \
        os.environ.get("KL_KERNELS_NO_CUDA", "0") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        extension = CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        compile_args = {"cxx": flags, "nvcc": ["-O3"]}  # torch picks the C++ standard
    else:
        extension, compile_args = CppExtension, {"cxx": flags}
    ext_modules = [extension("kl_kernels._C", sources, include_dirs=[os.path.abspath("csrc")],
                             extra_compile_args=compile_args, extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}



def record_commit():
    """kl_kernels/_build_info.py holds the commit the package was built from, so that kl-bench rows
    from an installed wheel (no .git beside it) still say which code ran."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    commit = commit or os.environ.get("KL_KERNELS_COMMIT") or None
    with open(os.path.join("kl_kernels", "_build_info.py"), "w") as f:
        f.write(f'"""Written by setup.py at build time."""\nCOMMIT = {commit!r}\n')


record_commit()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
