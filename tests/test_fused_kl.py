"""kl_penalty and token_logprobs on every CPU backend against the float64 formulas of truth.py."""
import pytest
import torch

import kl_kernels
from kl_kernels.backends import reference

import truth

ESTIMATORS = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "full",
              "k1+", "kl+", "abs+", "k2+", "mse+", "k3+", "low_var_kl+"]
FIELDS = ("logprobs", "ref_logprobs", "kl", "penalty", "kl_sum", "kl_mean", "entropy")


def tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def make_inputs(B, T, V, dtype=torch.float32, ignore_frac=0.15, mask_frac=0.2, scale=3.0, packed=False):
    logits = (torch.randn(B, T, V) * scale).to(dtype)
    # a reference near the policy, as in training, plus some rows far from it
    ref_logits = (logits.double() + torch.randn(B, T, V) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignore_frac] = -100
    mask = torch.rand(B, T) >= mask_frac
    if packed:
        return logits.view(B * T, V), ref_logits.view(B * T, V), labels.view(-1), mask.view(-1)
    return logits, ref_logits, labels, mask


def assert_matches(out, expected, dtype, fields=FIELDS):
    for field in fields:
        got = getattr(out, field)
        if field == "entropy" and got is None:
            continue
        want = expected[field]
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert got.dtype == out_dtype, field
        assert got.shape == want.shape, field
        torch.testing.assert_close(got.double(), want.detach(), **tolerance(dtype), msg=field)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_padded(backend, estimator):
    logits, ref_logits, labels, mask = make_inputs(3, 17, 257)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator=estimator,
                                kl_coef=0.07, return_entropy=True, backend=backend)
    expected = truth.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator=estimator, kl_coef=0.07)
    assert_matches(out, expected, torch.float32)


# log_ratio_clamp with full is a ValueError (test_validation), so full only meets kl_clamp here
CLAMP_CASES = [(estimator, clamps) for estimator in ["k1", "abs", "k2", "k3", "low_var_kl", "full", "k3+"]
               for clamps in [(None, None), (0.5, None), (None, 0.3), (0.2, 0.05)]
               if not (estimator == "full" and clamps[0] is not None)]


@pytest.mark.parametrize("estimator,clamps", CLAMP_CASES)
def test_clamps(backend, estimator, clamps):
    log_ratio_clamp, kl_clamp = clamps
    logits, ref_logits, labels, mask = make_inputs(2, 13, 101)
    kwargs = dict(mask=mask, estimator=estimator, log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, backend=backend, **kwargs)
    expected = truth.kl_penalty(logits, labels, ref_logits=ref_logits, **kwargs)
    assert_matches(out, expected, torch.float32)
    if kl_clamp is not None:
        assert out.kl.abs().max() <= kl_clamp + 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (2, 41, 401), (3, 5, 1271), (1, 3, 65599)])
def test_dtypes_and_odd_shapes(backend, dtype, shape):
    logits, ref_logits, labels, mask = make_inputs(*shape, dtype=dtype)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator="k3",
                                return_entropy=True, backend=backend)
    expected = truth.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator="k3")
    assert_matches(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_pytorch(backend, dtype):
    """flash-attn's rule: our error vs float64 <= 2x the error of PyTorch computing in that dtype."""
    logits, ref_logits, labels, _ = make_inputs(4, 64, 3001, dtype=dtype, ignore_frac=0.0)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, estimator="k1", return_entropy=True,
                                backend=backend)
    expected = truth.kl_penalty(logits, labels, ref_logits=ref_logits, estimator="k1")

    def pytorch_in_dtype(z):
        log_p = torch.log_softmax(z, dim=-1)  # computed in bf16/fp16
        return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)

    logp_lp, entropy_lp = pytorch_in_dtype(logits)
    ref_lp, _ = pytorch_in_dtype(ref_logits)
    pairs = {"logprobs": logp_lp, "entropy": entropy_lp, "kl": logp_lp - ref_lp}
    for field, lowp in pairs.items():
        ours = (getattr(out, field).double() - expected[field]).abs().max().item()
        theirs = (lowp.double() - expected[field]).abs().max().item()
        assert theirs > 0, field  # the comparison must not be vacuous
        assert ours <= 2 * theirs, (field, ours, theirs)


