"""linear_token_logprobs (SPEC section 9, log-probs and entropy from hidden states) on every
backend against float64 formulas: values, gradients of hidden, weight and bias, several row tiles,
softcap and logit scale, per-token temperature, ignore_index, determinism and bad input."""
import pytest
import torch

import kl_kernels


def truth(hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index=-100):
    z = torch.nn.functional.linear(hidden, weight, bias) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature.unsqueeze(-1), -1)
    valid = labels != ignore_index
    logp = torch.where(valid, log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    return logp, entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [(1.0, None), (0.5, 3.0)])
@pytest.mark.parametrize("tensor_temperature", [False, True])
def test_against_float64(backend, dtype, transform, tensor_temperature):
    logit_scale, softcap = transform
    batch, length, hidden_size, vocab = 3, 17, 24, 1271
    hidden = torch.randn(batch, length + 1, hidden_size).to(dtype)[:, :-1]  # a strided view, as models give
    weight = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5).to(dtype)
    bias = (torch.randn(vocab) * 0.1).to(dtype)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :3] = -100
    temperature = torch.rand(batch, 1) + 0.5 if tensor_temperature else 0.7
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = kl_kernels.linear_token_logprobs(
        leaves[0], leaves[1], labels, bias=leaves[2], temperature=temperature, logit_scale=logit_scale,
        softcap=softcap, return_entropy=True, backend=backend, tile_bytes=vocab * 4 * 3 * 8)  # 8 rows a tile
    g_logp, g_entropy = torch.randn(batch, length), torch.randn(batch, length)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    temp64 = (temperature.double() if tensor_temperature else torch.tensor(temperature, dtype=torch.float64)) \
        * torch.ones(batch, length, dtype=torch.float64)
    logp64, entropy64 = truth(*exact, labels, temp64, logit_scale, softcap)
    (logp64 * g_logp.double() + entropy64 * g_entropy.double()).sum().backward()
    assert logp.dtype == torch.float32 and (logp[0, :3] == 0).all()
    tolerance = 2e-5 if dtype == torch.float32 else 5e-2  # bf16: the matmul itself rounds to bf16
    torch.testing.assert_close(logp.double(), logp64.detach(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(entropy.double(), entropy64.detach(), atol=tolerance, rtol=tolerance)
    for leaf, truth_leaf in zip(leaves, exact):
        assert leaf.grad.dtype == dtype
        scale = truth_leaf.grad.abs().max().item()
        assert (leaf.grad.double() - truth_leaf.grad).abs().max().item() <= tolerance * max(scale, 1.0) * 4


def test_deterministic_and_equal_to_logits_path(backend):
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(301, 16, requires_grad=True)
    labels = torch.randint(0, 301, (40,))

    def run():
        logp = kl_kernels.linear_token_logprobs(hidden, weight, labels, backend=backend, tile_bytes=301 * 12 * 7)
        logp.sum().backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        return logp.detach(), grads

    first, second = run(), run()
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    logits_path = kl_kernels.token_logprobs(hidden.detach() @ weight.detach().t(), labels, backend=backend)
    torch.testing.assert_close(first[0], logits_path, atol=1e-5, rtol=1e-5)


def test_bad_input():
    hidden, weight, labels = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="hidden"):
        kl_kernels.linear_token_logprobs(torch.randn(4, 9), weight, labels)
    with pytest.raises(ValueError, match="bias"):
        kl_kernels.linear_token_logprobs(hidden, weight, labels, bias=torch.randn(10))
    with pytest.raises(TypeError, match="weight"):
        kl_kernels.linear_token_logprobs(hidden, weight.long(), labels)
    with pytest.raises(ValueError, match="labels"):
        kl_kernels.linear_token_logprobs(hidden, weight, labels.clamp(max=0) + 11)
    with pytest.raises(ValueError, match="softcap"):
        kl_kernels.linear_token_logprobs(hidden, weight, labels, softcap=0.0)
    with pytest.raises(NotImplementedError, match="process_group"):
        kl_kernels.linear_token_logprobs(hidden, weight, labels, process_group=object())
