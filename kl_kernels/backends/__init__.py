"""The backends: each implements the kernel contract (contract.FusedPass, and contract.OnePass for the
compiled ones) without importing the registry (dispatch.py), which loads them by name.

reference.py  the pure-PyTorch truth, runs anywhere
adapter.py    the one input adapter in front of every compiled backend (C++ and Triton ops)
extension.py  the C++ CPU and CUDA kernels (kl_kernels._C and kl_kernels._cpu_<isa>)
triton/       the Triton kernels
"""
