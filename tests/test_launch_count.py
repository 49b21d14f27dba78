"""How many operators (kernel launches on a GPU) kl_penalty runs, counted with torch.profiler on the
`cpu` backend: the top-level aten:: and kl_kernels:: ops of one forward and one backward. Issue 14's
goal is at most 2 each (estimator, masks and sums inside the kernels); today the O(N) epilogue is
PyTorch ops. The ceilings are today's counts (torch 2.13): this test fails if a change adds launches,
and its ceilings come down as the one-pass work lands."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kl_kernels

from conftest import BACKENDS_UNDER_TEST

# (layout, estimator) -> (forward ops, backward ops), measured at commit 4a5f323
CEILINGS = {("padded", "k1"): (26, 12), ("padded", "k3"): (33, 19), ("padded", "full"): (26, 12),
            ("packed", "k1"): (31, 13), ("packed", "k3"): (38, 20), ("packed", "full"): (31, 13)}


def _top_level_ops(prof):
    ours = lambda event: event is not None and event.name.startswith(("aten::", "kl_kernels::"))  # noqa: E731
    return [e.name for e in prof.events() if ours(e) and not ours(e.cpu_parent)]


@pytest.mark.skipif("cpu" not in BACKENDS_UNDER_TEST, reason="the cpu backend is not built")
@pytest.mark.parametrize("layout,estimator", list(CEILINGS))
def test_operator_count_does_not_grow(layout, estimator):
    if layout == "padded":
        shape, extra = (2, 8), {}
    else:
        shape, extra = (16,), dict(cu_seqlens=torch.tensor([0, 7, 16]))
    logits = torch.randn(*shape, 100, requires_grad=True)
    kwargs = dict(ref_logits=torch.randn(*shape, 100), mask=torch.rand(shape) > 0.2, estimator=estimator,
                  validate=False, backend="cpu", **extra)
    kl_kernels.kl_penalty(logits, torch.randint(0, 100, shape), **kwargs)  # warm: first-call work is not counted
    labels = torch.randint(0, 100, shape)
    with profile(activities=[ProfilerActivity.CPU]) as forward:
        out = kl_kernels.kl_penalty(logits, labels, **kwargs)
    loss = out.kl_sum.sum() + out.kl_mean.sum()
    with profile(activities=[ProfilerActivity.CPU]) as backward:
        loss.backward()
    counts = len(_top_level_ops(forward)), len(_top_level_ops(backward))
    assert "kl_kernels::fused_kl_fwd" in _top_level_ops(forward) and "kl_kernels::fused_kl_bwd" in _top_level_ops(backward)
    assert counts[0] <= CEILINGS[layout, estimator][0] and counts[1] <= CEILINGS[layout, estimator][1], \
        (counts, _top_level_ops(forward), _top_level_ops(backward))
