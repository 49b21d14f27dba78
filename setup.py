"""Builds kl_kernels and its C++ extension kl_kernels._C from csrc/ with torch's cpp_extension.

Install with `pip install --no-build-isolation -e .` after installing torch: an isolated build
would download another (CUDA) torch to compile against. KL_KERNELS_NO_EXTENSION=1 skips the
extension; the package then runs on the pure-PyTorch `reference` backend.
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("KL_KERNELS_NO_EXTENSION", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

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
    ext_modules = [CppExtension("kl_kernels._C", sources, include_dirs=[os.path.abspath("csrc")],
                                extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
