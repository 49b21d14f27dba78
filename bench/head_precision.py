"""The LM head's precision against an fp32 engine at learning rate 0 (issue 37, docs/performance.md).

The "engine" computes fp32 logits from the same bf16 weights and hidden states (every bf16 x bf16 product
is exact in fp32: an fp32 LM head, as MiniMax-M1 and ScaleRL run it, and vLLM with an fp32 head) and
samples each token from its softmax. The trainer recomputes the tokens' log-probs from the same bf16
model, so every importance ratio is 1 in exact arithmetic; what is left is the head's precision:
  (a) eager: bf16 F.linear (logits rounded to bf16), then a float32 log_softmax, as trainers write it;
  (b) linear_token_logprobs by default (bf16 logits tiles, as F.linear);
  (c) linear_token_logprobs(logits_dtype=torch.float32).
Printed per case: the share of tokens with |ratio - 1| > 1e-3 and the largest |delta logp|.

    python bench/head_precision.py [--tokens 256] [--hidden 1024 4096] [--vocab 32000 128256]
"""
from __future__ import annotations

import argparse

import torch

import kl_kernels


def inputs(tokens: int, hidden_size: int, vocab: int, seed: int = 0):
    """bf16 hidden states (a final norm's output: unit scale) and an LM head whose logits have a standard
    deviation of about 3 (an LM's spread), and the labels the fp32 engine samples."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g).bfloat16()
    weight = (torch.randn(vocab, hidden_size, generator=g) * (3 / hidden_size ** 0.5)).bfloat16()
    engine_logits = hidden.float() @ weight.float().t()
    labels = torch.multinomial(torch.softmax(engine_logits, -1), 1, generator=g).squeeze(-1)
    engine = torch.log_softmax(engine_logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    return hidden, weight, labels, engine


def mismatch(tokens: int, hidden_size: int, vocab: int, seed: int = 0) -> dict:
    """{trainer: (share of tokens with |ratio - 1| > 1e-3, max |delta logp|)} against the fp32 engine."""
    hidden, weight, labels, engine = inputs(tokens, hidden_size, vocab, seed)
    trainers = {
        "eager bf16 F.linear + log_softmax": torch.log_softmax(
            torch.nn.functional.linear(hidden, weight).float(), -1).gather(-1, labels[:, None]).squeeze(-1),
        "linear_token_logprobs (bf16 logits)": kl_kernels.linear_token_logprobs(hidden, weight, labels),
        "linear_token_logprobs(logits_dtype=float32)": kl_kernels.linear_token_logprobs(
            hidden, weight, labels, logits_dtype=torch.float32),
    }
    result = {}
    for name, logp in trainers.items():
        delta = logp.double() - engine.double()
        result[name] = ((delta.exp() - 1).abs().gt(1e-3).double().mean().item(), delta.abs().max().item())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    args = parser.parse_args(argv)
    print(f"| H | V | trainer's log-probs | tokens with abs(ratio - 1) > 1e-3 | max abs(delta logp) |")
    print("| ---: | ---: | --- | ---: | ---: |")
    for hidden_size in args.hidden:
        for vocab in args.vocab:
            for name, (share, largest) in mismatch(args.tokens, hidden_size, vocab).items():
                print(f"| {hidden_size} | {vocab} | {name} | {share:.1%} | {largest:.2e} |", flush=True)


if __name__ == "__main__":
    main()
