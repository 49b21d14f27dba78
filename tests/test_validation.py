"""docs/contract.md section 5: every bad input raises the named exception, naming the argument, before any work."""
import pytest
import torch

import kl_kernels


def good():
    torch.manual_seed(0)
    return dict(logits=torch.randn(2, 5, 11), labels=torch.randint(0, 11, (2, 5)),
                ref_logits=torch.randn(2, 5, 11), mask=torch.ones(2, 5, dtype=torch.bool))


def packed():
    torch.manual_seed(0)
    return dict(logits=torch.randn(6, 11), labels=torch.randint(0, 11, (6,)), ref_logits=torch.randn(6, 11),
                cu_seqlens=torch.tensor([0, 2, 6]))


CASES = [
    # (name, inputs, changes, exception, words the message must contain)
    ("int logits", good, dict(logits=torch.zeros(2, 5, 11, dtype=torch.int64)), TypeError, "logits"),
    ("float labels", good, dict(labels=torch.zeros(2, 5)), TypeError, "labels"),
    ("int ref_logits", good, dict(ref_logits=torch.zeros(2, 5, 11, dtype=torch.int32)), TypeError, "ref_logits"),
    ("float cu_seqlens", packed, dict(cu_seqlens=torch.tensor([0.0, 2.0, 6.0])), TypeError, "cu_seqlens"),
    ("labels shape", good, dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels"),
    ("ref_logits shape", good, dict(ref_logits=torch.randn(2, 5, 12)), ValueError, "ref_logits"),
    ("mask shape", good, dict(mask=torch.ones(2, 6)), ValueError, "mask"),
    ("4-d logits", good, dict(logits=torch.randn(1, 2, 5, 11), labels=torch.zeros(1, 2, 5, dtype=torch.long),
                              ref_logits=torch.randn(1, 2, 5, 11), mask=None), ValueError, "logits"),
    ("unknown estimator", good, dict(estimator="k4"), ValueError, "low_var_kl"),
    ("full+", good, dict(estimator="full+"), ValueError, "estimator"),
    ("full without ref_logits", good, dict(ref_logits=None, ref_logprobs=torch.zeros(2, 5), estimator="full"),
     ValueError, "ref_logits"),
    ("full with log_ratio_clamp", good, dict(estimator="full", log_ratio_clamp=5.0), ValueError, "log_ratio_clamp"),
    ("both references", good, dict(ref_logprobs=torch.zeros(2, 5)), ValueError, "ref_logprobs"),
    ("no reference", good, dict(ref_logits=None), ValueError, "ref_logits"),
    ("ref_logprobs shape", good, dict(ref_logits=None, ref_logprobs=torch.zeros(2, 4)), ValueError, "ref_logprobs"),
    ("zero temperature", good, dict(temperature=0.0), ValueError, "temperature"),
    ("negative temperature tensor", good, dict(temperature=torch.tensor([[1.0], [-1.0]])), ValueError, "temperature"),
    ("temperature shape", good, dict(temperature=torch.ones(3)), ValueError, "temperature"),
    ("negative kl_coef", good, dict(kl_coef=-0.1), ValueError, "kl_coef"),
    ("nan kl_coef", good, dict(kl_coef=float("nan")), ValueError, "kl_coef"),
    ("inf kl_coef", good, dict(kl_coef=float("inf")), ValueError, "kl_coef"),
    ("label too large", good, dict(labels=torch.full((2, 5), 11)), ValueError, "labels"),
    ("negative label", good, dict(labels=torch.full((2, 5), -1)), ValueError, "labels"),
    ("cu_seqlens with padded", good, dict(cu_seqlens=torch.tensor([0, 5, 10])), ValueError, "cu_seqlens"),
    ("cu_seqlens start", packed, dict(cu_seqlens=torch.tensor([1, 2, 6])), ValueError, "cu_seqlens"),
    ("cu_seqlens decreasing", packed, dict(cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError, "cu_seqlens"),
    ("cu_seqlens end", packed, dict(cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens"),
    ("cu_seqlens 2-d", packed, dict(cu_seqlens=torch.tensor([[0, 6]])), ValueError, "cu_seqlens"),
    ("negative clamp", good, dict(kl_clamp=-1.0), ValueError, "kl_clamp"),
    ("unknown backend", good, dict(backend="tpu"), ValueError, "backend"),
    ("empty vocabulary", good, dict(logits=torch.randn(2, 5, 0), ref_logits=torch.randn(2, 5, 0)), ValueError, "logits"),
    ("meta device", good, dict(ref_logits=torch.randn(2, 5, 11, device="meta")), ValueError, "device"),
]


@pytest.mark.parametrize("name,inputs,changes,error,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_kl_penalty(name, inputs, changes, error, words):
    kwargs = inputs()
    kwargs.update(changes)
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(error) as info:
        kl_kernels.kl_penalty(**kwargs)
    assert words in str(info.value)
    for k, v in before.items():  # nothing mutated
        assert torch.equal(kwargs[k], v), k


def test_checks_without_validate():
    """validate=False skips value checks (no host sync) but shapes, dtypes and devices still raise."""
    kwargs = good()
    kwargs["labels"] = torch.full((2, 5), 11)
    out = kl_kernels.kl_penalty(**kwargs, validate=False)  # the caller's promise: NaN, not an error
    assert torch.isnan(out.logprobs).all()
    with pytest.raises(ValueError, match="ref_logits"):
        kl_kernels.kl_penalty(**{**good(), "ref_logits": torch.randn(2, 5, 3)}, validate=False)
    with pytest.raises(ValueError, match="temperature"):
        kl_kernels.kl_penalty(**good(), temperature=-1.0, validate=False)
    bad_cu = packed()
    bad_cu["cu_seqlens"] = torch.tensor([0, 9, 2])  # out of range: clamped, never read out of bounds
    out = kl_kernels.kl_penalty(**bad_cu, validate=False)
    assert out.kl_sum.shape == (2,)


@pytest.mark.parametrize("changes,error,words", [
    (dict(logits=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "logits"),
    (dict(labels=torch.zeros(3)), TypeError, "labels"),
    (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels"),
    (dict(temperature=-2.0), ValueError, "temperature"),
    (dict(labels=torch.full((3,), 4)), ValueError, "labels"),
    (dict(ignore_index=1.5), ValueError, "ignore_index"),
    (dict(ignore_index=2**63), ValueError, "ignore_index"),  # does not fit the kernels' int64
    (dict(labels=torch.randint(0, 4, (3,)).to(torch.uint16)), TypeError, "labels"),  # ATen cannot compare these
    (dict(labels=torch.randint(0, 4, (3,)).to(torch.uint32)), TypeError, "labels"),
    (dict(labels=torch.randint(0, 4, (3,)).to(torch.uint64)), TypeError, "labels"),
    (dict(temperature=torch.tensor(True)), ValueError, "temperature"),
])
def test_bad_input_token_logprobs(changes, error, words):
    kwargs = dict(logits=torch.randn(3, 4), labels=torch.randint(0, 4, (3,)))
    kwargs.update(changes)
    with pytest.raises(error, match=words):
        kl_kernels.token_logprobs(**kwargs)


def test_forced_backend_that_cannot_serve_raises():
    from kl_kernels.dispatch import BACKENDS
    cannot = [name for name, b in BACKENDS.items() if b.not_supported_reasons(torch.device("cpu"), (torch.float32,))]
    assert "cuda" in cannot, "the cuda backend never serves CPU tensors (built or not)"
    for name in cannot:
        with pytest.raises(RuntimeError, match=name):
            kl_kernels.kl_penalty(**good(), backend=name)


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("KL_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        kl_kernels.kl_penalty(**good())
    monkeypatch.setenv("KL_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="KL_KERNELS_BACKEND"):
        kl_kernels.kl_penalty(**good())
    monkeypatch.setenv("KL_KERNELS_BACKEND", "reference")
    assert kl_kernels.kl_penalty(**good()).kl.shape == (2, 5)


def test_available_backends_report():
    infos = kl_kernels.available_backends()
    assert [i.name for i in infos] == ["reference", "cpu", "triton", "cuda"]
    for info in infos:
        assert isinstance(info, kl_kernels.BackendInfo)
        assert (info.reason is None) == info.available
    assert infos[0].available


def test_meta_tensors_trace_shapes_with_validate():
    """Meta tensors have no values to check: validate=True traces shapes instead of failing in .item()."""
    logits = torch.empty(2, 5, 11, device="meta")
    labels = torch.empty(2, 5, dtype=torch.long, device="meta")
    logp = kl_kernels.token_logprobs(logits, labels, temperature=torch.ones(2, 1, device="meta"))
    assert logp.device.type == "meta" and logp.shape == (2, 5)
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=logits, estimator="k3", kl_coef=torch.tensor(0.1, device="meta"))
    assert out.kl.device.type == "meta" and out.kl_sum.shape == (2,)
    packed_out = kl_kernels.kl_penalty(logits[0], labels[0], ref_logprobs=torch.empty(5, device="meta"),
                                       cu_seqlens=torch.empty(3, dtype=torch.long, device="meta"))
    assert packed_out.kl_sum.shape == (2,)


def test_first_hour_messages():
    """Issue 38: a transposed weight's error names the weight; the kept_ids range error shows the bad
    value; triton is listed as unavailable where it can serve no tensor (no GPU, no interpreter)."""
    import os
    import subprocess
    import sys

    with pytest.raises(ValueError, match=r"weight must be \[V, H\].*transposed"):
        kl_kernels.linear_token_logprobs(torch.randn(3, 8), torch.randn(8, 50), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="found 77"):
        kl_kernels.token_logprobs(torch.randn(2, 50), torch.tensor([1, 2]), kept_ids=torch.tensor([[1, 77], [2, -1]]))
    if not torch.cuda.is_available():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-c", "import kl_kernels; print({b.name: b for b in "
                               "kl_kernels.available_backends()}['triton'])"], capture_output=True, text=True, env=env)
        assert "available=False" in done.stdout and "no cuda device" in done.stdout, done.stdout + done.stderr
