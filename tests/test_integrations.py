"""The drop-ins of kl_kernels.integrations pinned to each trainer's semantics, written out here in
float64 from the trainers' published behaviour (verl core_algos/torch_functional, TRL
trainer/utils and GRPO, OpenRLHF models/utils), and patch() round trips on stand-in packages."""
import sys
import types

import pytest
import torch

from kl_kernels.integrations import openrlhf, trl, verl


@pytest.fixture
def on_backend(backend, monkeypatch):
    """The drop-ins take no backend argument (the trainers' signatures): KL_KERNELS_BACKEND picks it."""
    monkeypatch.setenv("KL_KERNELS_BACKEND", backend)
    return backend


def logprob_pair(shape=(3, 8)):
    logprob = (-torch.rand(shape, dtype=torch.float64) * 4).requires_grad_(True)
    ref = (-torch.rand(shape, dtype=torch.float64) * 4).requires_grad_(True)
    with torch.no_grad():
        ref[0, :2] = logprob[0, :2] + 30  # far apart: the log-ratio clamp of 20 is active
    return logprob, ref


VERL_VALUES = {
    "kl": lambda d: d, "k1": lambda d: d, "abs": lambda d: d.abs(), "mse": lambda d: 0.5 * d * d,
    "k2": lambda d: 0.5 * d * d,
    # verl clamps k3 like low_var_kl: log ratio ref - logp to [-20, 20], the estimate to [-10, 10]
    "low_var_kl": lambda d: ((-d).clamp(-20, 20).exp() - (-d).clamp(-20, 20) - 1).clamp(-10, 10),
    "k3": lambda d: ((-d).clamp(-20, 20).exp() - (-d).clamp(-20, 20) - 1).clamp(-10, 10),
}


@pytest.mark.parametrize("name", list(VERL_VALUES) + [n + "+" for n in VERL_VALUES])
def test_verl_kl_penalty(name):
    logprob, ref = logprob_pair()
    got = verl.kl_penalty(logprob, ref, name)
    want = VERL_VALUES[name.rstrip("+")](logprob.detach() - ref.detach())
    torch.testing.assert_close(got.detach(), want)
    assert got.dtype == torch.float64
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((got * weights).sum(), (logprob, ref))
    if name.endswith("+"):  # straight through: the gradient of k2 = d^2/2, to both inputs
        d = (logprob - ref).detach()
        torch.testing.assert_close(grads[0], weights * d)
        torch.testing.assert_close(grads[1], -weights * d)
    else:
        lp, rf = logprob.detach().requires_grad_(True), ref.detach().requires_grad_(True)
        want_grads = torch.autograd.grad((VERL_VALUES[name](lp - rf) * weights).sum(), (lp, rf))
        torch.testing.assert_close(grads[0], want_grads[0])
        torch.testing.assert_close(grads[1], want_grads[1])


def test_verl_kl_penalty_full_and_unknown_raise():
    logprob, ref = logprob_pair()
    for name in ("full", "nonsense"):
        with pytest.raises(NotImplementedError):
            verl.kl_penalty(logprob, ref, name)


def test_verl_agg_loss():
    loss = torch.randn(4, 6, dtype=torch.float64)
    mask = (torch.rand(4, 6) > 0.3).double()
    mask[2] = 0
    seq_sums = (loss * mask).sum(-1)
    counts = mask.sum(-1)
    has = counts > 0
    cases = [
        ("token-mean", {}, (loss * mask).sum() / mask.sum()),
        ("token-mean", dict(dp_size=2, batch_num_tokens=40), (loss * mask).sum() / 40 * 2),
        ("seq-mean-token-sum", {}, seq_sums[has].sum() / has.sum()),
        ("seq-mean-token-sum", dict(dp_size=4, global_batch_size=16), seq_sums[has].sum() / 16 * 4),
        ("seq-mean-token-mean", {}, (seq_sums[has] / (counts[has] + 1e-8)).sum() / has.sum()),
        ("seq-mean-token-sum-norm", {}, seq_sums.sum() / 6),
        ("seq-mean-token-sum-norm", dict(loss_scale_factor=100), seq_sums.sum() / 100),
    ]
    for mode, kwargs, want in cases:
        torch.testing.assert_close(verl.agg_loss(loss, mask, mode, **kwargs), want, msg=mode)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl.agg_loss(loss, mask, "sum")


