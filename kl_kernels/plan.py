"""The one prologue of the four public functions (token_logprobs, kl_penalty, linear_token_logprobs,
linear_kl_penalty): their checked arguments made into a Plan - the backend, the row pass's arguments,
the tensor-parallel shard, the kept set and, for a penalty, its PenaltyPlan.

The order is the same for all four: the checks of the caller's own inputs (logits, or hidden states
and weights), the value checks only where validate=True and there are values, the temperature (or the
penalty's plan, which holds it), kept_ids' kind and shape, the backend; every check inside
sharding.checks, so a rank that fails one still joins its peers' header exchange. Then the header
exchange itself (sharding.vocab_shard), which makes the labels and the kept set the kernels read.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import penalty as penalty_module
from . import replay, sharding
from . import validation as check
from .contract import PassArgs, compute_dtype
from .dispatch import select_backend


class Plan(NamedTuple):
    backend: object  # the chosen dispatch.Backend (its impl runs the row pass)
    args: PassArgs  # logits / ref_logits None: each Function takes its own as autograd inputs
    kept: replay.KeptSet | None  # the sampler's kept sets (this rank's part), or None
    penalty: penalty_module.PenaltyPlan | None  # a penalty's layout, estimator and sums; None for log-probs


def make(function: str, *, process_group, device, labels, validate: bool, check_inputs: Callable[[], tuple],
         temperature, ignore_index, return_entropy, kept_ids, backend, penalty: dict | None = None,
         transform: dict | None = None) -> Plan:
    """The Plan of one call. check_inputs() checks the caller's own inputs and returns (the dtypes the
    backend must serve, the source tensor - logits or hidden states: its values are what validate=True
    reads, its dtype sets the compute dtype - and this rank's vocabulary size); penalty: the penalty's own
    arguments (penalty.make_plan), None for log-probs; transform: the hidden-state head's logit_scale and
    softcap, compared across ranks like every other option."""
    with sharding.checks(process_group, device, validate):
        dtypes, values, vocab = check_inputs()
        dtype = values.dtype
        validate = validate and check.has_values(values)
        plan = None
        if penalty is not None:
            plan = penalty_module.make_plan(labels, device, compute_dtype(dtype), temperature=temperature,
                                            ignore_index=ignore_index, validate=validate, **penalty)
            ignore_index, temp = plan.ignore_index, plan.temperature
        else:
            ignore_index = check.ignore_index(ignore_index)
            temp = check.temperature(temperature, labels.shape, device, compute_dtype(dtype), validate)
        if kept_ids is not None:
            replay.check_kept_ids(kept_ids, labels, device)
        chosen = select_backend(backend, device, dtypes)
    header = dict(return_entropy=bool(return_entropy), ignore_index=ignore_index, temperature=temperature,
                  kept_ids=kept_ids, **(transform or {}))
    if plan is not None:
        header.update(estimator=(*plan.estimator, plan.layout), has_ref=penalty["has_ref_model"],
                      mask=penalty["mask"], cu_seqlens=plan.cu_seqlens)
    shard, flat_labels, kept = sharding.vocab_shard(process_group, device, vocab, validate, function, labels,
                                                    **header)
    return Plan(chosen, PassArgs(None, flat_labels, None, temp, ignore_index, shard), kept, plan)


def device_of(tensor) -> torch.device:
    """The device a call's checks report under (before its first input is known to be a tensor)."""
    return tensor.device if isinstance(tensor, torch.Tensor) else torch.device("cpu")
