"""Drop-in replacements for the KL-penalty code of verl, TRL and OpenRLHF (SPEC section 7).

Each module has the trainer's own function names, signatures, defaults and return dtypes, computed
on the fused path, and a `patch()` that swaps them into the installed trainer (see _patching.py).
"""
