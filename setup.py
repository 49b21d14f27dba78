"""Builds kl_kernels and its C++ extensions from csrc/ with torch's cpp_extension: kl_kernels._C
(the schemas, and the CUDA kernels) and kl_kernels._cpu_<isa> (the CPU kernels, one library per
instruction set; see cpu_variants); for the tools, kl_kernels.tools._memory (kl-bench's CPU
allocation counter) and kl_kernels.tools._testing_<isa> (test-only ops).

_C has the CUDA kernels (csrc/cuda) when torch is a CUDA
build and a CUDA toolkit is found (CUDA_HOME, else nvcc on PATH): decided from torch.version.cuda
and the toolkit, not from a visible GPU, so it builds on a GPU-less build machine. Targets sm_80
and sm_90 plus PTX unless TORCH_CUDA_ARCH_LIST says otherwise; KL_KERNELS_NO_CUDA=1 skips CUDA.

Install with `pip install --no-build-isolation -e .` after installing torch: an isolated build
would download another (CUDA) torch to compile against. KL_KERNELS_NO_EXTENSION=1 skips the
extension; the package then runs on the pure-PyTorch `reference` backend.
"""
import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
# what the package was built against, for kl-bench rows and for a clear message when the extension
# cannot load (a wheel installed beside another torch)
build_info = {"COMMIT": None, "TORCH": None}


def cpu_variants():
    """(suffix, flags) of the CPU kernel builds. On x86-64 one library per instruction set ATen
    dispatches to, AVX-512 and AVX2 (ATen's Vectorized<> is 16 floats wide with AVX-512, 8 with AVX2,
    scalar loops without either: 3x slower here); kl_kernels/backends/extension.py loads the one the running
    CPU supports (torch.backends.cpu.get_cpu_capability(), so ATEN_CPU_CAPABILITY=avx2 forces AVX2).
    Each is a whole library, not a translation unit beside the others: inline functions compiled
    for AVX-512 can never be picked by the linker for the AVX2 build. KL_KERNELS_CPU_FLAGS="..."
    builds one variant with those flags instead; other CPUs get one portable build."""
    if os.environ.get("KL_KERNELS_CPU_FLAGS") is not None:
        return [("base", os.environ["KL_KERNELS_CPU_FLAGS"].split())]
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [("base", [])]
    return [("avx512", "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c "
                       "-DCPU_CAPABILITY_AVX512 -DCPU_CAPABILITY=AVX512".split()),
            ("avx2", "-mavx2 -mfma -mf16c -DCPU_CAPABILITY_AVX2 -DCPU_CAPABILITY=AVX2".split())]


def installed_torch():
    """The torch to compile against: the one installed where pip runs. pip's build isolation would fetch
    another (a multi-GB CUDA build, whose version the metadata would then pin over the user's torch):
    pyproject.toml does not ask for torch, so an isolated build stops here, at once, saying what to type."""
    try:
        import torch
    except ImportError:
        sys.exit("kl_kernels: pip's build isolation hides your torch, which the C++ extension compiles against: "
                 "run `pip install --no-build-isolation .` (with torch installed first; KL_KERNELS_NO_EXTENSION=1 "
                 "installs the pure-PyTorch package)")
    return torch


def cuda_toolkit(torch, cuda_home):
    """(whether to build the CUDA kernels, why not): a CUDA build of torch and a toolkit whose runtime
    library is there to link (an `nvcc` alone, or a CPU torch, is not enough)."""
    if os.environ.get("KL_KERNELS_NO_CUDA", "0") == "1":
        return False, "KL_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    runtime = [os.path.join(cuda_home, lib, name) for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux",
               "lib")) for name in ("libcudart.so", "libcudart_static.a")]
    if not any(os.path.exists(path) for path in runtime):
        return False, f"the CUDA toolkit at {cuda_home} has no libcudart to link"
    return True, None


if os.environ.get("KL_KERNELS_NO_EXTENSION", "0") != "1":
    torch = installed_torch()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    build_info["TORCH"] = torch.__version__
    # -fopenmp: at::parallel_for is inlined from the headers and is serial without it
    flags = ["-O3", "-fopenmp"]
    include = [os.path.abspath("csrc")]
    # kl_kernels._C: every schema (csrc/registration.cpp) and the CUDA kernels; no instruction-set-specific
    # code, and nothing but the library's ops (the tools' code is built apart, below)
    sources = ["csrc/registration.cpp"]
    with_cuda, no_cuda = cuda_toolkit(torch, CUDA_HOME)
    print(f"kl_kernels: building the CPU kernels{' and the CUDA kernels' if with_cuda else ''} against torch "
          f"{torch.__version__}{'' if with_cuda else f' (no CUDA kernels: {no_cuda})'}; this takes a few minutes",
          file=sys.stderr)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext_modules.append(CUDAExtension("kl_kernels._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                                         include_dirs=include, extra_compile_args={"cxx": flags, "nvcc": ["-O3"]},
                                         extra_link_args=["-fopenmp"]))  # torch picks the C++ standard
    else:
        ext_modules.append(CppExtension("kl_kernels._C", sources, include_dirs=include,
                                        extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"]))
    # kl_kernels._cpu_<isa>: the CPU kernels (TORCH_LIBRARY_IMPL(kl_kernels, CPU)), one per instruction set
    for suffix, isa_flags in cpu_variants():
        ext_modules.append(CppExtension(f"kl_kernels._cpu_{suffix}", sorted(glob.glob("csrc/cpu/*.cpp")),
                                        include_dirs=include, extra_compile_args={"cxx": flags + isa_flags},
                                        extra_link_args=["-fopenmp"]))
    # the tools' own: kl-bench's CPU allocation counter, and the test-only ops (per instruction set: the
    # kernels' 2^y as each CPU build compiles it)
    ext_modules.append(CppExtension("kl_kernels.tools._memory", ["csrc/tools/memory_tracking.cpp"],
                                    extra_compile_args={"cxx": ["-O2"]}))
    for suffix, isa_flags in cpu_variants():
        ext_modules.append(CppExtension(f"kl_kernels.tools._testing_{suffix}", ["csrc/tools/testing.cpp"],
                                        include_dirs=include, extra_compile_args={"cxx": ["-O2"] + isa_flags}))
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    # the binary loads only with the torch it was compiled against: say so in the metadata
    install_requires = [f"torch=={torch.__version__.split('+')[0]}"]
else:
    install_requires = ["torch>=2.4"]

def record_build_info():
    """kl_kernels/_build_info.py holds the commit the package was built from (kl-bench rows from an
    installed wheel, with no .git beside it, still say which code ran) and the torch it was built
    against (named when the extension cannot load)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    build_info["COMMIT"] = commit or os.environ.get("KL_KERNELS_COMMIT") or None
    with open(os.path.join("kl_kernels", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py at build time."""\n')
        for name, value in build_info.items():
            f.write(f"{name} = {value!r}\n")


record_build_info()
setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=install_requires)
