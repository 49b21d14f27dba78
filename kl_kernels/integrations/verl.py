"""verl's KL-penalty functions on the fused path.

Swap them in with `kl_kernels.integrations.verl.patch()` (a context manager, or call
`.restore()` on what it returns). Semantics follow verl.trainer.ppo.core_algos and
verl.utils.torch_functional; the differences are listed in the README's integration section:
log-probs and entropy are float32 for every logits dtype (verl's flash-attn path, the one GPU
runs take), and the `+` names work (verl's kl_penalty_forward rejects them at some versions).
"""
from __future__ import annotations

import torch

from .. import controllers, estimators
from ..api import token_logprobs
from ._patching import Patch

# verl's names -> ours. verl clamps `k3` exactly like `low_var_kl` (log ratio to [-20, 20],
# the estimate to [-10, 10]), where SPEC's k3 is unclamped.
_ESTIMATORS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl",
               "k3": "low_var_kl"}


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty) -> torch.Tensor:
    """verl's per-token KL estimate. A trailing `+` keeps the estimate's value with the gradient of
    k2 (straight through); `full` needs the logits and raises NotImplementedError, as in verl."""
    base, straight_through = (kl_penalty[:-1], True) if kl_penalty.endswith("+") else (kl_penalty, False)
    if base not in _ESTIMATORS:
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} is not one of {', '.join(_ESTIMATORS)} "
                                  "(optionally with a trailing '+'); 'full' needs the logits: use kl_kernels.kl_penalty")
    name = _ESTIMATORS[base] + ("+" if straight_through and _ESTIMATORS[base] != "k2" else "")
    return estimators.kl_from_logprobs(logprob, ref_logprob, estimator=name)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    # select before weighting: NaN where mask is 0 never reaches the sum
    return (torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)) * mask).sum(axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    """verl's masked mean: the masked sum over (mask count + 1e-8)."""
    return masked_sum(values, mask, axis) / (mask.sum(axis) + 1e-8)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """verl's loss aggregation, with its data-parallel denominators:
    token-mean = masked sum / batch_num_tokens * dp_size; seq-mean-token-sum and -token-mean =
    sum over sequences with a valid token / global_batch_size * dp_size (each defaulting to this
    micro-batch's counts); seq-mean-token-sum-norm = sum of token sums / loss_scale_factor
    (default: the mask width)."""
    if loss_agg_mode == "token-mean":
        tokens = loss_mask.sum() if batch_num_tokens is None else batch_num_tokens
        return masked_sum(loss_mat, loss_mask) / tokens * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        seq_losses = masked_sum(loss_mat, loss_mask, -1)
        counts = loss_mask.sum(-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq_losses = seq_losses / (counts + 1e-8)
        seq_mask = (counts > 0).float()
        sequences = seq_mask.sum() if global_batch_size is None else global_batch_size
        return masked_sum(seq_losses, seq_mask) / sequences * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return masked_sum(loss_mat, loss_mask) / scale
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """Label log-probs, float32, fused; inplace_backward=True (verl's default, as with its flash-attn
    path) writes the gradient over the logits, which verl never reads again."""
    return token_logprobs(logits, labels, inplace_backward=inplace_backward, validate=False)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row, float32, fused (one read of the logits, differentiable)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # any label: only H is used
    return token_logprobs(logits, labels, return_entropy=True, validate=False)[1]


# verl's controllers have the same constructor, .value, .target, .horizon and update(current_kl, n_steps)
AdaptiveKLController = controllers.AdaptiveKLController
FixedKLController = controllers.FixedKLController

_TARGETS = {
    "verl.trainer.ppo.core_algos": {"kl_penalty": kl_penalty, "agg_loss": agg_loss,
                                    "AdaptiveKLController": AdaptiveKLController,
                                    "FixedKLController": FixedKLController},
    "verl.utils.torch_functional": {"logprobs_from_logits": logprobs_from_logits,
                                    "entropy_from_logits": entropy_from_logits,
                                    "masked_mean": masked_mean, "masked_sum": masked_sum},
}


def patch() -> Patch:
    """Swap these functions into the installed verl; restores on exit (ImportError without verl)."""
    return Patch("verl", _TARGETS)
