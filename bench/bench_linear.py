"""pytest-benchmark suite of the KL penalty from hidden states at small shapes:
`pytest bench --benchmark-only`. The providers of `kl-bench --linear` (eager F.linear + penalty,
torch.compile of it, TRL's chunked head when installed, logits+<backend>, linear_kl_penalty per
backend), forward and forward+backward; each case first checks its per-sequence sums against
float64, so a fast wrong provider fails instead of ranking.
"""
import pytest
import torch

from kl_kernels.tools import bench_linear, timing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = bench_linear.default_providers(DEVICE)
SHAPES = [(256, 256, 8192)]  # (tokens, hidden, vocab)


@pytest.fixture(scope="module")
def providers():
    return {name: bench_linear.make_provider(name, "k1") for name in PROVIDERS}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,hidden,vocab", SHAPES, ids=[f"{t}x{h}x{v}" for t, h, v in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_linear_kl(benchmark, providers, provider, tokens, hidden, vocab, dtype, mode):
    fn = providers[provider]
    torch.manual_seed(tokens + vocab)
    inputs = bench_linear.make_inputs(tokens, hidden, vocab, dtype, DEVICE)
    with torch.no_grad():
        got = fn(*inputs).double()
        want = bench_linear.eager_linear(*(t.double() if i < 4 else t for i, t in enumerate(inputs)),
                                         dtype=torch.float64)
    # bf16: every provider's matmul rounds its logits to bf16 (2^-9 relative), and a sequence sum of
    # 256 log-ratios moves with them: measured up to 0.09 from float64 over three draws, for eager,
    # TRL and ours alike (within 1e-5 of each other); 3x that is the bound
    tolerance = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=0.0, atol=0.3)
    torch.testing.assert_close(got, want, **tolerance)
    timing.run_benchmark(benchmark, timing.make_step(fn, inputs, mode, leaves=2), DEVICE,
                        f"linear {tokens}x{hidden}x{vocab} {str(dtype)[6:]} {mode}")