def test_verl_masked_mean_ignores_nan_under_the_mask():
    values = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.4
    mask[0, 0] = True
    values[~mask] = float("nan")
    want = values[mask].sum() / (mask.sum() + 1e-8)
    torch.testing.assert_close(verl.masked_mean(values, mask), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_logprobs_and_entropy(on_backend, dtype):
    logits = (torch.randn(2, 7, 300) * 2).to(dtype)
    labels = torch.randint(0, 300, (2, 7))
    log_p = torch.log_softmax(logits.double(), -1)
    leaf = logits.clone().requires_grad_(True)
    source = leaf * 1  # verl's logits are a model output, which the in-place backward overwrites
    got = verl.logprobs_from_logits(source, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), rtol=2e-5, atol=2e-5)
    got.sum().backward()
    want_grad = -log_p.exp()
    want_grad.scatter_add_(-1, labels.unsqueeze(-1), torch.ones(2, 7, 1, dtype=torch.float64))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(leaf.grad.double(), want_grad, **tol)
    entropy = verl.entropy_from_logits(logits)
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(-1), rtol=2e-5, atol=2e-5)


def test_verl_controllers_follow_verls_update():
    adaptive = verl.AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    adaptive.update(current_kl=9.0, n_steps=256)  # error clipped to 0.2
    assert adaptive.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    assert (adaptive.target, adaptive.horizon) == (6.0, 10000)
    fixed = verl.FixedKLController(kl_coef=0.05)
    fixed.update(current_kl=100.0, n_steps=1)
    assert fixed.value == 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_selective_log_softmax(on_backend, dtype):
    logits = (torch.randn(2, 5, 257) * 2).to(dtype)
    index = torch.randint(0, 257, (2, 5))
    top = torch.randint(0, 257, (2, 5, 3))
    log_p = torch.log_softmax(logits.double(), -1)
    got = trl.selective_log_softmax(logits, index)
    got_top = trl.selective_log_softmax(logits, top)
    assert got.dtype == dtype and got_top.dtype == dtype and got_top.shape == (2, 5, 3)  # TRL returns the logits' dtype
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)  # one bf16 rounding
    torch.testing.assert_close(got.double(), log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1), **tol)
    torch.testing.assert_close(got_top.double(), log_p.gather(-1, top), **tol)
    entropy = trl.entropy_from_logits(logits)
    assert entropy.dtype == dtype
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(-1), **tol)


def test_trl_grpo_k3_is_unclamped():
    logp = torch.tensor([-1.0, -2.0, -40.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -0.5, -1.0], dtype=torch.float64)
    want = torch.exp(ref - logp) - (ref - logp) - 1
    torch.testing.assert_close(trl.grpo_per_token_kl(logp, ref), want)
    assert want[2] > 1e15  # no clamp, as in TRL


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_compute_approx_kl(estimator):
    logp = (-torch.rand(3, 6) * 5).to(torch.bfloat16)
    base = (-torch.rand(3, 6) * 5).to(torch.bfloat16)
    base[0, 0] = logp[0, 0] + 12  # large enough that k1/k2/k3 all hit the clamp of 10
    got = openrlhf.compute_approx_kl(logp, base, kl_estimator=estimator)
    d = logp.double() - base.double()
    want = {"k1": d, "k2": d * d / 2, "k3": (-d).exp() - 1 + d}[estimator].clamp(-10, 10)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="kl_estimator"):
        openrlhf.compute_approx_kl(logp, base, kl_estimator="low_var_kl")


