"""kl-bench --linear: the KL penalty from hidden states (policy and frozen reference model).

Providers: `eager` (F.linear to [N, V] logits for policy and reference, then the eager penalty of
kl-bench: what a trainer without a fused head runs), `compile` (torch.compile of it), `trl` (TRL's
ChunkedLogProbFunction for both models, then the estimator and masked sum; when TRL is installed),
`logits+<backend>` (F.linear to logits, then kl_penalty on that backend: the matmul plus our fused
kernel on materialised logits) and each backend's `linear_kl_penalty` (tiles of rows, logits never
whole). `<backend>+kept<K>`: sampling replay with K kept ids per position; `skyrl+kept<K>` is SkyRL
0.4.0's own scorer of the same sets (run from its wheel). `<provider>+fp32logits` (eager or a backend; issue 37): float32 logits from bf16/fp16 inputs,
eager by F.linear of float32 copies of the hidden states and the weight (TRL's cast_lm_head_to_fp32),
a backend by logits_dtype=torch.float32. Peak memory is the headline: the logits and their gradient
are what the fused head saves.
"""
from __future__ import annotations

import functools

import torch

import kl_kernels

from kl_kernels.dispatch import native_backends

from .memory import case_inputs_once, step_peak_bytes
from .providers import (KEPT, eager_penalty, kept_ids_for, kept_ids_once, kept_width, masked_kl_sum,
                        skyrl_penalty)
from .timing import make_step

TRL_CHUNK_SIZE = 32768  # the vocabulary tile TRL's trainers pass (trl.trainer.utils, TRL 1.16)
FP32_LOGITS = "+fp32logits"


def make_inputs(tokens, hidden_size, vocab, dtype, device):
    """hidden and weight as a model gives them ([B, T, H], [V, H]); the reference model a perturbed copy."""
    batch = max(1, tokens // 512)
    seq = tokens // batch
    scale = hidden_size ** -0.5
    hidden = torch.randn(batch, seq, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) * (2 * scale)).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn_like(hidden, dtype=torch.float32)).to(dtype)
    ref_weight = (weight.float() + 0.1 * scale * torch.randn_like(weight, dtype=torch.float32)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    mask = (torch.rand(batch, seq, device=device) > 0.1).float()
    return hidden, weight, ref_hidden, ref_weight, labels, mask


def eager_linear(hidden, weight, ref_hidden, ref_weight, labels, mask, estimator="k1", dtype=torch.float32,
                 kept_ids=None, logits_dtype=None):
    """logits_dtype: float32 logits from copies of the operands in it (as TRL's fp32 head), or None."""
    def linear(h, w):
        return torch.nn.functional.linear(h, w) if logits_dtype is None else \
            torch.nn.functional.linear(h.to(logits_dtype), w.to(logits_dtype))

    logits = linear(hidden, weight)
    with torch.no_grad():
        ref_logits = linear(ref_hidden, ref_weight)
    return eager_penalty(logits, ref_logits, labels, mask, estimator=estimator, dtype=dtype, kept_ids=kept_ids)


def trl_linear(hidden, weight, ref_hidden, ref_weight, labels, mask, estimator="k1"):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    def logprobs(h, w):
        flat = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), w, None, labels.reshape(-1), 1.0,
                                            TRL_CHUNK_SIZE, None, 1.0, ())[0]
        return flat.view(labels.shape).float()

    with torch.no_grad():
        ref_logp = logprobs(ref_hidden, ref_weight)
    return masked_kl_sum(logprobs(hidden, weight), ref_logp, mask, estimator)


def skyrl_linear(hidden, weight, ref_hidden, ref_weight, labels, mask, estimator="k1", kept_ids=None):
    """SkyRL 0.4.0's scorer from hidden states (its Megatron path: each pair of position and kept id projected
    in chunks of SKYRL_CHUNK_SIZE pairs), for policy and reference."""
    return skyrl_penalty(hidden, ref_hidden, labels, mask, estimator=estimator, kept_ids=kept_ids, weight=weight,
                         ref_weight=ref_weight)


def logits_then_kernel(hidden, weight, ref_hidden, ref_weight, labels, mask, estimator="k1", backend=None):
    logits = torch.nn.functional.linear(hidden, weight)
    with torch.no_grad():
        ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight)
    return kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator=estimator,
                                 validate=False, backend=backend).kl_sum


