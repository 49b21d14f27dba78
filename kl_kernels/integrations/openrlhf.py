"""OpenRLHF's O(N x V) functions on the fused path.

`patch()` wraps, in openrlhf.models.utils (and openrlhf.models.actor, which imported them by
name): `log_probs_from_logits` and `compute_entropy`. Kept from OpenRLHF: log_probs_from_logits
divides the caller's logits by the temperature in place (later code reads them divided) and
returns the logits' dtype; compute_entropy returns the logits' dtype.

Left to OpenRLHF: compute_approx_kl, compute_reward, masked means and the losses (O(N) work on
log-probs).
"""
from __future__ import annotations

from ._patching import (Patch, Replacement, entropy_in_logits_dtype, fused_backend, fused_rows, labels_for,
                        real_temperature)

TESTED = ("0.11.2", "0.12.0")  # >= first, < second


def _log_probs_from_logits(a, original):
    logits, labels = a["logits"], a["labels"]
    temperature = real_temperature(a.get("temperature", 1.0))
    fused_backend(logits)  # every check that can fall back happens before the in-place division
    labels_for(logits, labels)
    if temperature != 1.0:
        logits.div_(temperature)  # OpenRLHF's side effect, kept
    return fused_rows(logits, labels).to(logits.dtype)


LEFT_ALONE = {
    "openrlhf.models.utils.compute_approx_kl/compute_reward/masked_mean": "O(N) work on log-probs",
    "openrlhf.models.loss": "O(N)",
}


def patch(quiet: bool = False) -> Patch:
    """Wrap OpenRLHF's O(N x V) functions; restores on exit. ImportError without openrlhf; a
    warning outside the tested versions."""
    utils = "openrlhf.models.utils"
    return Patch("openrlhf", TESTED, [
        Replacement(utils, "log_probs_from_logits", _log_probs_from_logits, ("logits", "labels", "temperature")),
        Replacement(utils, "compute_entropy", entropy_in_logits_dtype, ("logits",)),
    ], LEFT_ALONE, quiet=quiet)