def test_ref_logprobs_given(backend):
    logits, _, labels, mask = make_inputs(2, 9, 55)
    ref_logprobs = -torch.rand(2, 9) * 5
    for estimator in ("k1", "k3", "low_var_kl+"):
        out = kl_kernels.kl_penalty(logits, labels, ref_logprobs=ref_logprobs, mask=mask, estimator=estimator,
                                    backend=backend)
        expected = truth.kl_penalty(logits, labels, ref_logprobs=ref_logprobs, mask=mask, estimator=estimator)
        assert_matches(out, expected, torch.float32, fields=FIELDS[:-1])
        assert not out.ref_logprobs.requires_grad


@pytest.mark.parametrize("kind", ["float", "per_sequence", "per_token", "scalar_tensor"])
def test_temperature_padded(backend, kind):
    logits, ref_logits, labels, mask = make_inputs(3, 7, 99)
    temperature = {"float": 0.7, "per_sequence": torch.rand(3, 1) + 0.5,
                   "per_token": torch.rand(3, 7) + 0.3, "scalar_tensor": torch.tensor(1.3)}[kind]
    kwargs = dict(mask=mask, estimator="full", temperature=temperature)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, return_entropy=True, backend=backend, **kwargs)
    assert_matches(out, truth.kl_penalty(logits, labels, ref_logits=ref_logits, **kwargs), torch.float32)


@pytest.mark.parametrize("kind", ["per_token", "per_sequence", "float"])
def test_packed_layout(backend, kind):
    logits, ref_logits, labels, mask = make_inputs(1, 40, 130, packed=True)
    cu_seqlens = torch.tensor([0, 7, 7, 20, 39, 40], dtype=torch.int32)  # includes an empty sequence
    temperature = {"per_token": torch.rand(40) + 0.5, "per_sequence": torch.rand(5) + 0.5, "float": 0.9}[kind]
    kwargs = dict(mask=mask, cu_seqlens=cu_seqlens, estimator="k3", temperature=temperature)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, return_entropy=True, backend=backend, **kwargs)
    expected = truth.kl_penalty(logits, labels, ref_logits=ref_logits, **kwargs)
    assert out.kl_sum.shape == (5,)
    assert out.kl_sum[1] == 0 and out.kl_mean[1] == 0
    assert_matches(out, expected, torch.float32)


def test_packed_without_cu_seqlens_is_one_sequence(backend):
    logits, ref_logits, labels, mask = make_inputs(1, 30, 64, packed=True)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, backend=backend)
    assert out.kl_sum.shape == (1,) and out.kl_mean.shape == (1,)
    assert_matches(out, truth.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask), torch.float32)


def test_strided_view_read_in_place(backend):
    full_logits, full_ref, full_labels, _ = make_inputs(3, 12, 77)
    logits, ref_logits = full_logits[:, :-1, :], full_ref[:, 1:, :]  # shifted views, rows not evenly spaced
    labels = full_labels[:, 1:]
    assert not logits.is_contiguous()
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, estimator="full", return_entropy=True,
                                backend=backend)
    assert_matches(out, truth.kl_penalty(logits, labels, ref_logits=ref_logits, estimator="full"), torch.float32)
    # a vocabulary dim that is not contiguous still works (it is copied)
    transposed = full_logits.transpose(1, 2).contiguous().transpose(1, 2)
    out = kl_kernels.kl_penalty(transposed, full_labels, ref_logits=full_ref, backend=backend)
    assert_matches(out, truth.kl_penalty(full_logits, full_labels, ref_logits=full_ref), torch.float32)


