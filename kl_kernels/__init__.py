"""kl_kernels: the fused KL penalty pass of RLHF trainers (PPO, GRPO, RLOO).

Public names only (docs/contract.md); nothing is computed at import.
"""
from .aggregation import aggregate, kl_rewards
from .api import KLPenaltyOutput, kl_penalty, token_logprobs
from .controllers import AdaptiveKLController, FixedKLController
from .diagnostics import Diagnosis, diagnose
from .dispatch import BackendInfo, available_backends
from .estimators import kl_from_logprobs
from .linear import linear_kl_penalty, linear_token_logprobs
from .replay import (kept_ids_from_bitmask, kept_ids_from_csr, kept_ids_from_lists, kept_ids_from_mask,
                     kept_ids_from_sampler)

__all__ = [
    "AdaptiveKLController", "BackendInfo", "Diagnosis", "FixedKLController", "KLPenaltyOutput",
    "aggregate", "available_backends", "diagnose", "kept_ids_from_bitmask", "kept_ids_from_csr",
    "kept_ids_from_lists", "kept_ids_from_mask", "kept_ids_from_sampler", "kl_from_logprobs", "kl_penalty", "kl_rewards",
    "linear_kl_penalty",
    "linear_token_logprobs",
    "token_logprobs",
]
__version__ = "0.1.0"
