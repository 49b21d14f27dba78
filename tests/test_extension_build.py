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


def test_an_isolated_build_stops_at_once_naming_the_command(tmp_path):
    """Issue 38: pip's build isolation has no torch (pyproject.toml does not ask for one, so pip never
    fetches another torch to compile against and pin over the user's); setup.py then stops at once with
    one line naming the command that builds against the installed torch."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no torch in an isolated build')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert done.returncode != 0
    assert "pip install --no-build-isolation ." in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    with open(os.path.join(root, "pyproject.toml")) as f:
        requires = next(line for line in f if line.startswith("requires"))
    assert "torch" not in requires


def test_the_cuda_build_needs_a_cuda_torch_and_a_runtime_to_link(tmp_path, monkeypatch):
    import importlib.util as util
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("KL_KERNELS_NO_EXTENSION", "1")  # import setup.py's functions without building
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kl_kernels").mkdir()
    spec = util.spec_from_file_location("kl_setup", os.path.join(root, "setup.py"))
    setup_module = util.module_from_spec(spec)
    monkeypatch.setattr("setuptools.setup", lambda **kwargs: None)
    spec.loader.exec_module(setup_module)
    cpu_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda=None), __version__="2.13.0+cpu")
    cuda_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda="13.0"), __version__="2.14.1")
    assert setup_module.cuda_toolkit(cpu_torch, "/usr/local/cuda") == (False, "torch 2.13.0+cpu is a CPU build")
    assert not setup_module.cuda_toolkit(cuda_torch, None)[0]
    assert "libcudart" in setup_module.cuda_toolkit(cuda_torch, str(tmp_path))[1]  # an nvcc alone is not a toolkit
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so").write_text("")
    assert setup_module.cuda_toolkit(cuda_torch, str(tmp_path)) == (True, None)
