"""Triton kernels, one file per fused op (fused_kl.py). Imported only by dispatch.py's loader."""