def fused_linear(hidden, weight, ref_hidden, ref_weight, labels, mask, estimator="k1", backend=None, kept_ids=None,
                 logits_dtype=None):
    """kept_ids: None, or providers.kept_ids_once(K) (a "<backend>+kept<K>" provider: sampling replay)."""
    return kl_kernels.linear_kl_penalty(
        hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, mask=mask, estimator=estimator,
        validate=False, backend=backend, kept_ids=None if kept_ids is None else kept_ids(labels, weight.shape[0]),
        logits_dtype=logits_dtype).kl_sum


def default_providers(device):
    backends = native_backends(device.type)
    names = ["eager", "compile"]
    try:
        import trl.kernels.chunked_logprob  # noqa: F401
        names.append("trl")
    except ImportError:
        pass
    return names + [f"logits+{name}" for name in backends] + backends


def make_provider(name, estimator):
    if name.endswith(FP32_LOGITS):
        base = name[:-len(FP32_LOGITS)]
        return functools.partial(eager_linear if base == "eager" else fused_linear, estimator=estimator,
                                 logits_dtype=torch.float32, **({} if base == "eager" else dict(backend=base)))
    if name == "eager":
        return functools.partial(eager_linear, estimator=estimator)
    if name == "compile":
        return torch.compile(functools.partial(eager_linear, estimator=estimator))
    if name == "trl":
        return functools.partial(trl_linear, estimator=estimator)
    if name.startswith("logits+"):
        return functools.partial(logits_then_kernel, estimator=estimator, backend=name.split("+", 1)[1])
    if kept_width(name) and KEPT.match(name)["backend"] == "skyrl":
        return functools.partial(skyrl_linear, estimator=estimator, kept_ids=kept_ids_once(kept_width(name)))
    if kept_width(name):
        return functools.partial(fused_linear, estimator=estimator, backend=KEPT.match(name)["backend"],
                                 kept_ids=kept_ids_once(kept_width(name)))
    return functools.partial(fused_linear, estimator=estimator, backend=name)


# one untimed step per provider: a step here is seconds of matmuls, and prepare_case's forward warmed
WARMUP = 1


@functools.lru_cache(maxsize=8)
def _truth(tokens, hidden_size, vocab, dtype, estimator, device, kept_width=None):
    """The float64 penalty of a case's inputs, one sequence at a time (float64 logits of the whole
    batch are 4 GB at N = 4096, V = 128256), computed once for every provider (over the kept sets of
    kept_ids_for(labels, vocab, kept_width) for a "+kept<K>" provider)."""
    inputs = case_inputs(tokens, hidden_size, vocab, dtype, device)
    hidden, weight, ref_hidden, ref_weight, labels, mask = (
        t.double() if t.is_floating_point() and i < 4 else t for i, t in enumerate(inputs))
    kept = None if kept_width is None else kept_ids_for(labels, vocab, kept_width)
    return torch.cat([eager_linear(hidden[b:b + 1], weight, ref_hidden[b:b + 1], ref_weight, labels[b:b + 1],
                                   mask[b:b + 1], estimator=estimator, dtype=torch.float64,
                                   kept_ids=None if kept is None else kept[b:b + 1])
                      for b in range(hidden.shape[0])])


def case_inputs(tokens, hidden_size, vocab, dtype, device):
    torch.manual_seed(tokens * 31 + hidden_size * 7 + vocab)  # every provider of a case sees the same inputs
    return make_inputs(tokens, hidden_size, vocab, dtype, device)


def prepare_case(fn, provider, estimator, inputs, mode):
    """(the row without its times, the step to time) of one provider on a case's inputs."""
    hidden, weight = inputs[:2]
    with torch.no_grad():
        out = fn(*inputs)  # warm-up, compile, and the error check
    tokens, hidden_size, vocab = inputs[-1].numel(), hidden.shape[-1], weight.shape[0]
    truth = _truth(tokens, hidden_size, vocab, hidden.dtype, estimator, hidden.device, kept_width(provider))
    row = dict(provider=provider, estimator=estimator, tokens=tokens, hidden=hidden_size, vocab=vocab,
               dtype=str(hidden.dtype).replace("torch.", ""), mode=mode,
               max_abs_error=(out.double() - truth).abs().max().item())
    return row, make_step(fn, inputs, mode, leaves=2)


def finish_row(row, inputs, timing, bandwidth):
    row.update(zip(("median_ms", "p20_ms", "p80_ms"), timing))
    return row


def peak_extra_bytes(fn, tokens, hidden_size, vocab, dtype, mode, device):
    inputs = case_inputs_once((tokens, hidden_size, vocab, dtype, device),
                              lambda: case_inputs(tokens, hidden_size, vocab, dtype, device))
    return step_peak_bytes(make_step(fn, inputs, mode, leaves=2), device)
