"""How many kernels kl_penalty launches, counted with torch.profiler on CPU: the top-level aten:: and
kl_kernels:: ops of one forward and one backward that do work, for the `cpu` backend and the `triton`
backend (interpreted: its ops are counted, not the kernels they launch). Views, and a `.to()` /
`.contiguous()` that returns its input, move no data and launch nothing on a GPU, so they are not
counted. Issue 14's contract is at most 2 launches each way; each backend does each way in one op
(estimator, masks and sums in kl_penalty_fwd, the chain from all six outputs in kl_penalty_bwd).
The ceilings are today's counts: a change that adds a launch fails here."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kl_kernels

from conftest import BACKENDS_UNDER_TEST, GPU_BACKENDS

FORWARD_CEILING = BACKWARD_CEILING = 1  # the contract allows 2; this is what the cpu backend does

# metadata-only ops: a view of the same storage (shape, strides), never a kernel
_VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::flatten", "aten::unsqueeze", "aten::squeeze",
          "aten::expand", "aten::detach", "aten::alias", "aten::as_strided", "aten::_unsafe_view", "aten::t",
          "aten::transpose", "aten::permute", "aten::select", "aten::slice", "aten::lift_fresh"}
_MAYBE_COPIES = {"aten::to", "aten::contiguous"}  # work only when they call a copy below them


def _ours(event):
    return event is not None and event.name.startswith(("aten::", "kl_kernels::"))


def _launches(prof):
    events = [e for e in prof.events() if _ours(e)]
    has_child = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
    top = [e for e in events if not _ours(e.cpu_parent)]
    return [e.name for e in top
            if e.name not in _VIEWS and not (e.name in _MAYBE_COPIES and id(e) not in has_child)]


def test_the_count_sees_work_and_skips_views():
    """The counter itself: a copy counts, views and no-op conversions do not."""
    x = torch.randn(4, 5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        x.view(20).reshape(5, 4).to(torch.float32).t()
        x.to(torch.float64)
        x.exp()
    assert _launches(prof) == ["aten::to", "aten::exp"]


CASES = [(layout, estimator, ref) for layout in ("padded", "packed")
         for estimator in ("k1", "k3", "low_var_kl", "k3+", "full") for ref in ("logits", "logprobs")
         if not (estimator == "full" and ref == "logprobs")]


# the backend's one-pass ops; on a GPU the triton op is two kernel launches forward (rows, then
# per-sequence sums) and one backward, as is the cuda op (bench/gpu_check.sh counts them there)
ONE_PASS_OPS = {"cpu": ("kl_kernels::kl_penalty_fwd", "kl_kernels::kl_penalty_bwd"),
                "cuda": ("kl_kernels::kl_penalty_fwd", "kl_kernels::kl_penalty_bwd"),
                "triton": ("kl_kernels::triton_kl_penalty_fwd", "kl_kernels::triton_kl_penalty_bwd")}
GPU_KERNEL_CEILINGS = (2, 1)  # on a GPU: kernels launched forward (rows, sums) and backward (rows)


def _gpu_kernels(prof):
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("backend", [b for b in ONE_PASS_OPS if b in BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("layout,estimator,ref", CASES)
def test_kl_penalty_is_one_op_each_way(layout, estimator, ref, backend):
    on_gpu = backend in GPU_BACKENDS and torch.cuda.is_available()  # else triton runs interpreted on CPU
    with torch.device("cuda" if on_gpu else "cpu"):
        _count_launches(layout, estimator, ref, backend, on_gpu)


def _count_launches(layout, estimator, ref, backend, on_gpu):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if layout == "padded":
        shape, extra = (2, 8), {}
    else:
        shape, extra = (16,), dict(cu_seqlens=torch.tensor([0, 7, 16], dtype=torch.int32))
    logits = torch.randn(*shape, 100, requires_grad=True)
    reference = dict(ref_logits=torch.randn(*shape, 100)) if ref == "logits" else dict(ref_logprobs=-torch.rand(shape))
    kwargs = dict(mask=torch.rand(shape) > 0.2, estimator=estimator, return_entropy=True, validate=False,
                  backend=backend, **reference, **extra)
    kl_kernels.kl_penalty(logits, torch.randint(0, 100, shape), **kwargs)  # warm: first-call work is not counted
    labels = torch.randint(0, 100, shape)
    with profile(activities=activities) as forward:
        out = kl_kernels.kl_penalty(logits, labels, **kwargs)
    # every differentiable output gets an upstream gradient (made before the count starts)
    outputs = [out.logprobs, out.kl, out.penalty, out.kl_sum, out.kl_mean, out.entropy]
    upstream = [torch.rand_like(t) for t in outputs]
    with profile(activities=activities) as backward:
        torch.autograd.backward(outputs, upstream)
    fwd_op, bwd_op = ONE_PASS_OPS[backend]
    assert _launches(forward) == [fwd_op] * FORWARD_CEILING, _launches(forward)
    assert _launches(backward) == [bwd_op] * BACKWARD_CEILING, _launches(backward)
    if on_gpu:
        assert len(_gpu_kernels(forward)) <= GPU_KERNEL_CEILINGS[0], _gpu_kernels(forward)
        assert len(_gpu_kernels(backward)) <= GPU_KERNEL_CEILINGS[1], _gpu_kernels(backward)


@pytest.mark.parametrize("backend", [b for b in ONE_PASS_OPS if b in BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_loss_of_sums_is_one_op_backward(layout, backend):
    """Issue 34: a loss that sums outputs (`out.kl_sum.sum()` and the like) hands the backward expanded
    upstream gradients (stride 0); the kernels read them by their strides, so nothing is copied before
    the one backward op (each copy was a launch on a GPU). The gradient equals the one from contiguous
    upstream gradients of the same values."""
    on_gpu = backend in GPU_BACKENDS and torch.cuda.is_available()
    with torch.device("cuda" if on_gpu else "cpu"):
        shape, extra = ((2, 8), {}) if layout == "padded" else \
            ((16,), dict(cu_seqlens=torch.tensor([0, 7, 16], dtype=torch.int32)))
        logits = torch.randn(*shape, 100, requires_grad=True)
        kwargs = dict(ref_logprobs=-torch.rand(shape), mask=torch.rand(shape) > 0.2, estimator="k3",
                      return_entropy=True, validate=False, backend=backend, **extra)
        labels = torch.randint(0, 100, shape)
        out = kl_kernels.kl_penalty(logits, labels, **kwargs)
        loss = out.kl_sum.sum() + 0.5 * out.kl_mean.sum() + out.logprobs.sum() + out.penalty.sum() + out.entropy.sum()
        with profile(activities=[ProfilerActivity.CPU]) as backward:
            loss.backward()
        ops = [name for name in _launches(backward) if name.startswith("kl_kernels::")]
        assert ops == [ONE_PASS_OPS[backend][1]], _launches(backward)
        assert not any(name in ("aten::contiguous", "aten::clone", "aten::copy_") for name in _launches(backward))
        expanded = logits.grad.clone()
        logits.grad = None
        out = kl_kernels.kl_penalty(logits, labels, **kwargs)
        dense = [torch.ones_like(t) for t in (out.kl_sum, out.logprobs, out.penalty, out.entropy)]
        torch.autograd.backward([out.kl_sum, out.kl_mean, out.logprobs, out.penalty, out.entropy],
                                [dense[0], 0.5 * torch.ones_like(out.kl_mean), *dense[1:]])
        assert torch.equal(logits.grad, expanded)
