"""pytest-benchmark suite of the fused KL pass at small shapes: `pytest bench --benchmark-only`.

The same providers as kl-bench (eager PyTorch, TRL's row loop, torch.compile, each backend this
machine runs natively; no Triton interpreter), forward and forward+backward. Each case first
checks its per-sequence sums against float64, so a fast wrong provider fails instead of ranking.
`pytest bench --benchmark-disable` runs every case once as a plain test.
"""
import pytest
import torch

from kl_kernels.tools import providers as bench_providers, timing
from kl_kernels.dispatch import native_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NATIVE = native_backends(DEVICE.type, kernels_only=False)
PROVIDERS = ["eager", "trl", "compile", *NATIVE]
SHAPES = [(512, 4096), (1024, 32000)]  # (tokens, vocab)


@pytest.fixture(scope="module")
def providers():
    return {name: bench_providers.make_provider(name, "k1") for name in PROVIDERS}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,vocab", SHAPES, ids=[f"{t}x{v}" for t, v in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_fused_kl(benchmark, providers, provider, tokens, vocab, dtype, mode):
    fn = providers[provider]
    torch.manual_seed(tokens + vocab)  # the same inputs for every provider of a shape, run after run
    inputs = timing.make_inputs(tokens, vocab, dtype, DEVICE)
    with torch.no_grad():
        got = fn(*inputs).double()
    want = bench_providers.eager_penalty(*inputs, dtype=torch.float64)
    if provider == "trl" and dtype != torch.float32:
        # TRL rounds each log-prob to bf16 (8 significant bits, a relative error up to 2^-8) and the
        # roundings add up like a random walk over the sequence: bounded by 3 * 2^-8 * the root of
        # the summed squares of the log-probs (measured: at most a third of that over 24 draws)
        logits, ref_logits, labels, mask = inputs
        index = labels.unsqueeze(-1)
        squares = sum(torch.log_softmax(z.double(), -1).gather(-1, index).squeeze(-1) ** 2 for z in (logits, ref_logits))
        assert ((got - want).abs() <= 3 * 2.0**-8 * (squares * mask).sum(-1).sqrt()).all()
    else:
        # every provider reads the same rounded inputs; float32 accumulation is the error left
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    timing.run_benchmark(benchmark, timing.make_step(fn, inputs, mode), DEVICE, f"{tokens}x{vocab} {str(dtype)[6:]} {mode}")
