"""patch()'s machinery on a stand-in trainer package (no trainer needed): wrappers bound to the
installed signature, hand-back to the original, counts, the report, version warnings, round trips,
autograd Functions; and the fused path of the wrappers on every backend. The real trainers are
tested in tests/trainers."""
import sys
import types
import warnings

import pytest
import torch

from kl_kernels.integrations import openrlhf, trl, verl
from kl_kernels.integrations._patching import Fallback, Patch, Replacement, fused_rows


def install_stand_in(monkeypatch, modules):
    made = {}
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        made[name] = module
        monkeypatch.setitem(sys.modules, name, module)
    return made


def trainer_logprobs(logits, labels, temperature=1.0, new_option=None):
    """The stand-in trainer's own O(N x V) function."""
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)


def served(a, original):
    if a["temperature"] == 2.0:
        raise Fallback("not served at 2.0")
    return fused_rows(a["logits"], a["labels"], temperature=a["temperature"])


@pytest.fixture
def stand_in(monkeypatch):
    return install_stand_in(monkeypatch, {
        "trainer": {}, "trainer.utils": {"logprobs": trainer_logprobs},
        "trainer.actor": {"logprobs": trainer_logprobs},  # imported by name: its own reference
    })


def test_wrapper_serves_binds_and_hands_back(stand_in, capsys):
    logits, labels = torch.randn(2, 5, 97), torch.randint(0, 97, (2, 5))
    with Patch("trainer", ("0.0.0", "99.0.0"), [Replacement("trainer.utils", "logprobs", served,
                                                             ("logits", "labels", "temperature"))], {"x": "O(N)"}) as p:
        actor = stand_in["trainer.actor"]
        assert actor.logprobs is stand_in["trainer.utils"].logprobs is not trainer_logprobs
        fused = actor.logprobs(logits, labels=labels, temperature=0.5)  # keywords bind by the installed names
        assert fused.dtype == torch.float32
        torch.testing.assert_close(fused.double(), trainer_logprobs(logits, labels, 0.5), atol=1e-5, rtol=1e-5)
        assert actor.logprobs(logits, labels, 2.0).dtype == torch.float64  # Fallback: the original
        assert actor.logprobs(logits, labels, 1.0, "on").dtype == torch.float64  # a parameter not served
        with pytest.raises(TypeError):  # arguments that do not bind: the original raises its own error
            actor.logprobs(logits)
        assert p.counts() == {"trainer.utils.logprobs": (1, 3)}
        assert set(p.fallback_reasons()["trainer.utils.logprobs"]) == {
            "not served at 2.0", "parameter 'new_option' is not served", "arguments do not bind"}
        assert sorted(p.replaced) == ["trainer.actor.logprobs", "trainer.utils.logprobs"]
        # a module first imported while patched copies the replacement; restore gives it the original
        late = types.ModuleType("trainer.late")
        late.logprobs = actor.logprobs
        sys.modules["trainer.late"] = late
    report = capsys.readouterr().err
    assert "replaced trainer.utils.logprobs" in report and "left alone x: O(N)" in report
    assert stand_in["trainer.utils"].logprobs is stand_in["trainer.actor"].logprobs is trainer_logprobs
    assert late.logprobs is trainer_logprobs
    del sys.modules["trainer.late"]


def test_version_outside_the_tested_range_warns(stand_in, monkeypatch):
    monkeypatch.setattr(stand_in["trainer"], "__version__", "2.0.1", raising=False)
    replacement = Replacement("trainer.utils", "logprobs", served, ("logits", "labels", "temperature"))
    with pytest.warns(UserWarning, match=r"trainer 2\.0\.1 is outside"):
        Patch("trainer", ("1.0.0", "2.0.0"), [replacement], {}, quiet=True).restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Patch("trainer", ("2.0.0", "2.1.0"), [replacement], {}, quiet=True).restore()


def test_missing_function_is_left_alone_with_the_reason(stand_in):
    with Patch("trainer", ("0", "99"), [Replacement("trainer.utils", "absent", served, ())], {}, quiet=True) as p:
        assert p.replaced == [] and "not in trainer" in p.left_alone["trainer.utils.absent"]


def test_autograd_function_replacement(monkeypatch):
    class Head(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, scale=1.0):
            return hidden * scale

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    install_stand_in(monkeypatch, {"trainer": {}, "trainer.heads": {"Head": Head, "head": Head.apply}})
    doubled = lambda a, original: a["hidden"] * 2 * a["scale"]  # noqa: E731
    with Patch("trainer", ("0", "99"), [Replacement("trainer.heads", "Head", doubled, ("hidden", "scale")),
                                        Replacement("trainer.heads", "head", doubled, ("hidden", "scale"))],
               {}, quiet=True) as p:
        module = sys.modules["trainer.heads"]
        assert module.Head.apply(torch.ones(2), scale=3.0).tolist() == [6.0, 6.0]
        assert module.head(torch.ones(2), 3.0).tolist() == [6.0, 6.0]  # `f = Cls.apply` binds forward's names
        assert p.counts() == {"trainer.heads.Head": (1, 0), "trainer.heads.head": (1, 0)}
    assert sys.modules["trainer.heads"].Head is Head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rows_on_every_backend(backend, monkeypatch, dtype):
    """The trainers' signatures take no backend: KL_KERNELS_BACKEND picks it, as for a user."""
    monkeypatch.setenv("KL_KERNELS_BACKEND", backend)
    logits = (torch.randn(3, 7, 301) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, 301, (3, 7))
    row_mask = torch.rand(3, 7) > 0.3
    logp, entropy = fused_rows(logits, labels, temperature=0.8, return_entropy=True, row_mask=row_mask)
    log_p = torch.log_softmax(logits.double() / 0.8, -1)
    expected = torch.where(row_mask, log_p.gather(-1, labels[..., None]).squeeze(-1), 0.0)
    expected_entropy = torch.where(row_mask, -(log_p.exp() * log_p).sum(-1), 0.0)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-4  # float32 inside; bf16 only in the input
    torch.testing.assert_close(logp.double(), expected.detach(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(entropy.double(), expected_entropy.detach(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("integration,package", [(verl, "verl"), (trl, "trl"), (openrlhf, "openrlhf")])
def test_patch_without_the_trainer_raises_import_error(monkeypatch, integration, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ImportError, match=package):
        integration.patch()
