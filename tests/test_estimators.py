"""kl_from_logprobs: every sampled-token estimator and clamp against float64 formulas."""
import math

import pytest
import torch

import kl_kernels

import truth

NAMES = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "kl+", "abs+", "k2+", "mse+", "k3+", "low_var_kl+"]


@pytest.mark.parametrize("estimator", NAMES)
@pytest.mark.parametrize("clamps", [(None, None), (0.7, None), (None, 0.4), (30.0, 2.0)])
def test_values_and_gradients(estimator, clamps):
    logprobs = (-torch.rand(4, 9, dtype=torch.float64) * 6).requires_grad_(True)
    ref_logprobs = (-torch.rand(4, 9, dtype=torch.float64) * 6).requires_grad_(True)
    logprobs.data[0, 0], ref_logprobs.data[0, 0] = -1.0, -25.0  # hits the low_var_kl log-ratio clamp
    got = kl_kernels.kl_from_logprobs(logprobs, ref_logprobs, estimator=estimator,
                                      log_ratio_clamp=clamps[0], kl_clamp=clamps[1])
    lp, rlp = logprobs.detach().clone().requires_grad_(True), ref_logprobs.detach().clone().requires_grad_(True)
    want = truth.estimator_value(estimator, lp, rlp, *clamps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn(4, 9, dtype=torch.float64)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(logprobs.grad, lp.grad)
    torch.testing.assert_close(ref_logprobs.grad, rlp.grad)


def test_hand_values():
    lp, rlp = torch.tensor([-1.0]), torch.tensor([-1.5])
    d = 0.5
    expected = {"k1": d, "abs": d, "k2": d * d / 2, "k3": math.exp(-d) + d - 1}
    for name, value in expected.items():
        assert kl_kernels.kl_from_logprobs(lp, rlp, estimator=name).item() == pytest.approx(value, rel=1e-6)
    # low_var_kl: log-ratio clamped to 20, estimate clamped to 10 (verl)
    far = kl_kernels.kl_from_logprobs(torch.tensor([-1.0]), torch.tensor([-40.0]), estimator="low_var_kl")
    assert far.item() == 10.0
    # k3 keeps its digits for tiny log-ratios (expm1), where exp(r) - r - 1 cancels to 0
    tiny = kl_kernels.kl_from_logprobs(torch.tensor([0.0], dtype=torch.float64),
                                       torch.tensor([1e-9], dtype=torch.float64), estimator="k3")
    assert tiny.item() == pytest.approx(0.5e-18, rel=1e-6)


def test_straight_through_gradient_is_k2():
    lp = torch.tensor([-2.0, -0.5], dtype=torch.float64, requires_grad=True)
    rlp = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    out = kl_kernels.kl_from_logprobs(lp, rlp, estimator="low_var_kl+", kl_clamp=0.1)
    assert out.max().item() <= 0.1  # clamped value
    out.sum().backward()
    torch.testing.assert_close(lp.grad, lp.detach() - rlp)  # d(k2)/d logp = d


def test_clamped_value_has_zero_gradient():
    lp = torch.tensor([-1.0, -1.0], requires_grad=True)
    rlp = torch.tensor([-1.1, -9.0])
    kl_kernels.kl_from_logprobs(lp, rlp, estimator="k2", kl_clamp=1.0).sum().backward()
    assert lp.grad[0] != 0 and lp.grad[1] == 0


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(estimator="full"), ValueError, "full"),
    (dict(estimator="nope"), ValueError, "k3"),
    (dict(estimator="k1", kl_clamp=0.0), ValueError, "kl_clamp"),
    (dict(estimator="k1", log_ratio_clamp=float("nan")), ValueError, "log_ratio_clamp"),
])
def test_bad_input(kwargs, error, words):
    with pytest.raises(error, match=words):
        kl_kernels.kl_from_logprobs(torch.zeros(3), torch.zeros(3), **kwargs)
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_kernels.kl_from_logprobs(torch.zeros(3), torch.zeros(4), estimator="k1")
    with pytest.raises(TypeError, match="logprobs"):
        kl_kernels.kl_from_logprobs(torch.zeros(3, dtype=torch.long), torch.zeros(3), estimator="k1")
