"""kl_from_logprobs: every sampled-token estimator and clamp against float64 formulas."""
import math

import pytest
import torch

import kl_kernels

import truth
from conftest import BACKENDS_UNDER_TEST, GPU_BACKENDS

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


# ---- The kernels' estimator (csrc/fused_kl_math.h for cpu and cuda, _estimate in the Triton kernels)
# against estimators.py in float64, at chosen log-ratios r = log(q/p): zero, tiny, the clamps'
# bounds exactly, beyond them, where k3's exp overflows in float32, +-inf and NaN. Value and slope
# depend on r alone, so each is read from a row where r is exact: the value from a row whose label
# log-prob is exactly 0 (one finite logit) with ref_logprobs = r; the slope d kl / d logp from the
# one-pass backward op, given logp and ref_logp directly, on a two-column row of equal logits
# (p = 1/2 each): the gradient at the other column is -slope / 2 (at the label column an infinite
# slope meets its own -p term: inf - inf).

ONE_PASS_OPS = {"cpu": ("kl_penalty_fwd", "kl_penalty_bwd"), "cuda": ("kl_penalty_fwd", "kl_penalty_bwd"),
                "triton": ("triton_kl_penalty_fwd", "triton_kl_penalty_bwd")}
LOG_RATIOS = [0.0, 1e-8, -1e-8, 0.5, -0.5, 3.0, -7.25, 19.5, 20.0, -20.0, 20.5, 30.0, 88.75, 100.0,
              math.inf, -math.inf, math.nan]
CLAMPS = [(None, None), (20.0, None), (None, 10.0), (20.0, 10.0)]


def _kernel_value_and_slope(backend, estimator, clamps, r):
    from kl_kernels.estimators import ESTIMATOR_CODES, parse_estimator
    fwd, bwd = (getattr(torch.ops.kl_kernels, name) for name in ONE_PASS_OPS[backend])
    est = parse_estimator(estimator, *clamps)
    n = r.numel()
    spec = (ESTIMATOR_CODES[est.name], est.straight_through, est.log_ratio_clamp, est.kl_clamp)
    logits = torch.full((1, n, 3), -math.inf)
    logits[..., 0] = 1.5  # log p(label 0) = 0 exactly
    labels = torch.zeros(n, dtype=torch.long)
    out = fwd(logits, labels, None, r, None, None, None, 1.0, -100, *spec, None, 0.1, True, False)
    value = out[2]
    logp = torch.full((n,), -2.0)
    grad = bwd(None, torch.ones(n), None, None, None, None, torch.zeros(1, n, 2), labels, None, None, None, 1.0,
               -100, *spec, None, 0.1, logp, logp + r, torch.ones(1), torch.zeros(n, dtype=torch.int32),
               torch.full((n,), math.log(2.0)), None, None, None)
    return value, -2 * grad[0, :, 1], logp


@pytest.mark.parametrize("backend", [name for name in ONE_PASS_OPS if name in BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("estimator", NAMES)
@pytest.mark.parametrize("clamps", CLAMPS)
def test_kernel_estimators_match_estimators_py(backend, estimator, clamps):
    from kl_kernels.estimators import estimate, parse_estimator
    on_gpu = backend in GPU_BACKENDS and torch.cuda.is_available()  # else triton runs interpreted on CPU tensors
    with torch.device("cuda" if on_gpu else "cpu"):
        r = torch.tensor(LOG_RATIOS, dtype=torch.float32)
        value, slope, logp = _kernel_value_and_slope(backend, estimator, clamps, r)
    r, value, slope, logp = r.cpu(), value.cpu(), slope.cpu(), logp.cpu()
    est = parse_estimator(estimator, *clamps)
    # the truth in float64 from the same float32 inputs, rounded to float32 (an overflow is inf there too)
    lp = torch.zeros(r.numel(), dtype=torch.float64, requires_grad=True)
    want = estimate(est, lp, r.double())
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(value, want.detach().float(), rtol=4e-6, atol=1e-12, equal_nan=True)
    lp = logp.double().requires_grad_(True)
    slope_want = torch.autograd.grad(estimate(est, lp, (logp + r).double()).sum(), lp)[0].float()
    # the float64 autograd truth writes e^r - 1 as (e^r) - 1: nothing lost beyond float32 rounding
    torch.testing.assert_close(slope, slope_want, rtol=4e-6, atol=1e-12, equal_nan=True)
