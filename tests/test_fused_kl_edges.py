"""Edge cases a differential fuzz found (issue 13), on every backend, and a seeded fuzz that keeps
them from coming back: no NaN in a gradient whose float64 truth is finite, values against float64.
KL_KERNELS_FUZZ_CASES raises the fuzz's case count (default 40 per backend, under a minute)."""
import math
import os
import random

import pytest
import torch

import kl_kernels
from kl_kernels.estimators import ESTIMATOR_NAMES

SAMPLED = [name for name in ESTIMATOR_NAMES if not name.startswith("full")]


def test_clamped_k3_overflowing_exp_has_zero_gradient(backend):
    """Reverse log-ratio ~ 105 (exp overflows float32), k3 with kl_clamp and a masked row: values
    right, gradient 0 where the clamp is active and where masked, never NaN."""
    z = torch.zeros(1, 2, 8)
    z[0, :, 0] = 100.0
    z.requires_grad_()
    out = kl_kernels.kl_penalty(z, torch.tensor([[1, 1]]), ref_logprobs=torch.tensor([[-5.0, -5.0]]),
                                estimator="k3", kl_clamp=10.0, mask=torch.tensor([[1, 0]]), backend=backend)
    out.kl_sum.sum().backward()
    assert out.kl.tolist() == [[10.0, 0.0]]
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("estimator", ["k2", "k2+", "k1+", "abs+", "k3+", "low_var_kl+", "low_var_kl", "k3"])
def test_poison_under_the_mask_never_reaches_a_gradient(backend, estimator):
    logits = torch.randn(2, 5, 33)
    logits[0, 1] = float("nan")
    logits[1, 3, 4] = float("inf")
    ref_logprobs = -torch.rand(2, 5)
    ref_logprobs[0, 2] = float("inf")
    ref_logprobs[1, 0] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[0, 2] = mask[1, 0] = False
    logits.requires_grad_()
    out = kl_kernels.kl_penalty(logits, torch.randint(0, 33, (2, 5)), ref_logprobs=ref_logprobs, mask=mask,
                                estimator=estimator, backend=backend)
    (out.kl_sum.sum() + out.kl_mean.sum()).backward()
    assert torch.isfinite(out.kl_sum).all()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()


@pytest.mark.parametrize("estimator", [name for name in SAMPLED if name.endswith("+")])
def test_straight_through_value_is_the_named_estimator_at_infinite_log_ratio(estimator):
    logprobs = torch.tensor([0.0, -3.0, -1.0], requires_grad=True)
    ref = torch.tensor([float("inf"), -1.0, -float("inf")])
    value = kl_kernels.kl_from_logprobs(logprobs, ref, estimator=estimator)
    named = kl_kernels.kl_from_logprobs(logprobs.detach(), ref, estimator=estimator[:-1])
    torch.testing.assert_close(value.detach(), named, equal_nan=False)  # exactly the named estimator, no NaN
    value.sum().backward()
    assert torch.equal(logprobs.grad, logprobs.detach() - ref)  # d * grad(logp), infinite where d is


def test_full_backward_skips_the_reference_of_masked_rows(backend):
    """`full` with a masked row whose reference holds NaN (or -inf where the policy has mass), and a
    loss that also uses the log-probs: the masked row's gradient is the log-prob term alone."""
    logits = torch.randn(1, 3, 16, requires_grad=True)
    ref_logits = torch.randn(1, 3, 16)
    ref_logits[0, 1] = float("nan")
    ref_logits[0, 2, :4] = -float("inf")
    mask = torch.tensor([[1, 0, 0]])
    labels = torch.tensor([[1, 2, 3]])
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator="full", backend=backend)
    (out.kl_sum.sum() + out.logprobs.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    log_p = torch.log_softmax(logits.detach().double(), -1)
    expected = torch.nn.functional.one_hot(labels, 16).double() - log_p.exp()  # d logp / dz
    torch.testing.assert_close(logits.grad[0, 1:].double(), expected[0, 1:], atol=1e-6, rtol=1e-5)


def test_inplace_backward_refuses_overlapping_rows(backend):
    logits = torch.randn(1, 1, 17).expand(2, 3, 17)
    with pytest.raises(ValueError, match="inplace_backward"):
        kl_kernels.token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), inplace_backward=True, backend=backend)


