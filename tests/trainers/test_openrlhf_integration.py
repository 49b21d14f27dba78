"""kl_kernels.integrations.openrlhf inside the installed OpenRLHF (pinned in requirements.txt):
log_probs_from_logits and compute_entropy against OpenRLHF's own, its in-place temperature kept,
and OpenRLHF's Actor.forward on a tiny random Llama (log-probs, entropy, lm_head gradient)."""
import importlib

import pytest
import torch

from trainer_env import require

require("openrlhf")
utils = importlib.import_module("openrlhf.models.utils")
from kl_kernels.integrations import openrlhf as kl_openrlhf  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits(dtype, temperature):
    source = (torch.randn(3, 17, 1031) * 2).to(dtype)
    labels = torch.randint(0, 1031, (3, 17))
    theirs_logits = source.clone()
    theirs = utils.log_probs_from_logits(theirs_logits, labels, temperature=temperature)
    ours_logits = source.clone()
    with kl_openrlhf.patch(quiet=True) as handle:
        ours = utils.log_probs_from_logits(ours_logits, labels, temperature=temperature)
    assert handle.counts()["openrlhf.models.utils.log_probs_from_logits"] == (1, 0)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours_logits, theirs_logits)  # OpenRLHF's in-place division, kept
    truth = torch.log_softmax(source.double() / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    our_error, their_error = (ours.double() - truth).abs().max(), (theirs.double() - truth).abs().max()
    assert our_error <= max(their_error, 2e-5)


def test_compute_entropy_and_gradient():
    logits = torch.randn(2, 13, 777, requires_grad=True)
    theirs = utils.compute_entropy(logits)
    theirs.sum().backward()
    their_grad, logits.grad = logits.grad, None
    with kl_openrlhf.patch(quiet=True) as handle:
        ours = utils.compute_entropy(logits)
        ours.sum().backward()
    assert handle.counts()["openrlhf.models.utils.compute_entropy"] == (1, 0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad, their_grad, atol=1e-6, rtol=1e-5)


def test_actor_forward(tmp_path):
    """OpenRLHF's Actor (the function it imported by name is patched too): action log-probs,
    entropy and the lm_head gradient, patched vs unpatched."""
    from openrlhf.models import Actor
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    actor = Actor(str(tmp_path), attn_implementation="eager", param_dtype="bf16", temperature=0.8)
    actor.model.float()  # OpenRLHF loads bf16 or fp16 only; compare in float32
    sequences = torch.randint(0, 211, (3, 14))
    attention_mask = torch.ones(3, 14, dtype=torch.long)
    action_mask = (torch.rand(3, 6) > 0.2).long()

    def run():
        actor.zero_grad()
        log_probs, output = actor(sequences, action_mask=action_mask, attention_mask=attention_mask,
                                  return_output=True, return_entropy=True)
        (log_probs.sum() + output.entropy.sum()).backward()
        return log_probs.detach(), output.entropy.detach(), actor.model.lm_head.weight.grad.clone()

    theirs = run()
    with kl_openrlhf.patch(quiet=True) as handle:
        ours = run()
    assert handle.counts()["openrlhf.models.utils.log_probs_from_logits"][0] == 1
    assert handle.counts()["openrlhf.models.utils.compute_entropy"][0] == 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
