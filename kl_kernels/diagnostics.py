"""The bands of shared kl-guide.md, made checkable on a real run (docs/contract.md section 3: diagnose)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# kl-guide.md: healthy per-token KL 0.01-0.05, per-sequence total 1-6
KL_PER_TOKEN_HEALTHY = (0.01, 0.05)
KL_PER_SEQUENCE_HEALTHY = (1.0, 6.0)

_COEF_MESSAGES = {
    "no-brake": "k_kl {v:g} is in [0, 0.01): almost no brake; the policy drifts fast, hacks the reward "
                "and stops sounding human. Raise it (0.05-0.2 is the usual first choice).",
    "loose": "k_kl {v:g} is in [0.01, 0.05): loose, much exploration; fine early or for small models and "
             "weak reward models, but watch for loss of control late in training.",
    "sweet-spot": "k_kl {v:g} is in [0.05, 0.2]: the industrial sweet spot; it improves without blowing up "
                  "and keeps language ability.",
    "tight": "k_kl {v:g} is in (0.2, 1]: tight and conservative; reward rises slowly. Right for very strong "
             "reward models or safety-critical tasks.",
    "frozen": "k_kl {v:g} is in (1, 10]: the policy is almost frozen and PPO is wasted unless rewards are "
              "huge or the policy is prone to collapse. Lower it.",
    "out-of-range": "k_kl {v:g} is above 10: a per-token log-ratio of ~2 already costs -20 a token and "
                    "drowns any reward. Lower it into [0.01, 10].",
}


@dataclass
class Diagnosis:
    kl_coef_band: str | None
    kl_per_token_band: str | None
    kl_per_sequence_band: str | None
    advice: str  # "raise", "lower" or "keep" (for k_kl)
    messages: list[str] = field(default_factory=list)


def _figure(value, arg: str, *, nonnegative: bool):
    if value is None:
        return None
    try:
        number = float(value)  # numbers, 0-dim tensors, numpy scalars
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a number or None, got {type(value).__name__}") from None
    if isinstance(value, bool) or not math.isfinite(number) or (nonnegative and number < 0):
        raise ValueError(f"{arg} must be a finite number{' >= 0' if nonnegative else ''}, got {value!r}")
    return number


def kl_coef_band(kl_coef: float) -> str:
    if kl_coef < 0.01:
        return "no-brake"
    if kl_coef < 0.05:
        return "loose"
    if kl_coef <= 0.2:
        return "sweet-spot"
    if kl_coef <= 1:
        return "tight"
    if kl_coef <= 10:
        return "frozen"
    return "out-of-range"


def kl_band(kl: float, healthy: tuple[float, float]) -> str:
    low, high = healthy
    return "too-low" if kl < low else "too-high" if kl > high else "healthy"


def diagnose(kl_coef=None, kl_per_token=None, kl_per_sequence=None) -> Diagnosis:
    """Place k_kl and the measured KL in the kl-guide bands and advise on k_kl.

    Measured KL governs the advice: any too-high -> raise, else any too-low -> lower, else keep.
    With k_kl alone: no-brake -> raise, frozen or out-of-range -> lower, else keep.
    """
    coef = _figure(kl_coef, "kl_coef", nonnegative=True)
    per_token = _figure(kl_per_token, "kl_per_token", nonnegative=False)
    per_sequence = _figure(kl_per_sequence, "kl_per_sequence", nonnegative=False)
    coef_band = None if coef is None else kl_coef_band(coef)
    token_band = None if per_token is None else kl_band(per_token, KL_PER_TOKEN_HEALTHY)
    sequence_band = None if per_sequence is None else kl_band(per_sequence, KL_PER_SEQUENCE_HEALTHY)
    messages = []
    if coef_band is not None:
        messages.append(_COEF_MESSAGES[coef_band].format(v=coef))
    for name, value, band, (low, high) in (
        ("per-token", per_token, token_band, KL_PER_TOKEN_HEALTHY),
        ("per-sequence", per_sequence, sequence_band, KL_PER_SEQUENCE_HEALTHY),
    ):
        if band == "too-high":
            messages.append(f"KL {name} {value:g} is above the healthy [{low:g}, {high:g}]: the policy moves "
                            "away from the reference too fast. Raise k_kl.")
        elif band == "too-low":
            messages.append(f"KL {name} {value:g} is below the healthy [{low:g}, {high:g}]: the policy barely "
                            "moves. Lower k_kl.")
        elif band == "healthy":
            messages.append(f"KL {name} {value:g} is in the healthy [{low:g}, {high:g}].")
    measured = [band for band in (token_band, sequence_band) if band is not None]
    if measured:
        advice = "raise" if "too-high" in measured else "lower" if "too-low" in measured else "keep"
    elif coef_band == "no-brake":
        advice = "raise"
    elif coef_band in ("frozen", "out-of-range"):
        advice = "lower"
    else:
        advice = "keep"
    if not messages:
        messages.append("Nothing to diagnose: give kl_coef, kl_per_token or kl_per_sequence.")
    return Diagnosis(coef_band, token_band, sequence_band, advice, messages)