def test_empty_input_with_a_strided_vocabulary(backend):
    logits = torch.randn(0, 22)[:, ::2]
    assert kl_kernels.token_logprobs(logits, torch.zeros(0, dtype=torch.long), backend=backend).shape == (0,)
    out = kl_kernels.kl_penalty(logits, torch.zeros(0, dtype=torch.long), ref_logits=logits, backend=backend)
    assert out.kl.shape == (0,) and out.kl_sum.shape == (1,) and out.kl_sum.item() == 0


def test_entropy_of_huge_logits(backend):
    """|z| near float32's limit: the entropy sums stay around the row max (a raw sum of p * z
    overflowed to -inf on cpu), and ties far from 0 keep their digits: H = log(ties) exactly."""
    logits = torch.randn(2, 3, 40)
    logits[0, 0] = 3e37
    logits[0, 0, :25] = -3e37  # 15 tied at the max
    logits[1, 2] = -1e6 * torch.rand(40)
    logits[1, 2, :4] = 2e6  # 4 tied at the max, the rest far below
    labels = torch.randint(0, 40, (2, 3))
    _, entropy = kl_kernels.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    log_p = torch.log_softmax(logits.double(), -1)
    want = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
    want[0, 0], want[1, 2] = math.log(15), math.log(4)
    torch.testing.assert_close(entropy.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_a_later_tile_far_above_the_first(backend, temperature):
    """The CPU forward sums each 1024-logit tile in one pass around the row's running max, and sums a
    tile again around its own when it rises more than 64/T above: rows whose later tiles rise by 5,
    30 and 100 (past the headroom at either T), a first tile of -inf, and a confident label in the
    last tile (log p ~ -1e-12: its digits survive only if the sums end around the true max). Values,
    entropy, the exact KL and the gradient of all three against float64."""
    torch.manual_seed(0)
    V = 3000
    logits = torch.randn(1, 6, V)
    for row, rise in enumerate([5.0, 30.0, 100.0]):
        logits[0, row, 2100:2600] += rise
    logits[0, 3, :1024] = float("-inf")
    logits[0, 4, 2999] = 40.0 / temperature  # p ~ 1 - 1e-12 once divided by T
    logits[0, 5, 1500] = 1e4  # every other term underflows: p = 1 exactly
    labels = torch.randint(0, V, (1, 6))
    labels[0, 4], labels[0, 5] = 2999, 1500
    ref_logits = logits + 0.3 * torch.randn_like(logits)
    ref_logits[0, 3, :1024] = float("-inf")
    out = kl_kernels.kl_penalty(logits.requires_grad_(), labels, ref_logits=ref_logits, estimator="full",
                                temperature=temperature, return_entropy=True, backend=backend)
    (out.logprobs.sum() + out.entropy.sum() + out.kl.sum()).backward()
    x = logits.detach().double().requires_grad_()
    log_p = torch.log_softmax(x / temperature, -1)
    log_q = torch.log_softmax(ref_logits.double() / temperature, -1)
    banned = torch.isinf(x.detach())  # 0 * -inf terms are 0 (and have no gradient)
    log_p0, log_q0 = log_p.masked_fill(banned, 0.0), log_q.masked_fill(banned, 0.0)
    truth = {"logprobs": log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1),
             "entropy": -(log_p0.exp().masked_fill(banned, 0.0) * log_p0).sum(-1),
             "kl": (log_p0.exp().masked_fill(banned, 0.0) * (log_p0 - log_q0)).sum(-1)}
    (truth["logprobs"].sum() + truth["entropy"].sum() + truth["kl"].sum()).backward()
    for name in ("logprobs", "entropy", "kl"):
        torch.testing.assert_close(getattr(out, name).double(), truth[name], atol=2e-5, rtol=1e-5,
                                   msg=lambda detail: f"{name}: {detail}")
    assert abs(out.logprobs[0, 4].item() - truth["logprobs"][0, 4].item()) < 1e-9  # the confident label's digits
    assert out.logprobs[0, 5].item() == 0.0
    torch.testing.assert_close(logits.grad.double(), x.grad, atol=2e-5, rtol=1e-4)


