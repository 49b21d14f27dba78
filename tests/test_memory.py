"""docs/contract.md section 6 on the CPU: no [N, V] temporary. Measured as the resident high-water mark of a
fresh process, since the CPU allocator has no peak counter."""
import subprocess
import sys
import textwrap

import pytest

import kl_kernels
from kl_kernels.dispatch import native_backends
from kl_kernels.linear import TILE_BYTES

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
@pytest.mark.parametrize("backend", native_backends("cpu", kernels_only=False))
def test_peak_memory(backend, estimator):
    result = subprocess.run([sys.executable, "-c", SCRIPT, backend, estimator], capture_output=True, text=True,
                            check=True)
    forward_extra, backward_extra = map(int, result.stdout.split())
    logits_bytes = 4096 * 8192 * 4
    # eager PyTorch would hold at least one [N, V] float32 log-softmax per logits tensor (1x-2x)
    assert forward_extra < 0.35 * logits_bytes, forward_extra / logits_bytes
    # the backward may add the gradient itself (1x) and one block
    assert backward_extra < 1.35 * logits_bytes, backward_extra / logits_bytes



LINEAR_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, kl_kernels
    torch.set_num_threads(2)
    N, H, V = 4096, 1024, 128256  # eager: 2.1 GB of float32 logits, 2.1 GB more for their gradient
    # made in place: a freed temporary would raise the high-water mark the measurement starts from
    hidden = torch.randn(N, H).requires_grad_(True)
    weight = torch.randn(V, H).div_(H ** 0.5).requires_grad_(True)
    ref_hidden, ref_weight = torch.randn(N, H), torch.randn(V, H).div_(H ** 0.5)
    labels = torch.randint(0, V, (N,))
    small = torch.randn(64, H)  # warm the kernels and BLAS without a V x H gradient
    kl_kernels.linear_kl_penalty(hidden[:8], small, labels[:8] % 64, ref_hidden=ref_hidden[:8], ref_weight=small,
                                 estimator="k3").kl_sum.sum().backward()
    hidden.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = kl_kernels.linear_kl_penalty(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                       estimator="k3", return_entropy=True, tile_bytes=int(sys.argv[1]))
    forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (out.kl_sum.sum() + out.entropy.sum()).backward()
    backward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((forward - base) * 1024, (backward - base) * 1024)
""")


@pytest.mark.slow  # ~5 TFLOP of matmuls: about a minute on 2 cores
@pytest.mark.skipif(not kl_kernels.available_backends()[1].available, reason="the cpu backend is not built")
def test_linear_peak_memory():
    """docs/contract.md section 9: forward + backward from hidden states at N = 4096, H = 1024, V = 128256 float32
    hold at most the tile budget + O(N x H + V x H) (the gradients) beyond the inputs."""
    tile_bytes = TILE_BYTES  # the default budget
    result = subprocess.run([sys.executable, "-c", LINEAR_SCRIPT, str(tile_bytes)], capture_output=True, text=True,
                            check=True)
    forward_extra, total_extra = map(int, result.stdout.split())
    n_tokens, hidden_size, vocab = 4096, 1024, 128256
    gradients = 4 * (n_tokens * hidden_size + vocab * hidden_size)  # float32 grads of hidden and weight
    logits_bytes = 4 * n_tokens * vocab
    print(f"peak extra: forward {forward_extra / 2**20:.0f} MiB, forward+backward {total_extra / 2**20:.0f} MiB "
          f"(eager logits alone: {logits_bytes / 2**20:.0f} MiB)")
    assert forward_extra < tile_bytes + 16 * 2**20, forward_extra
    assert total_extra < gradients + tile_bytes + 32 * 2**20, total_extra


def test_the_cpu_gradient_cache():
    """The CPU backward's gradient comes from a one-block cache (csrc/cpu/gradient_cache.h): a block is
    handed out again only after the tensor that held it died (two live gradients never share memory), a
    freed one serves the next backward as large or smaller, and empty_cpu_cache gives it back."""
    import torch

    from kl_kernels.tools import _memory as counter

    def gradient(rows, scale):
        logits = torch.randn(rows, 300, dtype=torch.float64)
        labels = torch.randint(0, 300, (rows,))
        x = logits.clone().requires_grad_()
        (kl_kernels.token_logprobs(x, labels, backend="cpu") * scale).sum().backward()
        want = scale * (torch.nn.functional.one_hot(labels, 300) - torch.softmax(logits, -1))
        return x.grad, want

    torch.ops.kl_kernels.empty_cpu_cache()
    counter.track_cpu_memory(True)
    try:
        first, first_want = gradient(64, 1.0)
        second, second_want = gradient(64, 2.0)  # the first is alive: a block of its own
        assert first.data_ptr() != second.data_ptr()
        torch.testing.assert_close(second, second_want)
        freed = second.data_ptr()
        del second
        third, third_want = gradient(32, 3.0)  # smaller: served by the freed block, written anew
        assert third.data_ptr() == freed
        torch.testing.assert_close(third, third_want)
        torch.testing.assert_close(first, first_want)  # untouched by the later backward calls
        del first, third
        live = counter.cpu_memory_stats()[0]
        torch.ops.kl_kernels.empty_cpu_cache()
        assert counter.cpu_memory_stats()[0] <= live - 32 * 300 * 8  # the cached block went back to the allocator
    finally:
        counter.track_cpu_memory(False)
