"""The registered ops of the kernel backends (cpu: C++, triton): opcheck, torch.compile of the public
functions, 64-bit offsets, agreement with the reference."""
import os

import pytest
import torch
from torch.library import opcheck

import kl_kernels

import truth
from conftest import BACKENDS_UNDER_TEST, GPU_BACKENDS
from kl_kernels.dispatch import BACKENDS


def info(name):
    return {b.name: b for b in kl_kernels.available_backends()}[name]


def cpu_available():
    return info("cpu")


def test_cpu_backend_is_built():
    """CI must exercise the C++ kernel, not silently skip it."""
    if os.environ.get("KL_KERNELS_NO_EXTENSION") == "1":
        pytest.skip("installed without the extension on purpose")
    assert cpu_available().available, cpu_available().reason


def test_triton_backend_is_available():
    """CI installs triton (the test extra) and runs its kernels in the interpreter."""
    assert info("triton").available, info("triton").reason


needs_cpu = pytest.mark.skipif(not cpu_available().available, reason=str(cpu_available().reason))
# the cuda kernels need a GPU to run, even where they are built
KERNEL_BACKENDS = [name for name in BACKENDS_UNDER_TEST if BACKENDS[name].is_kernel]


def on_device(backend):
    """Tensors of a GPU backend live on CUDA when there is a GPU (else: triton interpreted on CPU)."""
    return "cuda" if backend in GPU_BACKENDS and torch.cuda.is_available() else "cpu"


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    logits, ref_logits = torch.randn(2, 5, 37).to(dtype), torch.randn(2, 5, 37).to(dtype)
    labels = torch.randint(0, 37, (10,))
    labels[3] = -100
    temperature = torch.rand(10, dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
    fwd = torch.ops.kl_kernels.fused_kl_fwd
    opcheck(fwd.default, (logits, labels, ref_logits, temperature, 1.0, -100, 5, 50, True, True))
    opcheck(fwd.default, (logits[:, :-1], labels[:8].clone(), None, None, 0.7, -100, 0, 37, False, False))
    logp, _, entropy, full, lse, ref_lse = fwd(logits, labels, ref_logits, temperature, 1.0, -100, 5, 50, True, True)
    grads = [torch.randn_like(logp) for _ in range(3)]
    args = (*grads, logits, labels, ref_logits, temperature, 1.0, -100, 5, 50, lse, ref_lse, entropy, full)
    opcheck(torch.ops.kl_kernels.fused_kl_bwd.default, args)
    opcheck(torch.ops.kl_kernels.fused_kl_bwd_.default, (*grads, logits.clone(), *args[4:]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    device = on_device(backend)
    logits, ref_logits = torch.randn(2, 7, 50, device=device), torch.randn(2, 7, 50, device=device)
    labels, mask = torch.randint(0, 50, (2, 7), device=device), torch.rand(2, 7, device=device) > 0.2
    temperature = torch.rand(2, 7, device=device) + 0.5

    def loss(z):
        out = kl_kernels.kl_penalty(z, labels, ref_logits=ref_logits, mask=mask, estimator="full", return_entropy=True,
                                    temperature=0.9, validate=False, backend=backend)
        logp = kl_kernels.token_logprobs(z, labels, temperature=temperature, validate=False, backend=backend)
        return out.kl_mean.sum() + 0.1 * out.entropy.sum() + logp.sum()

    eager_leaf, compiled_leaf = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    eager = loss(eager_leaf)
    compiled = torch.compile(loss, fullgraph=True)(compiled_leaf)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


@needs_cpu
@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """N * V > 2^31: rows past the 32-bit limit must be read and written where they are."""
    V, N = 65536, 32800  # 2.15e9 elements, 4.3 GB of bf16
    assert N * V > 2**31
    logits = torch.empty(N, V, dtype=torch.bfloat16).normal_()
    labels = torch.randint(0, V, (N,))
    tail = slice(N - 3, N)
    logits.requires_grad_(True)
    logp = kl_kernels.token_logprobs(logits, labels, backend="cpu")
    temp = truth.per_token_temperature(1.0, (3,))
    want, _, _ = truth.row_stats(logits.detach()[tail], labels[tail], temp)
    torch.testing.assert_close(logp[tail].double(), want, rtol=2e-5, atol=2e-5)
    weights = torch.zeros(N)
    weights[-1] = 1.0
    (logp * weights).sum().backward()
    row = logits.detach()[-1].double()
    expected = -torch.softmax(row, -1)
    expected[labels[-1]] += 1
    torch.testing.assert_close(logits.grad[-1].double(), expected, rtol=2e-2, atol=1e-4)
    assert (logits.grad[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_matches_reference(backend, dtype):
    """A kernel backend against the pure-PyTorch truth on one random configuration of every option."""
    device = on_device(backend)
    logits = (torch.randn(3, 17, 3001, device=device) * 3).to(dtype)
    ref_logits = (logits.float() + torch.randn(3, 17, 3001, device=device) * 0.5).to(dtype)
    labels = torch.randint(0, 3001, (3, 17), device=device)
    labels[0, :4] = -100
    kwargs = dict(ref_logits=ref_logits, mask=torch.rand(3, 17, device=device) > 0.2, estimator="full",
                  return_entropy=True, temperature=torch.rand(3, 1, device=device) + 0.5, kl_clamp=5.0)
    grads = {}
    outs = {}
    for name in ("reference", backend):
        leaf = logits.clone().requires_grad_(True)
        outs[name] = kl_kernels.kl_penalty(leaf, labels, backend=name, **kwargs)
        (outs[name].kl_mean.sum() + outs[name].entropy.sum() + outs[name].logprobs.sum()).backward()
        grads[name] = leaf.grad
    for field in outs[backend]._fields:
        torch.testing.assert_close(getattr(outs[backend], field), getattr(outs["reference"], field),
                                   rtol=2e-5, atol=2e-5, msg=field)
    # one bf16/fp16 rounding step of the gradient apart at most
    torch.testing.assert_close(grads[backend].float(), grads["reference"].float(), rtol=1e-2, atol=1e-6)


@pytest.mark.skipif(not info("triton").available, reason=str(info("triton").reason))
def test_triton_ops_opcheck():
    device = on_device("triton")
    logits = torch.randn(2, 5, 37, device=device)
    ref_logits = torch.randn(2, 5, 37, device=device).to(torch.bfloat16)
    labels = torch.randint(0, 37, (10,), device=device)
    labels[3] = -100
    temperature = torch.rand(10, device=device) + 0.5
    fwd = torch.ops.kl_kernels.triton_fused_kl_fwd
    opcheck(fwd.default, (logits, labels, ref_logits, temperature, 1.0, -100, 5, 50, True, True))
    opcheck(fwd.default, (logits[:, :-1], labels[:8].clone(), None, None, 0.7, -100, 0, 37, False, False))
    logp, _, entropy, full, lse, ref_lse = fwd(logits, labels, ref_logits, temperature, 1.0, -100, 5, 50, True, True)
    grads = [torch.randn_like(logp) for _ in range(3)]
    args = (*grads, logits, labels, ref_logits, temperature, 1.0, -100, 5, 50, lse, ref_lse, entropy, full)
    opcheck(torch.ops.kl_kernels.triton_fused_kl_bwd.default, args)
    opcheck(torch.ops.kl_kernels.triton_fused_kl_bwd_.default, (*grads, logits.clone(), *args[4:]))


@pytest.mark.skipif(not info("triton").available, reason=str(info("triton").reason))
def test_triton_rows_past_2_pow_31_elements():
    """Row offsets past 2^31 elements (int64 arithmetic), read and written in place: three rows
    2^30 elements apart in a 4 GiB fp16 buffer that is never touched elsewhere (no real memory)."""
    V = 1000
    base = torch.empty(2**31 + V, dtype=torch.float16, device=on_device("triton"))
    view = base.as_strided((1, 3, V), (0, 2**30, 1))
    view.copy_(torch.randn(1, 3, V))
    labels = torch.randint(0, V, (1, 3), device=view.device)
    want = torch.log_softmax(view.double(), -1)
    expected_grad = -want.exp()
    expected_grad.scatter_add_(-1, labels.unsqueeze(-1), torch.ones(1, 3, 1, dtype=torch.float64, device=view.device))
    for inplace in (False, True):
        leaf = view.detach().requires_grad_(True)  # a leaf view of the buffer, rows 2^30 apart
        logp = kl_kernels.token_logprobs(leaf, labels, inplace_backward=inplace, backend="triton")
        torch.testing.assert_close(logp.double(), want.gather(-1, labels.unsqueeze(-1)).squeeze(-1),
                                   rtol=2e-5, atol=2e-5)
        logp.sum().backward()
        torch.testing.assert_close(leaf.grad.double(), expected_grad, rtol=1e-2, atol=1e-3)
    # the in-place backward wrote the gradient over the logits, at their offsets past 2^31
    torch.testing.assert_close(view.double(), expected_grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", [name for name in KERNEL_BACKENDS if torch.float64 not in BACKENDS[name].dtypes])
def test_float64_is_refused(backend):
    logits = torch.randn(2, 3, 11, dtype=torch.float64, device=on_device(backend))
    labels = torch.randint(0, 11, (2, 3), device=logits.device)
    with pytest.raises(RuntimeError, match="float64"):
        kl_kernels.token_logprobs(logits, labels, backend=backend)


@pytest.mark.requires_cuda
@pytest.mark.skipif(not (info("cuda").available and info("triton").available), reason="needs the cuda and triton backends")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [1271, 32000, 151936])
def test_cuda_matches_triton(dtype, vocab):
    """The two GPU backends on the same inputs: same values to float32 rounding, gradients within
    one rounding step of the logits' dtype."""
    logits = (torch.randn(2, 33, vocab, device="cuda") * 3).to(dtype)
    ref_logits = (logits.float() + torch.randn_like(logits, dtype=torch.float32) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (2, 33), device="cuda")
    labels[1, :3] = -100
    kwargs = dict(ref_logits=ref_logits, mask=torch.rand(2, 33, device="cuda") > 0.2, estimator="full",
                  return_entropy=True, temperature=0.7)
    outs, grads = {}, {}
    for name in ("triton", "cuda"):
        leaf = logits.clone().requires_grad_(True)
        outs[name] = kl_kernels.kl_penalty(leaf, labels, backend=name, **kwargs)
        (outs[name].kl_mean.sum() + outs[name].entropy.sum() + outs[name].logprobs.sum()).backward()
        grads[name] = leaf.grad
    for field in outs["cuda"]._fields:
        torch.testing.assert_close(getattr(outs["cuda"], field), getattr(outs["triton"], field), rtol=2e-5,
                                   atol=2e-5, msg=field)
    torch.testing.assert_close(grads["cuda"].float(), grads["triton"].float(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("name", [info.name for info in kl_kernels.available_backends() if info.available])
def test_every_backend_implements_the_kernel_contract(name):
    """contract.FusedPass: the same two functions on the same records, for every backend."""
    import inspect

    from kl_kernels.contract import FusedPass, OnePass
    from kl_kernels.dispatch import BACKENDS

    impl = BACKENDS[name].impl
    assert isinstance(impl, FusedPass)
    assert list(inspect.signature(impl.fused_kl_fwd).parameters) == ["args", "need_entropy", "need_full"]
    assert list(inspect.signature(impl.fused_kl_bwd).parameters) == ["args", "stats", "grads", "inplace"]
    if BACKENDS[name].is_kernel:  # kl_penalty in one pass: every kernel backend
        assert isinstance(impl, OnePass)
        assert list(inspect.signature(impl.kl_penalty_fwd).parameters) == ["args", "penalty", "need_entropy"]
        assert list(inspect.signature(impl.kl_penalty_bwd).parameters) == ["args", "penalty", "stats", "grads",
                                                                           "inplace"]


def _penalty_op_args(device, dtype, packed, given_ref):
    """Arguments of the one-pass ops (csrc/registration.cpp): k3 with both clamps, a float mask, a
    kl_coef tensor, a per-row temperature; padded [2, 5] or packed [10] with cu_seqlens."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shape = (1, 10, 37) if packed else (2, 5, 37)
    logits = torch.randn(*shape, device=device).to(dtype)
    ref_logits = None if given_ref else torch.randn(*shape, device=device).to(dtype)
    ref_logprobs = -torch.rand(10, device=device) * 5 if given_ref else None
    labels = torch.randint(0, 37, (10,), device=device)
    labels[3] = -100
    mask = (torch.rand(10, device=device) > 0.3).float()
    cu_seqlens = torch.tensor([0, 4, 4, 10], dtype=torch.int32, device=device) if packed else None
    temperature = torch.rand(10, device=device, dtype=acc) + 0.5
    kl_coef = torch.tensor(0.2, device=device, dtype=acc)
    return (logits, labels, ref_logits, ref_logprobs, mask, cu_seqlens, temperature, 1.0, -100,
            3, False, 20.0, 10.0, kl_coef, 1.0, not packed, True)


def _opcheck_penalty_ops(fwd, bwd, bwd_inplace, device, dtype, packed, given_ref):
    args = _penalty_op_args(device, dtype, packed, given_ref)
    opcheck(fwd.default, args)
    out = fwd(*args)
    logp, ref_logp, kl, penalty, kl_sum, kl_mean, counts, sequence, entropy, full_kl, lse, ref_lse = out
    grads = [torch.randn_like(t) for t in (logp, kl, penalty, kl_sum, kl_mean, entropy)]
    logits, labels, ref_logits, _, mask, _, temperature = args[:7]
    rest = (labels, ref_logits, mask, temperature, *args[7:15], logp, ref_logp, counts, sequence, lse, ref_lse,
            entropy, full_kl)
    opcheck(bwd.default, (*grads, logits, *rest))
    opcheck(bwd_inplace.default, (*grads, logits.clone(), *rest))


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("packed,given_ref", [(False, False), (True, True)])
def test_penalty_ops_opcheck(dtype, packed, given_ref):
    ops = torch.ops.kl_kernels
    _opcheck_penalty_ops(ops.kl_penalty_fwd, ops.kl_penalty_bwd, ops.kl_penalty_bwd_, "cpu", dtype, packed, given_ref)


@pytest.mark.skipif(not info("triton").available, reason=str(info("triton").reason))
@pytest.mark.parametrize("packed,given_ref", [(False, False), (True, True)])
def test_triton_penalty_ops_opcheck(packed, given_ref):
    ops = torch.ops.kl_kernels
    _opcheck_penalty_ops(ops.triton_kl_penalty_fwd, ops.triton_kl_penalty_bwd, ops.triton_kl_penalty_bwd_,
                         on_device("triton"), torch.float32, packed, given_ref)


def _testing_ops():
    """The test-only ops (csrc/tools/testing.cpp), from the build of the CPU kernels' instruction set."""
    import importlib.util

    from kl_kernels.backends.extension import CPU_ISA

    spec = importlib.util.find_spec(f"kl_kernels.tools._testing_{CPU_ISA}")
    assert spec is not None and spec.origin, f"kl_kernels.tools._testing_{CPU_ISA} was not built"
    torch.ops.load_library(spec.origin)
    return torch.ops.kl_kernels_testing


@needs_cpu
def test_the_shipped_extension_registers_the_library_ops_only():
    """kl_kernels._C and the CPU kernels register the library's ops; kl-bench's allocation counter and
    the test-only ops live in the tools' own libraries (issue 34)."""
    from kl_kernels import _C

    assert not any(hasattr(_C, name) for name in ("track_cpu_memory", "cpu_memory_stats"))
    # the C++ schemas (the Triton backend registers its own ops, kl_kernels::triton_*, from Python)
    schemas = {s.name for s in torch._C._jit_get_all_schemas()
               if s.name.startswith("kl_kernels::") and not s.name.startswith("kl_kernels::triton_")}
    assert schemas == {f"kl_kernels::{op}" for op in (
        "fused_kl_fwd", "fused_kl_bwd", "fused_kl_bwd_", "kl_penalty_fwd", "kl_penalty_bwd", "kl_penalty_bwd_",
        "kept_counts", "empty_cpu_cache")}, schemas


@needs_cpu
def test_cpu_kernels_exp2_is_within_two_ulp():
    """The CPU kernels' 2^y (csrc/cpu/fused_kl.cpp softmax_exp2: every softmax term is a power of two
    there) against float64 2^y: a float32 of every 997th bit pattern over [-151, 0] and [0, 1] (~1.2
    million), and the ends: -inf is exactly 0 (a banned token adds nothing), NaN stays NaN, results
    below float32's normal range within 2 of their spacing. The AVX-512 build has its own 2^y (2 ulp);
    the AVX2 build runs the same polynomial but flushes results below 2^-126 to 0 (no vscalefps).
    ATEN_CPU_CAPABILITY=avx2 runs this test on the AVX2 build."""
    from kl_kernels.backends.extension import CPU_ISA
    ops = _testing_ops()
    negative = torch.arange(0x80000000, 0xC3170001, 997, dtype=torch.int64)  # -0.0 ... -151.0
    positive = torch.arange(0, 0x3F800001, 997, dtype=torch.int64)  # 0.0 ... 1.0
    bits = torch.cat([negative, positive, torch.tensor([0xC3170000, 0x3F800000, 0x80000000, 0xBF000000])])
    y = bits.to(torch.int32).view(torch.float32)  # wraps to the same 32 bits
    got = ops.softmax_exp2(y).double()
    want = torch.exp2(y.double())
    spacing = (torch.nextafter(want.float(), torch.tensor(float("inf"))) - want.float()).double()
    normal = want >= torch.finfo(torch.float32).tiny
    ulps = ((got - want).abs() / spacing)[normal]
    assert ulps.max() <= 2.0, (ulps.max().item(), y[normal][ulps.argmax()].item())
    below = 2.0 ** -126 if CPU_ISA == "avx2" else 2 * 2.0 ** -149  # a flushed term, or 2 denormal spacings
    assert ((got - want).abs()[~normal] <= below).all()
    specials = ops.softmax_exp2(
        torch.tensor([float("-inf"), float("nan"), -0.0, 0.0, -200.0, -150.6, 128.0]))
    assert specials[0] == 0 and torch.isnan(specials[1]) and specials[2] == 1 and specials[3] == 1
    assert specials[4] == 0 and specials[5] == 0 and specials[6] == float("inf")


def test_every_compiled_backend_takes_its_inputs_through_one_adapter():
    """Issue 27: the [N] inputs reach every compiled op (C++ CPU, CUDA, Triton) in one dtype and layout,
    made by backends/adapter.py before any op runs: temperature and given reference log-probs contiguous
    in the compute dtype, upstream gradients in the compute dtype with their strides, the mask contiguous
    (any real dtype), cu_seqlens contiguous int32/int64.
    The CUDA glue accepts only these (a bf16 ref_logprobs, an int16 cu_seqlens or a strided mask was a
    TORCH_CHECK failure there), so the CPU tests run exactly what the CUDA glue receives."""
    from kl_kernels.backends import adapter
    from kl_kernels.contract import PassArgs, PenaltyArgs, PenaltyGrads, whole
    from kl_kernels.dispatch import BACKENDS
    from kl_kernels.estimators import parse_estimator

    for name in ("cpu", "triton", "cuda"):
        impl = BACKENDS[name].impl
        if impl is None:
            continue
        for function in ("fused_kl_fwd", "fused_kl_bwd", "kl_penalty_fwd", "kl_penalty_bwd"):
            made_by = getattr(impl, function).__qualname__.split(".")[0]
            assert made_by in ("op_backend", "penalty_op_backend"), (name, function, made_by)
            assert getattr(impl, function).__module__ == adapter.__name__

    seen = []

    def recorder(op):
        """An op stand-in that records its arguments in the op's schema order (the adapter calls by name)."""
        names = [argument.name for argument in op.default._schema.arguments]

        def record(**kwargs):
            assert set(kwargs) == set(names), set(kwargs) ^ set(names)
            seen.append(tuple(kwargs[name] for name in names))
            return tuple(torch.empty(0) for _ in range(12))
        return record

    ops = torch.ops.kl_kernels
    fwd, bwd = adapter.penalty_op_backend(recorder(ops.kl_penalty_fwd), recorder(ops.kl_penalty_bwd),
                                          recorder(ops.kl_penalty_bwd_))
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16)
    temperature = torch.rand(12, dtype=torch.float64)[::2] + 0.5  # strided, float64
    args = PassArgs(logits, torch.zeros(6, dtype=torch.long), None, temperature, -100, whole(7))
    mask = torch.tensor([1, 5, 0, 5, 2, 5, 0, 5, 7, 5, 7, 5], dtype=torch.int8)[::2]  # strided int8: 1 0 2 0 7 7
    penalty = PenaltyArgs(parse_estimator("k3"), torch.randn(6, dtype=torch.bfloat16), mask, False,
                          torch.tensor([0, 4, 6], dtype=torch.int16), torch.tensor(0.1, dtype=torch.float64))
    fwd(args, penalty, True)
    grads = PenaltyGrads(torch.randn(12)[::2], None, None, torch.randn(2, dtype=torch.float64), None, None)
    bwd(args, penalty, adapter.PenaltyStats(*(torch.empty(6) for _ in range(12))), grads, False)
    forward, backward = seen
    ref_logprobs, op_mask, cu_seqlens, op_temperature, kl_coef = forward[3], forward[4], forward[5], forward[6], \
        forward[13]
    for tensor, dtype in ((ref_logprobs, torch.float32), (op_mask, torch.int8), (cu_seqlens, torch.int64),
                          (op_temperature, torch.float32), (kl_coef, torch.float32), (backward[9], torch.int8)):
        assert tensor.dtype == dtype and tensor.is_contiguous(), (tensor.dtype, dtype)
    # upstream gradients (issue 34): in the compute dtype, with the strides autograd gave them (no copy: the
    # kernels index them by stride, so a loss of sums is one op backward)
    assert backward[0].dtype == torch.float32 and backward[0].stride() == (2,)
    assert backward[3].dtype == torch.float32 and backward[3].is_contiguous()  # converted from float64
    assert op_mask.tolist() == [1, 0, 2, 0, 7, 7] and cu_seqlens.tolist() == [0, 4, 6]
    torch.testing.assert_close(op_temperature, temperature.float())


def test_the_triton_ops_take_the_cpp_schemas_names():
    """The adapter calls every op by its argument names (issue 34: one named record per op): the Triton ops'
    signatures carry csrc/registration.cpp's names, in its order."""
    pytest.importorskip("triton")
    import kl_kernels.backends.triton.fused_kl  # noqa: F401 - registers the Triton ops

    ops = torch.ops.kl_kernels
    for name in ("fused_kl_fwd", "fused_kl_bwd", "fused_kl_bwd_", "kl_penalty_fwd", "kl_penalty_bwd",
                 "kl_penalty_bwd_"):
        names = lambda op: [argument.name for argument in op.default._schema.arguments]  # noqa: E731
        assert names(getattr(ops, name)) == names(getattr(ops, f"triton_{name}")), name
