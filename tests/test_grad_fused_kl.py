"""Gradients of the fused pass: fp64 gradcheck and agreement with autograd of the float64 formulas."""
import pytest
import torch

import kl_kernels

import truth
from test_fused_kl import make_inputs


def outputs(out):
    return tuple(t for t in out if t is not None and t.requires_grad)


# the "+" forms pair one estimator's value with k2's gradient, so finite differences cannot check
# them; test_grad_matches_formula_autograd does
@pytest.mark.float64_only
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "low_var_kl", "full"])
def test_gradcheck_padded(backend, estimator):
    logits, ref_logits, labels, mask = make_inputs(2, 5, 13, dtype=torch.float64)
    temperature = torch.rand(2, 1, dtype=torch.float64) + 0.5

    def fn(z):
        return outputs(kl_kernels.kl_penalty(z, labels, ref_logits=ref_logits, mask=mask, estimator=estimator,
                                             temperature=temperature, return_entropy=True, backend=backend))

    assert torch.autograd.gradcheck(fn, logits.clone().requires_grad_(True))


@pytest.mark.float64_only
def test_gradcheck_packed_and_token_logprobs(backend):
    logits, ref_logits, labels, mask = make_inputs(1, 12, 9, dtype=torch.float64, packed=True)
    cu_seqlens = torch.tensor([0, 4, 4, 12])

    def fn(z):
        return outputs(kl_kernels.kl_penalty(z, labels, ref_logits=ref_logits, mask=mask, cu_seqlens=cu_seqlens,
                                             estimator="full", temperature=0.8, return_entropy=True, backend=backend))

    assert torch.autograd.gradcheck(fn, logits.clone().requires_grad_(True))

    def fn_logprobs(z):
        return kl_kernels.token_logprobs(z, labels, temperature=1.7, return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(fn_logprobs, logits.clone().requires_grad_(True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["k3", "full", "low_var_kl+"])
def test_grad_matches_formula_autograd(backend, dtype, estimator):
    """Random grad_outputs on every differentiable field (grad_output != 1)."""
    logits, ref_logits, labels, mask = make_inputs(3, 11, 301, dtype=dtype)
    temperature = torch.rand(3, 11) + 0.5
    leaf = logits.clone().requires_grad_(True)
    out = kl_kernels.kl_penalty(leaf, labels, ref_logits=ref_logits, mask=mask, estimator=estimator,
                                temperature=temperature, return_entropy=True, backend=backend)
    ref_leaf = logits.double().requires_grad_(True)
    want = truth.kl_penalty(ref_leaf, labels, ref_logits=ref_logits, mask=mask, estimator=estimator,
                            temperature=temperature)
    weights = {f: torch.randn(getattr(out, f).shape, dtype=torch.float64) for f in
               ("logprobs", "kl", "penalty", "kl_sum", "kl_mean", "entropy")}
    sum(torch.sum(getattr(out, f).double() * w) for f, w in weights.items()).backward()
    sum(torch.sum(want[f] * w) for f, w in weights.items()).backward()
    assert leaf.grad.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **tol)


def test_grad_strided_view_and_inplace(backend):
    base = torch.randn(2, 8, 40)
    labels = torch.randint(0, 40, (2, 7))
    ref_logprobs = -torch.rand(2, 7)

    def grad(inplace):
        leaf = base.clone().requires_grad_(True)
        with torch.no_grad():
            source = leaf * 1.0  # a non-leaf the backward may overwrite
        source.requires_grad_(True)
        view = source[:, :-1]
        out = kl_kernels.kl_penalty(view, labels, ref_logprobs=ref_logprobs, estimator="k2", return_entropy=True,
                                    inplace_backward=inplace, backend=backend)
        (out.kl_sum.sum() + 0.3 * out.entropy.sum()).backward()
        return source, source.grad

    src_copy, grad_copy = grad(False)
    src_inplace, grad_inplace = grad(True)
    torch.testing.assert_close(grad_inplace, grad_copy, rtol=0, atol=0)
    torch.testing.assert_close(src_copy, base)  # the default never touches the logits
    # inplace_backward wrote the gradient into the logits' storage (the rows it covers)
    torch.testing.assert_close(src_inplace[:, :-1], grad_copy[:, :-1], rtol=0, atol=0)


def test_ref_logits_get_no_gradient(backend):
    logits, ref_logits, labels, _ = make_inputs(2, 4, 16)
    ref_leaf = ref_logits.clone().requires_grad_(True)
    out = kl_kernels.kl_penalty(logits.requires_grad_(True), labels, ref_logits=ref_leaf, estimator="full",
                                backend=backend)
    out.kl_sum.sum().backward()
    assert ref_leaf.grad is None and logits.grad is not None
    assert not out.ref_logprobs.requires_grad


def test_kl_coef_tensor_gets_its_gradient(backend):
    """A kl_coef tensor that requires grad (a learned or scheduled coefficient) gets d/d kl_coef of the
    penalty, -sum(g_penalty * kl), as autograd of the formula gives, next to the logits' gradient."""
    logits, ref_logits, labels, mask = make_inputs(2, 7, 41)
    leaf, coef = logits.clone().requires_grad_(True), torch.tensor(0.3, requires_grad=True)
    out = kl_kernels.kl_penalty(leaf, labels, ref_logits=ref_logits, mask=mask, estimator="k3", kl_coef=coef,
                                backend=backend)
    weights = torch.randn(out.penalty.shape)
    (out.penalty * weights).sum().backward()
    ref_leaf, ref_coef = logits.double().requires_grad_(True), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    want = truth.kl_penalty(ref_leaf, labels, ref_logits=ref_logits, mask=mask, estimator="k3", kl_coef=ref_coef)
    (want["penalty"] * weights.double()).sum().backward()
    torch.testing.assert_close(coef.grad.double(), ref_coef.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-4, atol=1e-5)