def test_a_plus_inf_logit_makes_its_row_nan(backend):
    """+inf has no softmax: every backend gives NaN in that row's outputs and gradient row (as for a
    NaN logit), while the other rows are untouched; masked, the row is not read at all."""
    logits = torch.randn(1, 4, 19)
    logits[0, 1, 7] = float("inf")
    labels = torch.randint(0, 19, (1, 4))
    logits.requires_grad_()
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=torch.randn(1, 4, 19), estimator="k3", return_entropy=True,
                                backend=backend)
    (out.logprobs.sum() + out.entropy.sum() + out.kl_sum.sum()).backward()
    for field in (out.logprobs, out.kl, out.entropy):
        assert torch.isnan(field[0, 1]) and torch.isfinite(field[0, [0, 2, 3]]).all()
    assert torch.isnan(out.kl_sum).all()
    assert torch.isnan(logits.grad[0, 1]).all() and torch.isfinite(logits.grad[0, [0, 2, 3]]).all()
    masked = kl_kernels.kl_penalty(logits.detach(), labels, ref_logits=torch.randn(1, 4, 19), estimator="k3",
                                   mask=torch.tensor([[1, 0, 1, 1]]), backend=backend)
    assert torch.isfinite(masked.kl_sum).all()


def test_bad_label_without_validate_is_nan_in_values_and_gradient(backend):
    logits = torch.randn(2, 3, 13, requires_grad=True)
    labels = torch.randint(0, 13, (2, 3))
    labels[0, 1], labels[1, 2] = 13, -5
    logp, entropy = kl_kernels.token_logprobs(logits, labels, return_entropy=True, validate=False, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert torch.isnan(logp[bad]).all() and torch.isnan(entropy[bad]).all()
    assert torch.isfinite(logp[~bad]).all() and torch.isfinite(entropy[~bad]).all()
    assert torch.isnan(logits.grad[bad]).all() and torch.isfinite(logits.grad[~bad]).all()


def test_double_backward_is_an_error_not_a_silent_constant(backend):
    logits = torch.randn(2, 3, 11, requires_grad=True)
    logp = kl_kernels.token_logprobs(logits, torch.randint(0, 11, (2, 3)), backend=backend)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(logp.sum(), logits, create_graph=True)
    (grad,) = torch.autograd.grad(logp.sum(), logits)  # first order is unaffected
    assert torch.isfinite(grad).all()


def test_packed_sums_accumulate_in_float64():
    """One 2^18-token packed sequence: kl_sum within float32 rounding of the float64 sum of the same
    kl values (a float32 running sum was 7e-5 off); the reduction is shared by every backend."""
    n_tokens = 1 << 18
    logits = torch.randn(n_tokens, 4)
    labels = torch.randint(0, 4, (n_tokens,))
    out = kl_kernels.kl_penalty(logits, labels, ref_logprobs=-torch.rand(n_tokens) * 3, estimator="k3",
                                cu_seqlens=torch.tensor([0, 5, n_tokens]))
    want = torch.stack([out.kl[:5].double().sum(), out.kl[5:].double().sum()])
    torch.testing.assert_close(out.kl_sum.double(), want, rtol=2e-7, atol=0)
    assert out.kl_sum.dtype == torch.float32


def _case(rng: random.Random):
    batch, length, vocab = rng.randint(1, 3), rng.randint(1, 6), rng.choice([7, 64, 301])
    estimator = rng.choice([name for name in ESTIMATOR_NAMES if name != "full+"])
    clamps = {"kl_clamp": rng.choice([None, 1.0, 10.0])}
    if not estimator.startswith("full"):
        clamps["log_ratio_clamp"] = rng.choice([None, 0.5, 20.0])
    scale = rng.choice([1.0, 5.0, 40.0])  # 40: log-ratios far past exp's float32 range
    packed = rng.random() < 0.3
    return batch, length, vocab, estimator, clamps, scale, rng.choice([0.5, 1.0, 2.0]), packed


@pytest.mark.parametrize("seed", [0])
def test_fuzz(backend, seed):
    cases = int(os.environ.get("KL_KERNELS_FUZZ_CASES", "40"))
    rng = random.Random(seed)
    for case in range(cases):
        batch, length, vocab, estimator, clamps, scale, temperature, packed = _case(rng)
        torch.manual_seed(case)
        shape = (batch * length,) if packed else (batch, length)
        layout = {}
        if packed:  # random sequence boundaries, empty sequences included
            inner = sorted(torch.randint(0, batch * length + 1, (batch - 1,)).tolist())
            layout["cu_seqlens"] = torch.tensor([0, *inner, batch * length])
        logits = torch.randn(*shape, vocab) * scale
        ref_logits = torch.randn(*shape, vocab) * scale
        labels = torch.randint(0, vocab, shape)
        mask = torch.rand(shape) > 0.3
        poisoned = logits.clone()
        poisoned[~mask] = float("nan")  # masked rows must not be read into any value or gradient
        ref_poisoned = ref_logits.clone()
        ref_poisoned[~mask] = float("inf")
        poisoned.requires_grad_()
        out = kl_kernels.kl_penalty(poisoned, labels, ref_logits=ref_poisoned, mask=mask, estimator=estimator,
                                    temperature=temperature, backend=backend, **clamps, **layout)
        weights = torch.randn(shape)
        # the loss also uses the log-probs, as every PPO/GRPO loss does
        ((out.kl * weights).sum() + out.logprobs[mask].sum()).backward()
        what = f"case {case}: {estimator} {clamps} scale {scale} T {temperature} {layout}"
        assert not torch.isnan(poisoned.grad).any(), what
        assert (poisoned.grad[~mask] == 0).all(), what
        # values and gradients at valid positions against float64 formulas on the clean inputs
        truth, truth_grad = _truth(logits, ref_logits, labels, mask, weights, estimator, temperature, clamps, layout)
        kl = out.kl.detach().double()
        finite = _representable(truth["kl"]) & mask  # k3's exp(-d) passes float32's range at d < -88.7
        torch.testing.assert_close(kl[finite], truth["kl"][finite], atol=1e-3, rtol=1e-3,
                                   msg=lambda detail: f"{what}\n{detail}")
        assert (kl[~mask] == 0).all(), what
        if finite.sum() == mask.sum():  # every counted value finite: the sums are too
            sums = _representable(truth["kl_sum"])
            torch.testing.assert_close(out.kl_sum.detach().double()[sums], truth["kl_sum"][sums], atol=1e-3, rtol=1e-3,
                                       msg=lambda detail: f"{what}\n{detail}")
        rows = mask & _representable(truth_grad).all(-1)
        scale = truth_grad[rows].abs().max().item() if rows.any() else 0.0
        error = (poisoned.grad.double() - truth_grad).abs()
        allowed = 1e-3 * truth_grad.abs() + 1e-5 * (1 + scale) + truth["grad_rounding"].unsqueeze(-1)
        assert (error[rows] <= allowed[rows]).all(), f"{what}: gradient off by {(error - allowed)[rows].max():.3g}"


def _representable(values):
    # float64 truth that float32 outputs can hold at all
    return values.abs() < torch.finfo(torch.float32).max / 2


def _truth(logits, ref_logits, labels, mask, weights, estimator, temperature, clamps, layout):
    """The outputs and the gradient of the fuzz's loss, in float64 by tests/truth.py."""
    from truth import kl_penalty as truth_kl_penalty

    logits = logits.double().requires_grad_()
    out = truth_kl_penalty(logits, labels, ref_logits=ref_logits.double(), mask=mask, estimator=estimator,
                           temperature=temperature, **clamps, **layout)
    out["logprobs"].retain_grad()
    out["kl"].retain_grad()
    ((out["kl"] * weights.double()).sum() + out["logprobs"][mask].sum()).backward()
    # The backward recomputes p_v = exp(z_v/T - lse) from a float32 lse: each p_v is off by up to a
    # few float32 ulps of lse relatively, times the row's upstream coefficient (for `full` also
    # times |log p - log q|). That rounding, not a defect, is what a row may differ by.
    eps = 2.0 ** -23
    lse = torch.logsumexp(logits.detach() / temperature, -1).abs()
    coefficient = out["logprobs"].grad.abs()
    if estimator.startswith("full"):
        spread = 2 * (logits.detach().abs().amax(-1) + ref_logits.double().abs().amax(-1)) / temperature
        coefficient = coefficient + out["kl"].grad.abs() * (1 + spread)
    out["grad_rounding"] = 4 * eps * (1 + lse) * coefficient / temperature
    return {name: value.detach() for name, value in out.items()}, logits.grad


# ---- issue 28: precision at T != 1 and extreme logits, the full KL's overflow and underflow

@pytest.mark.parametrize("temperature,top", [(0.7, 1e4), (0.001, 30.0), (0.001, 1e4), (1.0, 1e4), (0.5, 3e4)])
def test_a_confident_label_keeps_its_digits_when_one_over_t_is_inexact(backend, temperature, top):
    """z = [c, c-1, c-3], label 0: log p is (z_y - m)/T - log s, exact up to one rounding, never half an
    ulp of z/T (an fma contraction of z_y/T - m/T left +0.39 at T = 0.001, c = 1e4)."""
    z = torch.tensor([[top, top - 1.0, top - 3.0]])
    labels = torch.tensor([0])
    got = kl_kernels.token_logprobs(z, labels, temperature=temperature, backend=backend)
    truth = torch.log_softmax(z.double() / temperature, -1)[0, 0]
    error = abs(got.double().item() - truth.item())
    if backend == "reference":  # divides z by T in float32 first, as torch code does: torch's error, no more
        torch_error = abs(torch.log_softmax(z / temperature, -1)[0, 0].double().item() - truth.item())
        assert error <= torch_error + 1e-7, (error, torch_error)
    else:
        assert error <= 1e-6 * max(1.0, abs(truth.item())), (got.item(), truth.item())


def _relative_gradient_error(backend, logits, labels, temperature):
    """max |g - g64| / max |g64| over the gradient of logp + entropy, the float64 truth taken from the
    same float32 logits."""
    z = logits.clone().requires_grad_()
    logp, entropy = kl_kernels.token_logprobs(z, labels, temperature=temperature, return_entropy=True, backend=backend)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    z64 = logits.double().requires_grad_()
    log_p = torch.log_softmax(z64 / temperature, -1)
    truth = log_p.gather(-1, labels[:, None]).sum() + 0.5 * -(log_p.exp() * log_p).sum()
    truth.backward()
    return ((z.grad.double() - z64.grad).abs().max() / z64.grad.abs().max()).item()


@pytest.mark.parametrize("temperature,offset,spread", [
    (1.0, 1e4, 3.0), (0.001, 0.0, 3.0 * 0.001 * 30), (0.001, 1e3, 0.01), (0.001, 1e5, 0.01), (1e-6, 1.0, 1e-6)])
def test_gradient_keeps_its_digits_for_large_z_over_t(temperature, offset, spread):
    """The backward's p = exp(z/T - lse) with lse saved in float64 and z/T - lse formed in one fma: the
    gradient's relative error stays at float32's level (<= 1e-6) for |z/T| up to 1e6 (with a float32 lse
    it carried |lse| 2^-24: 2.6e-5 at logits ~1e4, 2.7e-2 at z/T ~ 1e6). The compiled kernels only: the
    reference divides z by T in float32 first, as torch code does."""
    labels = torch.randint(0, 300, (6,))
    logits = offset + spread * torch.randn(6, 300)
    for backend in [b for b in ("cpu", "triton") if b in kl_kernels.dispatch.BACKENDS
                    and kl_kernels.dispatch.BACKENDS[b].unavailable_reason is None]:
        if backend == "triton" and torch.cuda.is_available():
            continue  # CPU tensors here; bench/gpu_check.sh runs this file on CUDA tensors too
        error = _relative_gradient_error(backend, logits, labels, temperature)
        assert error <= 1e-6, (backend, error)


def test_a_single_column_has_an_exactly_zero_gradient(backend):
    """V = 1: p = 1, so d logp / dz = 0 exactly (it was ~1e-7 from lse's rounding)."""
    z = (torch.randn(5, 1) * 100).requires_grad_()
    logp, entropy = kl_kernels.token_logprobs(z, torch.zeros(5, dtype=torch.long), temperature=0.3,
                                              return_entropy=True, backend=backend)
    assert torch.equal(logp, torch.zeros(5)) and torch.equal(entropy, torch.zeros(5))
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("rise", [2.0, 50.0])
def test_full_kl_with_a_banned_reference_token_then_a_far_higher_tile(backend, rise):
    """`full`, T = 0.01: the reference bans (-inf) the policy's top token of the first tile, then a later
    tile rises far above. The policy can sample the banned token (p > 0, however small: e^-200 here), so
    KL(p||q) is +inf on every backend: not NaN (inf * 0 when the sums
    moved to the higher max), not 0 (p underflowing in float32). A row without a banned token: finite."""
    V = 2500
    logits = torch.randn(1, 3, V)
    logits[:, :, 1500:] += rise
    ref = logits + 0.1 * torch.randn(1, 3, V)
    first_tile_max = logits[0, :2, :1024].argmax(-1)  # where the first tile's mass is
    ref[0, torch.arange(2), first_tile_max] = float("-inf")
    labels = torch.tensor([[1600, 1700, 1800]])
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref, estimator="full", temperature=0.01, backend=backend)
    log_p = torch.log_softmax(logits.double() / 0.01, -1)
    log_q = torch.log_softmax(ref.double() / 0.01, -1)
    assert torch.isfinite(log_p[0, :2].gather(-1, first_tile_max[:, None])).all()  # p > 0: the exact KL is +inf
    assert out.kl[0, :2].tolist() == [float("inf")] * 2, out.kl
    truth = (log_p.exp() * (log_p - log_q))[0, 2].sum()
    torch.testing.assert_close(out.kl[0, 2].double(), truth, atol=1e-4, rtol=1e-4)


def test_full_kl_sum_does_not_overflow_for_far_apart_models(backend):
    """|z - z'| ~ 1e10 inside the one-pass tile's headroom: sd = sum e (z - z') stays finite."""
    V = 2100
    logits = torch.randn(1, 1, V)
    logits[0, 0, 1500:] += 60.0  # a later tile above the first's max (within the 64/T summing headroom)
    ref = logits.clone()
    ref[0, 0, 1500:] -= 1e10
    out = kl_kernels.kl_penalty(logits, torch.tensor([[1600]]), ref_logits=ref, estimator="full", backend=backend)
    truth = kl_kernels.kl_penalty(logits.double(), torch.tensor([[1600]]), ref_logits=ref.double(),
                                  estimator="full", backend="reference")
    assert torch.isfinite(out.kl).all(), out.kl
    torch.testing.assert_close(out.kl.double(), truth.kl, rtol=1e-5, atol=0)
