"""SPEC section 6 on the CPU: no [N, V] temporary. Measured as the resident high-water mark of a
fresh process, since the CPU allocator has no peak counter."""
import subprocess
import sys
import textwrap

import pytest

import kl_kernels

SCRIPT = textwrap.dedent("""
    import resource, sys, torch, kl_kernels
    torch.set_num_threads(1)
    N, V = 4096, 8192  # 128 MiB of float32 logits each
    logits = torch.randn(N, V).requires_grad_(True)
    ref_logits = torch.randn(N, V)
    labels = torch.randint(0, V, (N,))
    warm = kl_kernels.kl_penalty(logits[:8], labels[:8], ref_logits=ref_logits[:8], backend=sys.argv[1])
    warm.kl_sum.sum().backward()
    logits.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, estimator=sys.argv[2],
                                return_entropy=True, backend=sys.argv[1])
    forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (out.kl_sum.sum() + out.entropy.sum()).backward()
    backward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((forward - base) * 1024, (backward - forward) * 1024)
""")


@pytest.mark.parametrize("estimator", ["k3", "full"])
# the CPU backends (the GPU ones are measured by kl-bench with max_memory_allocated)
@pytest.mark.parametrize("backend", [b.name for b in kl_kernels.available_backends()
                                     if b.available and b.name in ("reference", "cpu")])
def test_peak_memory(backend, estimator):
    result = subprocess.run([sys.executable, "-c", SCRIPT, backend, estimator], capture_output=True, text=True,
                            check=True)
    forward_extra, backward_extra = map(int, result.stdout.split())
    logits_bytes = 4096 * 8192 * 4
    # eager PyTorch would hold at least one [N, V] float32 log-softmax per logits tensor (1x-2x)
    assert forward_extra < 0.35 * logits_bytes, forward_extra / logits_bytes
    # the backward may add the gradient itself (1x) and one block
    assert backward_extra < 1.35 * logits_bytes, backward_extra / logits_bytes

