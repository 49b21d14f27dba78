"""The registered C++ ops: opcheck, torch.compile of the public functions, 64-bit offsets."""
import os

import pytest
import torch
from torch.library import opcheck

import kl_kernels

import truth


def cpu_available():
    return {b.name: b for b in kl_kernels.available_backends()}["cpu"]


def test_cpu_backend_is_built():
    """CI must exercise the C++ kernel, not silently skip it."""
    if os.environ.get("KL_KERNELS_NO_EXTENSION") == "1":
        pytest.skip("installed without the extension on purpose")
    assert cpu_available().available, cpu_available().reason


needs_cpu = pytest.mark.skipif(not cpu_available().available, reason=str(cpu_available().reason))


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    logits, ref_logits = torch.randn(2, 5, 37).to(dtype), torch.randn(2, 5, 37).to(dtype)
    labels = torch.randint(0, 37, (10,))
    labels[3] = -100
    temperature = torch.rand(10, dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
    fwd = torch.ops.kl_kernels.fused_kl_fwd
    opcheck(fwd.default, (logits, labels, ref_logits, temperature, 1.0, -100, True, True))
    opcheck(fwd.default, (logits[:, :-1], labels[:8].clone(), None, None, 0.7, -100, False, False))
    logp, _, entropy, full, lse, ref_lse = fwd(logits, labels, ref_logits, temperature, 1.0, -100, True, True)
    grads = [torch.randn_like(logp) for _ in range(3)]
    args = (*grads, logits, labels, ref_logits, temperature, 1.0, -100, lse, ref_lse, entropy, full)
    opcheck(torch.ops.kl_kernels.fused_kl_bwd.default, args)
    opcheck(torch.ops.kl_kernels.fused_kl_bwd_.default, (*grads, logits.clone(), *args[4:]))


@needs_cpu
def test_torch_compile_fullgraph():
    logits, ref_logits = torch.randn(2, 7, 50), torch.randn(2, 7, 50)
    labels, mask = torch.randint(0, 50, (2, 7)), torch.rand(2, 7) > 0.2

    def loss(z):
        out = kl_kernels.kl_penalty(z, labels, ref_logits=ref_logits, mask=mask, estimator="full", return_entropy=True,
                                    temperature=0.9, validate=False, backend="cpu")
        logp = kl_kernels.token_logprobs(z, labels, validate=False, backend="cpu")
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


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_reference(dtype):
    """The C++ kernel against the pure-PyTorch truth on one random configuration of every option."""
    logits = (torch.randn(3, 17, 3001) * 3).to(dtype)
    ref_logits = (logits.float() + torch.randn(3, 17, 3001) * 0.5).to(dtype)
    labels = torch.randint(0, 3001, (3, 17))
    labels[0, :4] = -100
    kwargs = dict(ref_logits=ref_logits, mask=torch.rand(3, 17) > 0.2, estimator="full", return_entropy=True,
                  temperature=torch.rand(3, 1) + 0.5, kl_clamp=5.0)
    grads = {}
    outs = {}
    for backend in ("reference", "cpu"):
        leaf = logits.clone().requires_grad_(True)
        outs[backend] = kl_kernels.kl_penalty(leaf, labels, backend=backend, **kwargs)
        (outs[backend].kl_mean.sum() + outs[backend].entropy.sum() + outs[backend].logprobs.sum()).backward()
        grads[backend] = leaf.grad
    for field in outs["cpu"]._fields:
        torch.testing.assert_close(getattr(outs["cpu"], field), getattr(outs["reference"], field),
                                   rtol=2e-5, atol=2e-5, msg=field)
    torch.testing.assert_close(grads["cpu"].float(), grads["reference"].float(), rtol=1e-2, atol=1e-6)