def test_many_row_blocks(backend, monkeypatch):
    """Blocks smaller than a sequence, and the per-sequence walk of a strided view."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * 50)
    full_logits, full_ref, labels, mask = make_inputs(4, 11, 50)
    logits = full_logits[:, :-1]
    kwargs = dict(mask=mask[:, :-1], estimator="full", temperature=torch.rand(4, 10) + 0.5)
    out = kl_kernels.kl_penalty(logits, labels[:, :-1], ref_logits=full_ref[:, :-1], return_entropy=True,
                                backend=backend, **kwargs)
    expected = truth.kl_penalty(logits, labels[:, :-1], ref_logits=full_ref[:, :-1], **kwargs)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_nan_poison_in_masked_and_ignored_rows(backend, mask_dtype):
    logits, ref_logits, labels, mask = make_inputs(3, 15, 88)
    mask = mask.to(mask_dtype)
    clean = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator="full",
                                  return_entropy=True, backend=backend)
    hidden = (mask == 0) | (labels == -100)
    assert hidden.any() and (~hidden).any()
    poisoned_logits, poisoned_ref = logits.clone(), ref_logits.clone()
    poisoned_logits[hidden] = float("nan")
    poisoned_ref[hidden] = float("nan")
    poisoned_logits.requires_grad_(True)
    out = kl_kernels.kl_penalty(poisoned_logits, labels, ref_logits=poisoned_ref, mask=mask, estimator="full",
                                return_entropy=True, backend=backend)
    for field in ("kl", "penalty", "kl_sum", "kl_mean"):
        torch.testing.assert_close(getattr(out, field), getattr(clean, field), rtol=0, atol=0)
    visible = ~hidden
    torch.testing.assert_close(out.logprobs[visible], clean.logprobs[visible], rtol=0, atol=0)
    assert torch.isnan(out.logprobs[(mask == 0) & (labels != -100)]).all()  # computed, masked or not
    assert (out.logprobs[labels == -100] == 0).all() and (out.entropy[labels == -100] == 0).all()
    out.kl_sum.sum().backward()
    assert torch.isfinite(poisoned_logits.grad).all()
    assert (poisoned_logits.grad[hidden] == 0).all()


def test_nan_in_valid_row_reaches_its_sequence_only(backend):
    logits, ref_logits, labels, _ = make_inputs(1, 20, 40, packed=True, ignore_frac=0)
    logits[5, 3] = float("nan")
    cu_seqlens = torch.tensor([0, 10, 20])
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, cu_seqlens=cu_seqlens, backend=backend)
    assert torch.isnan(out.kl[5]) and torch.isnan(out.kl_sum[0]) and torch.isnan(out.kl_mean[0])
    assert torch.isfinite(out.kl_sum[1])


def test_banned_tokens_minus_inf(backend):
    """-inf logits (a vocabulary mask) contribute nothing to entropy and full KL, instead of NaN."""
    logits, ref_logits, labels, _ = make_inputs(2, 6, 30, ignore_frac=0)
    logits[..., :5] = float("-inf")
    ref_logits[..., :5] = float("-inf")
    labels = labels.clamp(min=5)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, estimator="full", return_entropy=True,
                                backend=backend)
    expected = truth.kl_penalty(logits[..., 5:], labels - 5, ref_logits=ref_logits[..., 5:], estimator="full")
    assert_matches(out, expected, torch.float32)


def test_empty_inputs(backend):
    logits, ref_logits = torch.randn(0, 10), torch.randn(0, 10)
    labels = torch.zeros(0, dtype=torch.long)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, cu_seqlens=torch.tensor([0, 0, 0]),
                                return_entropy=True, backend=backend)
    assert out.kl.shape == (0,) and out.kl_sum.tolist() == [0.0, 0.0] and out.kl_mean.tolist() == [0.0, 0.0]
    out = kl_kernels.kl_penalty(torch.randn(2, 0, 10), torch.zeros(2, 0, dtype=torch.long),
                                ref_logits=torch.randn(2, 0, 10), backend=backend)
    assert out.kl.shape == (2, 0) and out.kl_sum.tolist() == [0.0, 0.0]
    assert kl_kernels.token_logprobs(logits, labels, backend=backend).shape == (0,)


def test_all_masked_sequence_mean_is_zero(backend):
    logits, ref_logits, labels, mask = make_inputs(2, 5, 20)
    mask[0] = False
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, backend=backend)
    assert out.kl_sum[0] == 0 and out.kl_mean[0] == 0


def test_deterministic(backend):
    logits, ref_logits, labels, mask = make_inputs(4, 33, 517)
    runs = []
    for _ in range(2):
        leaf = logits.clone().requires_grad_(True)
        out = kl_kernels.kl_penalty(leaf, labels, ref_logits=ref_logits, mask=mask, estimator="full",
                                    return_entropy=True, backend=backend)
        (out.kl_mean.sum() + out.entropy.sum()).backward()
        runs.append([out.kl, out.kl_sum, out.kl_mean, out.entropy, leaf.grad])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 9, 33), (1, 4, 70000)])
def test_token_logprobs(backend, dtype, shape):
    logits = (torch.randn(*shape) * 2).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels[0, 0] = -100
    temperature = torch.rand(shape[0], 1) + 0.5
    logp, entropy = kl_kernels.token_logprobs(logits, labels, temperature=temperature, return_entropy=True,
                                              backend=backend)
    temp = truth.per_token_temperature(temperature, labels.shape)
    want_logp, want_entropy, _ = truth.row_stats(logits, labels, temp)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(logp.double(), want_logp, **tolerance(dtype))
    torch.testing.assert_close(entropy.double(), want_entropy, **tolerance(dtype))
    assert logp[0, 0] == 0 and entropy[0, 0] == 0


def test_token_logprobs_any_leading_shape(backend):
    logits = torch.randn(2, 3, 4, 19)
    labels = torch.randint(0, 19, (2, 3, 4))
    got = kl_kernels.token_logprobs(logits, labels, backend=backend)
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    one = kl_kernels.token_logprobs(logits[0, 0, 0], labels[0, 0, 0], backend=backend)
    assert one.shape == () and torch.allclose(one.double(), want[0, 0, 0])


def test_bad_label_without_validate_gives_nan_not_a_crash(backend):
    logits, ref_logits, labels, _ = make_inputs(1, 6, 10, ignore_frac=0)
    labels[0, 2], labels[0, 4] = 10, -7
    logits.requires_grad_()
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, validate=False, backend=backend)
    assert torch.isnan(out.logprobs[0, 2]) and torch.isnan(out.logprobs[0, 4]) and torch.isnan(out.kl_sum[0])
    assert torch.isfinite(out.logprobs[0, [0, 1, 3, 5]]).all()
    out.kl.sum().backward()  # and NaN in those rows' gradient, on every backend alike (contract section 8)
    assert torch.isnan(logits.grad[0, [2, 4]]).all() and torch.isfinite(logits.grad[0, [0, 1, 3, 5]]).all()


def test_kl_coef_tensor(backend):
    logits, ref_logits, labels, mask = make_inputs(2, 5, 20)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, kl_coef=torch.tensor(0.25),
                                backend=backend)
    torch.testing.assert_close(out.penalty, -0.25 * out.kl)


def test_strided_labels(backend):
    """A label tensor that is a strided view (e.g. one column of a (..., K) index) is read correctly."""
    logits = torch.randn(2, 5, 31)
    index = torch.randint(0, 31, (2, 5, 3))
    labels = index[..., 1]
    assert not labels.is_contiguous()
    got = kl_kernels.token_logprobs(logits, labels, backend=backend)
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
