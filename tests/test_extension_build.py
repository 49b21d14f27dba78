"""The C++ extension as shipped: the CPU kernels exist once per instruction set and the one the CPU
supports is loaded (forcing AVX2 on an AVX-512 machine runs the AVX2 build, which holds no AVX-512
instruction), and an extension that cannot load says so instead of silently running the reference."""
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import kl_kernels

X86 = platform.machine().lower() in ("x86_64", "amd64")
BUILT = kl_kernels.available_backends()[1].available  # the cpu backend
needs_x86_build = pytest.mark.skipif(not (X86 and BUILT and os.environ.get("KL_KERNELS_CPU_FLAGS") is None),
                                     reason="the per-instruction-set CPU builds exist on x86-64 builds only")


def _run(code, **env):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@needs_x86_build
def test_the_build_matching_the_cpu_is_loaded():
    from kl_kernels.backends import extension

    want = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())
    assert extension.CPU_ISA == want


# run in a fresh process: prints the CPU build loaded and the cpu backend's error against the reference
CPU_BUILD_CHECK = textwrap.dedent("""
    import torch, kl_kernels
    from kl_kernels.backends import extension
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 1000)
    labels = torch.randint(0, 1000, (3, 7))
    got = kl_kernels.kl_penalty(logits, labels, ref_logits=logits.flip(0), estimator="k3", backend="cpu")
    want = kl_kernels.kl_penalty(logits.double(), labels, ref_logits=logits.flip(0).double(), estimator="k3",
                                 backend="reference")
    print(extension.CPU_ISA, (got.kl.double() - want.kl).abs().max().item())
""")


@needs_x86_build
def test_forced_avx2_build_runs_and_agrees():
    isa, error = _run(CPU_BUILD_CHECK, ATEN_CPU_CAPABILITY="avx2")
    assert isa == "avx2" and float(error) < 1e-5


@needs_x86_build
def test_the_avx2_build_passes_the_cpu_kernel_edge_tests(tmp_path):
    """The AVX2 build has its own 2^y (no vscalefps) and 8-float vectors: the exp2 test and the cpu
    backend's edge tests (tiles far above the first, huge logits, +inf, NaN poison, the fuzz) again,
    in a process that loads it."""
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu",
                             "test_fused_kl_ops.py::test_cpu_kernels_exp2_is_within_two_ulp", "test_fused_kl_edges.py"],
                            capture_output=True, text=True, cwd=here,
                            # its own inductor cache: torch's cache key misses ATEN_CPU_CAPABILITY, and a
                            # kernel compiled for one vector width corrupts the heap when run at the other
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@needs_x86_build
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_the_avx2_build_has_no_avx512_instruction():
    path = importlib.util.find_spec("kl_kernels._cpu_avx2").origin
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True).stdout
    assert "vfmadd" in text or "vmulps" in text  # it is vectorized code at all
    assert "zmm" not in text


def test_an_extension_that_cannot_load_is_said_loudly():
    """A build against another torch fails at load (undefined symbols): a RuntimeWarning at import
    names the torch it was built for, and the cpu backend's reason says the same."""
    warning, reason = _run("""
        import importlib.abc, sys, warnings

        class BrokenExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "kl_kernels._C":
                    raise ImportError("kl_kernels/_C.so: undefined symbol: _ZN3c104impl3foo", name=name)

        sys.meta_path.insert(0, BrokenExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kl_kernels
        print(any("falling back to the pure-PyTorch reference" in str(w.message) for w in caught),
              "undefined symbol" in kl_kernels.available_backends()[1].reason)
    """)
    assert warning == "True" and reason == "True"
