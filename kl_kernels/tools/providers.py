"""kl-bench's providers from logits: the penalty as trainers write it today (eager, TRL's row loop),
torch.compile of it, the peers when installed (Liger-Kernel, flash-attn) and each kl_kernels backend.
Each provider is fn(logits, ref_logits, labels, mask) -> kl_sum [B].
"""
from __future__ import annotations

import functools
import re

import torch

import kl_kernels
from kl_kernels.dispatch import native_backends
from kl_kernels.estimators import kl_from_logprobs

def masked_kl_sum(logp, ref_logp, mask, estimator):
    """The estimator's per-sequence sum over the mask (selected, never multiplied: NaN stays out)."""
    kl = kl_from_logprobs(logp, ref_logp, estimator=estimator)
    return torch.where(mask != 0, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(-1)


def eager_penalty(logits, ref_logits, labels, mask, estimator="k1", dtype=torch.float32, kept_ids=None):
    """What verl/TRL/OpenRLHF write today (per-sequence masked sum); dtype=float64 is the truth.
    kept_ids: each position's kept set (no -1 here): the softmax over it (sampling replay)."""
    z, ref_z = logits.to(dtype), ref_logits.to(dtype)
    if kept_ids is not None:
        outside = torch.ones_like(z, dtype=torch.bool).scatter_(-1, kept_ids, False)
        z, ref_z = z.masked_fill(outside, float("-inf")), ref_z.masked_fill(outside, float("-inf"))
    log_p = torch.log_softmax(z, dim=-1)
    log_q = torch.log_softmax(ref_z, dim=-1)
    if estimator == "full":
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return torch.where(mask != 0, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(-1)
    index = labels.unsqueeze(-1)
    return masked_kl_sum(log_p.gather(-1, index).squeeze(-1), log_q.gather(-1, index).squeeze(-1), mask, estimator)


def row_looped_logprobs(logits, labels):
    """TRL's selective_log_softmax algorithm: float32 logits gather the label logits and subtract
    a per-row logsumexp computed one sequence at a time; bf16/fp16 logits take a log_softmax in
    their own dtype one sequence at a time (TRL's choice for stability), then gather."""
    index = labels.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        lse = torch.stack([torch.logsumexp(sequence, dim=-1) for sequence in logits])
        return logits.gather(-1, index).squeeze(-1) - lse
    return torch.stack([torch.log_softmax(sequence, -1).gather(-1, i).squeeze(-1) for sequence, i in zip(logits, index)])


def trl_penalty(logits, ref_logits, labels, mask, estimator="k1"):
    return masked_kl_sum(row_looped_logprobs(logits, labels).float(), row_looped_logprobs(ref_logits, labels).float(),
                     mask, estimator)


def liger_penalty(logits, ref_logits, labels, mask, estimator="k1"):
    """Liger-Kernel's log-prob path (liger_kernel.ops.grpo_loss.fused_selective_log_softmax), as
    its GRPO trainer uses it for policy and reference log-probs: forward only (no gradient), and,
    like HF logits, row t predicts labels[t + 1], so it covers T - 1 positions; the error column
    compares it with the float64 truth on those positions (see `shifted`)."""
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    logp = fused_selective_log_softmax(logits, labels, temperature=1.0)
    ref_logp = fused_selective_log_softmax(ref_logits, labels, temperature=1.0)
    return masked_kl_sum(logp, ref_logp, mask[:, 1:], estimator)


def flash_attn_penalty(logits, ref_logits, labels, mask, estimator="k1"):
    """flash-attn's Triton cross-entropy (the loss is -logp; it has a fused backward)."""
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def logprobs(z):
        return -cross_entropy_loss(z.reshape(-1, z.shape[-1]), labels.reshape(-1))[0].view(labels.shape)

    return masked_kl_sum(logprobs(logits), logprobs(ref_logits), mask, estimator)


def shifted(logits, ref_logits, labels, mask):
    return logits[:, :-1], ref_logits[:, :-1], labels[:, 1:], mask[:, 1:]


FORWARD_ONLY = {"liger"}


SAMPLED_ONLY = {"trl", "liger", "flash_attn"}  # providers of label log-probs: no `full`


PEERS = {"trl": "always", "liger": "liger_kernel", "flash_attn": "flash_attn"}


# "<backend>+kept<K>": the backend with kept_ids of K ids per position (sampling replay's cost)
KEPT = re.compile(r"^(?P<backend>\w+)\+kept(?P<width>\d+)$")


def kept_width(name):
    match = KEPT.match(name)
    return int(match["width"]) if match else None


def kept_ids_for(labels, vocab, width):
    """A sampler's kept sets for kl-bench: each position's label and width - 1 other distinct ids (label +
    distinct offsets in [1, V), shifted per position), the same for the same labels shape; O(N K)."""
    generator = torch.Generator().manual_seed(width)
    offsets = torch.randperm(vocab - 1, generator=generator)[:width - 1]
    shifts = torch.randint(0, vocab - 1, (*labels.shape, 1), generator=generator)
    others = (labels.cpu().unsqueeze(-1) + (offsets + shifts) % (vocab - 1) + 1) % vocab
    return torch.cat([labels.unsqueeze(-1), others.to(labels.device)], -1)


SKYRL_CHUNK_SIZE = 1024  # SkyRL 0.4.0's logprobs_chunk_size default (skyrl/train/config/config.py)


@functools.lru_cache(maxsize=1)
def skyrl_scores():
    """SkyRL 0.4.0's sample_support_scores, run from its pinned wheel (tools/wheel_code.py: its package
    needs Python 3.12), or ImportError."""
    from .wheel_code import Engine

    names = ["skyrl.backends.skyrl_train.utils.packed_tensor",
             "skyrl.backends.skyrl_train.distributed.megatron.packing_utils",
             "skyrl.backends.skyrl_train.distributed.megatron.token_metadata",
             "skyrl.backends.skyrl_train.utils.sample_support", "skyrl.backends.skyrl_train.utils.sample_support_replay"]
    return Engine("skyrl", names)[names[-1]].sample_support_scores


def skyrl_penalty(logits, ref_logits, labels, mask, estimator="k1", kept_ids=None, weight=None, ref_weight=None):
    """SkyRL's sample-support scorer for policy and reference (logits, or hidden states with the LM head's
    weight), then the estimator's masked per-sequence sum."""
    scores = skyrl_scores()
    vocab = logits.shape[-1] if weight is None else weight.shape[0]
    support = kept_ids(labels, vocab).to(torch.int32)

    def logprobs(source, head):
        return scores(source, labels, support, vocab_start_index=0, vocab_end_index=vocab, tp_group=None,
                      lm_head_weight=head, chunk_size=SKYRL_CHUNK_SIZE).logprobs

    with torch.no_grad():
        ref_logp = logprobs(ref_logits, ref_weight)
    return masked_kl_sum(logprobs(logits, weight), ref_logp, mask, estimator)


class CaseCache:
    """Values made once per benchmark case and reused by its providers, modes and steps; a new case
    drops the old case's values (they can be [N, V] tensors)."""

    def __init__(self):
        self.case, self.values = None, {}

    def get(self, case, key, make):
        if case != self.case:
            self.case, self.values = case, {}
        if key not in self.values:
            self.values[key] = make()
        return self.values[key]


def kept_ids_once(width):
    """kept_ids(labels, vocab) -> kept_ids_for(labels, vocab, width), made once per case (the first,
    untimed step) and reused by the timed ones."""
    cache = CaseCache()
    return lambda labels, vocab: cache.get((labels.data_ptr(), tuple(labels.shape), vocab), width,
                                           lambda: kept_ids_for(labels, vocab, width))


def make_provider(name, estimator):
    if kept_width(name) and KEPT.match(name)["backend"] == "skyrl":
        return functools.partial(skyrl_penalty, estimator=estimator, kept_ids=kept_ids_once(kept_width(name)))
    if kept_width(name):
        backend, kept_ids = KEPT.match(name)["backend"], kept_ids_once(kept_width(name))

        def replayed(logits, ref_logits, labels, mask):
            return kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator=estimator,
                                         validate=False, backend=backend,
                                         kept_ids=kept_ids(labels, logits.shape[-1])).kl_sum
        return replayed
    if name == "eager":
        return functools.partial(eager_penalty, estimator=estimator)
    if name == "compile":
        # each dtype, shape and grad mode compiles anew; past Dynamo's default limit of 8 it would
        # silently run eager, so the limit is raised for a sweep
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, limit, max(getattr(config, limit), 256))
        return torch.compile(functools.partial(eager_penalty, estimator=estimator))
    if name in PEERS:
        return functools.partial({"trl": trl_penalty, "liger": liger_penalty, "flash_attn": flash_attn_penalty}[name],
                                 estimator=estimator)
    return lambda logits, ref_logits, labels, mask: kl_kernels.kl_penalty(
        logits, labels, ref_logits=ref_logits, mask=mask, estimator=estimator, validate=False, backend=name).kl_sum


def default_providers(device):
    # `reference` (the pure-PyTorch truth, slow by design) only when asked for
    names = ["eager", "trl", "compile"] + native_backends(device.type)
    if device.type == "cuda":
        for name, module in PEERS.items():
            if module != "always":
                try:
                    __import__(module)
                    names.append(name)
                except ImportError:
                    pass
    return names