def test_openrlhf_compute_reward():
    kl = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    r = torch.tensor([1.0, -7.0, 2.0])
    got = openrlhf.compute_reward(r, 0.1, kl, action_mask=mask, reward_clip_range=(-5.0, 5.0))
    want = -0.1 * kl  # every position, masked or not
    want[0, 2] += 1.0
    want[1, 3] += -5.0  # clipped
    want[2, 4] += 2.0  # no valid token: OpenRLHF puts the score at the last position
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(openrlhf.compute_reward(r, -1.0, kl, action_mask=mask).sum(), r.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_openrlhf_log_probs_from_logits(on_backend, dtype):
    logits = (torch.randn(2, 6, 90) * 2).to(dtype)
    labels = torch.randint(0, 90, (2, 6))
    expected_logits = logits / 0.7
    want = torch.log_softmax(expected_logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    got = openrlhf.log_probs_from_logits(logits, labels, temperature=0.7)
    assert got.dtype == dtype  # float32 logits -> float32; bf16 -> bf16, as OpenRLHF returns
    torch.testing.assert_close(logits, expected_logits)  # divided in place, as OpenRLHF does
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got.double(), want, **tol)


def test_openrlhf_masked_mean():
    values, mask = torch.randn(3, 4), (torch.rand(3, 4) > 0.3).float()
    mask[:, 0] = 1
    torch.testing.assert_close(openrlhf.masked_mean(values, mask), (values * mask).sum() / mask.sum())
    torch.testing.assert_close(openrlhf.masked_mean(values, mask, dim=1), (values * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(openrlhf.masked_mean(values, None), values.mean())


def install_stand_in(monkeypatch, modules):
    """Stand-in trainer packages in sys.modules: {name: {attr: value}}."""
    made = {}
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        made[name] = module
        monkeypatch.setitem(sys.modules, name, module)
    return made


def test_verl_patch_round_trip(monkeypatch):
    def original_logprobs(logits, labels, inplace_backward=True):
        raise AssertionError("the original must not run while patched")

    def original_kl(logprob, ref_logprob, kl_penalty):
        raise AssertionError("the original must not run while patched")

    made = install_stand_in(monkeypatch, {
        "verl": {}, "verl.utils": {}, "verl.trainer": {}, "verl.trainer.ppo": {},
        "verl.utils.torch_functional": {"logprobs_from_logits": original_logprobs},
        "verl.trainer.ppo.core_algos": {"kl_penalty": original_kl},
        # a module that imported the function by name holds its own reference
        "verl.workers.actor": {"logprobs_from_logits": original_logprobs},
    })
    with verl.patch() as handle:
        assert made["verl.utils.torch_functional"].logprobs_from_logits is verl.logprobs_from_logits
        assert made["verl.workers.actor"].logprobs_from_logits is verl.logprobs_from_logits
        assert made["verl.trainer.ppo.core_algos"].kl_penalty is verl.kl_penalty
        assert len(handle.patched) == 3
        logp = made["verl.workers.actor"].logprobs_from_logits(torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3)))
        assert logp.shape == (2, 3)
        # a module imported while patched copies the replacement; restore gives it the original too
        late = types.ModuleType("verl.workers.critic")
        late.logprobs_from_logits = made["verl.utils.torch_functional"].logprobs_from_logits
        monkeypatch.setitem(sys.modules, "verl.workers.critic", late)
    assert made["verl.utils.torch_functional"].logprobs_from_logits is original_logprobs
    assert made["verl.workers.actor"].logprobs_from_logits is original_logprobs
    assert made["verl.trainer.ppo.core_algos"].kl_penalty is original_kl
    assert late.logprobs_from_logits is original_logprobs


@pytest.mark.parametrize("integration,package,module,names", [
    (trl, "trl", "trl.trainer.utils", ["selective_log_softmax", "entropy_from_logits"]),
    (openrlhf, "openrlhf", "openrlhf.models.utils",
     ["compute_approx_kl", "compute_reward", "log_probs_from_logits", "masked_mean"]),
])
def test_patch_round_trip(monkeypatch, integration, package, module, names):
    originals = {name: (lambda *a, **k: None) for name in names}
    parents = {".".join(module.split(".")[:i]): {} for i in range(1, module.count(".") + 1)}
    made = install_stand_in(monkeypatch, {**parents, module: dict(originals)})
    handle = integration.patch()
    for name in names:
        assert getattr(made[module], name) is getattr(integration, name)
    handle.restore()
    for name in names:
        assert getattr(made[module], name) is originals[name]


@pytest.mark.parametrize("integration,package", [(verl, "verl"), (trl, "trl"), (openrlhf, "openrlhf")])
def test_patch_without_the_trainer_raises_import_error(monkeypatch, integration, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ImportError, match=package):
        integration.patch()
