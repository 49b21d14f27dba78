"""The fused path inside verl, TRL, OpenRLHF and SkyRL (docs/contract.md section 7).

Each module's `patch()` wraps the trainer's own O(N x V) functions (log-probs and entropy from
logits, the hidden-state heads) and leaves everything O(N) to the trainer; see _patching.py.
"""
