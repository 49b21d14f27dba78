"""kl_penalty's O(N) end, shared by every path that does not run the backend's one-pass ops (the
reference backend, tensor-parallel calls, the hidden-state head): the estimator on selected inputs, the
mask, the penalty and the per-sequence sums (docs/contract.md section 2); and what a penalty call
decides from its arguments before the row pass (PenaltyPlan, made by plan.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import validation as check
from .estimators import estimate, parse_estimator


class KLPenaltyOutput(NamedTuple):
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    penalty: torch.Tensor
    kl_sum: torch.Tensor
    kl_mean: torch.Tensor
    entropy: torch.Tensor | None


def _sequence_sums(values, layout, offsets):
    """Per-sequence sums, each added one value at a time in token order in float64 (segment_reduce)
    and rounded once: a sequence's sum depends on its own tokens only, padded or packed, whatever
    else the batch holds (a padded row's masked positions add exact zeros), as in the kernels' sums.
    (A float32 sum over a 262k-token sequence drifted 7e-5 relative.)"""
    if layout == "padded":
        batch, steps = values.shape
        offsets = torch.arange(batch + 1, device=values.device) * steps
        values = values.reshape(-1)
    return torch.segment_reduce(values.double(), "sum", offsets=offsets, initial=0).to(values.dtype)


class PenaltyPlan(NamedTuple):
    """What kl_penalty and linear_kl_penalty decide before the fused pass, from checked arguments."""
    layout: str  # "padded" ([B, T] labels) or "packed" ([N] labels)
    cu_seqlens: torch.Tensor | None  # packed: as given (None: one sequence); see boundaries
    estimator: object  # estimators.Estimator
    temperature: object  # float, or [N] tensor in the compute dtype
    ignore_index: int
    dtype: torch.dtype  # compute dtype of the outputs


def make_plan(labels, device, dtype, *, source, ref_logprobs, mask, cu_seqlens, kl_coef, estimator,
                  temperature, log_ratio_clamp, kl_clamp, ignore_index, validate, has_ref_model):
    """The checks and choices shared by the logits and hidden-state forms of the penalty.

    source: (name, shape) of the policy input for messages ("logits" or "hidden"); has_ref_model:
    whether the reference comes as logits / hidden states (else ref_logprobs)."""
    name, shape = source
    if labels.dim() == 2:
        layout = "padded"
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is for the packed layout ({name} [N, ...]); got padded {name} "
                             f"of shape {tuple(shape)}")
    elif labels.dim() == 1:
        layout = "packed"
    else:
        last = "V" if name == "logits" else "H"
        raise ValueError(f"{name} must be [B, T, {last}] (padded) or [N, {last}] (packed), got shape {tuple(shape)}")
    if has_ref_model == (ref_logprobs is not None):
        ref_name = "ref_logits" if name == "logits" else "ref_hidden"
        raise ValueError(f"exactly one of {ref_name} or ref_logprobs must be given, got "
                         + ("both" if has_ref_model else "neither"))
    if ref_logprobs is not None:
        check.tensor(ref_logprobs, "ref_logprobs")
        if not ref_logprobs.is_floating_point():
            raise TypeError(f"ref_logprobs must be a floating tensor, got dtype {ref_logprobs.dtype}")
        check.shape(ref_logprobs, labels.shape, "ref_logprobs", "the labels' shape")
    if mask is not None:
        check.real_mask(mask, "mask")
        check.shape(mask, labels.shape, "mask", "the labels' shape")
    n_tokens = labels.numel()
    if cu_seqlens is not None:
        check.integer(cu_seqlens, "cu_seqlens")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D [B+1], got shape {tuple(cu_seqlens.shape)}")
    check.same_device(device, ref_logprobs=ref_logprobs, mask=mask, cu_seqlens=cu_seqlens)
    est = parse_estimator(estimator, log_ratio_clamp, kl_clamp)
    if est.name == "full" and not has_ref_model:
        raise ValueError(f"estimator 'full' needs {'ref_logits' if name == 'logits' else 'ref_hidden'} "
                         "(the exact KL sums over the vocabulary); got ref_logprobs")
    check.nonnegative_coef(kl_coef, "kl_coef", validate)
    ignore_index = check.ignore_index(ignore_index)

    per_sequence = None
    if layout == "packed" and cu_seqlens is not None:
        n_seqs = cu_seqlens.numel() - 1
        if validate:
            check.cu_seqlens_values(cu_seqlens, n_tokens)

        def sequence_of_token():
            offsets = boundaries(cu_seqlens, n_tokens, device)
            positions = torch.arange(n_tokens, device=device)
            return torch.searchsorted(offsets[1:], positions, right=True).clamp_(max=max(n_seqs - 1, 0))
        per_sequence = (n_seqs, sequence_of_token)
    temp = check.temperature(temperature, labels.shape, device, dtype, validate, per_sequence)
    return PenaltyPlan(layout, cu_seqlens if layout == "packed" else None, est, temp, ignore_index, dtype)


def boundaries(cu_seqlens, n_tokens, device):
    """Packed sequence boundaries [S+1]: cu_seqlens made monotone and clamped into [0, N] even
    without validate (no kernel may read out of bounds; the one-pass kernels do the same)."""
    if cu_seqlens is None:
        return torch.tensor([0, n_tokens], dtype=torch.int64, device=device)
    return cu_seqlens.to(torch.int64).clamp(0, n_tokens).cummax(0).values


def outputs(plan, labels, flat_labels, logp, ref_logp, entropy, full_kl, ref_logprobs, mask, kl_coef):
    """The O(N) end of the pass, shared by every backend and both forms: the estimator on selected
    inputs, the mask, the penalty and the per-sequence sums."""
    dtype, device = plan.dtype, logp.device
    labelled = flat_labels != plan.ignore_index
    if ref_logprobs is not None:
        given = ref_logprobs.detach().reshape(-1).to(dtype)
        ref_logp = torch.where(labelled, given, torch.zeros((), dtype=dtype, device=device))
    valid = labelled if mask is None else labelled & (mask.reshape(-1) != 0)
    # select before compute, never multiply: masked and ignored positions feed the estimator safe
    # inputs (log-ratio 0), so neither their NaN nor an overflowing exp reaches a value or a gradient
    zero = torch.zeros((), dtype=dtype, device=device)
    safe = lambda t: None if t is None else torch.where(valid, t, zero)  # noqa: E731
    kl = torch.where(valid, estimate(plan.estimator, safe(logp), safe(ref_logp), safe(full_kl)), zero)
    shape = labels.shape
    if plan.layout == "padded":
        kl_seq, valid_seq = kl.view(shape), valid.view(shape).to(dtype)
    else:
        kl_seq, valid_seq = kl, valid.to(dtype)
    offsets = None if plan.layout == "padded" else boundaries(plan.cu_seqlens, flat_labels.numel(), device)
    kl_sum = _sequence_sums(kl_seq, plan.layout, offsets)
    counts = _sequence_sums(valid_seq, plan.layout, offsets)
    # a sequence with no valid token has kl_sum exactly 0 (selected), so 0 / 1 = 0: no select needed
    kl_mean = kl_sum / counts.clamp(min=1)
    coef = kl_coef.to(device=device, dtype=dtype) if isinstance(kl_coef, torch.Tensor) else float(kl_coef)
    penalty = -coef * kl
    return KLPenaltyOutput(
        logp.view(shape), ref_logp.view(shape), kl.view(shape), penalty.view(shape), kl_sum, kl_mean,
        None if entropy is None else entropy.view(shape))
