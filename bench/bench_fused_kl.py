"""pytest-benchmark suite of the fused KL pass at small shapes: `pytest bench --benchmark-only`.

The same providers as kl-bench (eager PyTorch, TRL's row loop, torch.compile, each backend this
machine runs natively; no Triton interpreter), forward and forward+backward. Each case first
checks its per-sequence sums against float64, so a fast wrong provider fails instead of ranking.
`pytest bench --benchmark-disable` runs every case once as a plain test.
"""
import pytest
import torch

import kl_kernels
from kl_kernels import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NATIVE = [b.name for b in kl_kernels.available_backends()
          if b.available and (b.name == "reference" or (b.name == "cpu") == (DEVICE.type == "cpu"))]
PROVIDERS = ["eager", "trl", "compile", *NATIVE]
SHAPES = [(512, 4096), (1024, 32000)]  # (tokens, vocab)


@pytest.fixture(scope="module")
def providers():
    return {name: bench.make_provider(name, "k1") for name in PROVIDERS}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,vocab", SHAPES, ids=[f"{t}x{v}" for t, v in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_fused_kl(benchmark, providers, provider, tokens, vocab, dtype, mode):
    fn = providers[provider]
    inputs = bench.make_inputs(tokens, vocab, dtype, DEVICE)
    with torch.no_grad():
        got = fn(*inputs).double()
    want = bench.eager_penalty(*inputs, dtype=torch.float64)
    if provider == "trl" and dtype != torch.float32:
        # TRL takes the log-softmax in bf16 itself: held to 2x the error of PyTorch in that dtype
        in_dtype = (bench.eager_penalty(*inputs, dtype=dtype).double() - want).abs().max()
        assert (got - want).abs().max() <= 2 * in_dtype
    else:
        # every provider reads the same rounded inputs; float32 accumulation is the error left
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    step = bench.make_step(fn, inputs, mode)
    step.prepare()
    step.run()  # warm-up (and compile)
    benchmark.group = f"{tokens}x{vocab} {str(dtype)[6:]} {mode}"

    def run():
        step.prepare()
        step.run()
        bench._sync(DEVICE)

    benchmark(run)
