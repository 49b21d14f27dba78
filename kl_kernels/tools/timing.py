"""kl-bench's timing: inputs, steps (fwd, bwd, fwd+bwd), interleaved medians and the bandwidth they make."""
from __future__ import annotations

import statistics
import time

import torch

from .providers import CaseCache, eager_penalty, kept_ids_for, kept_width, shifted

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


WARMUP = 1  # untimed steps per provider before the timed ones (prepare_case ran a forward already)


def measure(steps, device, repeats, warmup=WARMUP):
    """(median, p20, p80) ms of each step's run(), each after an untimed prepare(). The steps take
    turns, one repeat of each at a time: a slow phase of a busy machine falls on every provider
    alike instead of on whichever ran then."""
    for step in steps:
        for _ in range(warmup):
            step.prepare()
            step.run()
    _sync(device)
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, own in zip(steps, times):
            step.prepare()
            _sync(device)
            start = time.perf_counter()
            step.run()
            _sync(device)
            own.append((time.perf_counter() - start) * 1e3)
    stats = []
    for own in times:
        own.sort()
        pick = lambda q: own[min(len(own) - 1, int(q * len(own)))]  # noqa: E731
        stats.append((statistics.median(own), pick(0.2), pick(0.8)))
    return stats


def read_bandwidth(device):
    """GB/s of one read of a 1 GiB float32 tensor (x.sum()) on the CPU; on a GPU, a
    device-to-device copy (read + write), the floor the issue measures against."""
    x = torch.ones(1 << 28, device=device)
    if device.type == "cuda":
        y = torch.empty_like(x)
        step = Step(lambda: None, lambda: y.copy_(x))
        ms, _, _ = measure([step], device, 10)[0]
        return 2 * x.numel() * 4 / ms / 1e6
    ms, _, _ = measure([Step(lambda: None, lambda: x.sum())], device, 5)[0]
    return x.numel() * 4 / ms / 1e6


def make_inputs(tokens, vocab, dtype, device):
    batch = max(1, tokens // 512)
    seq = tokens // batch
    logits = (torch.randn(batch, seq, vocab, device=device) * 2).to(dtype)
    ref_logits = (logits.float() + torch.randn_like(logits, dtype=torch.float32) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    mask = (torch.rand(batch, seq, device=device) > 0.1).float()
    return logits, ref_logits, labels, mask


class Step:
    def __init__(self, prepare, run):
        self.prepare, self.run = prepare, run


def make_step(fn, inputs, mode, leaves=1):
    """fwd: time the forward; fwd+bwd: forward and backward; bwd: only the backward of a forward
    run (untimed) just before. The first `leaves` inputs receive gradients (the logits here; hidden
    states and weight in bench_linear)."""
    grads = [t.requires_grad_(mode != "fwd") for t in inputs[:leaves]]
    rest = inputs[leaves:]
    state = {}

    def forward():
        for leaf in grads:
            leaf.grad = None  # the previous step's gradient is not part of this step's memory
        state["out"] = fn(*grads, *rest)
        return state["out"]

    def backward():
        state.pop("out").sum().backward()

    if mode == "fwd":
        step = Step(lambda: None, forward)
    elif mode == "bwd":
        step = Step(forward, backward)
    else:
        step = Step(lambda: None, lambda: (forward(), backward()))
    step.leaves, step.state = grads, state
    return step


def run_benchmark(benchmark, step, device, group):
    """One pytest-benchmark case (bench/): a warm-up (and compile) step, then the timed steps."""
    step.prepare()
    step.run()
    benchmark.group = group

    def run():
        step.prepare()
        step.run()
        _sync(device)

    benchmark(run)


def case_inputs(tokens, vocab, dtype, device):
    torch.manual_seed(tokens * 31 + vocab)  # every provider of a case sees the same inputs
    return make_inputs(tokens, vocab, dtype, device)


_TRUTHS = CaseCache()


def _truth(inputs, estimator, liger, width):
    """The float64 penalty of a case's inputs (shifted for liger, over kept sets of `width` ids for a
    "+kept<K>" provider), computed once for all the providers and modes of the case: a float64 pass
    over [N, V] takes seconds, and kl-bench's first run should not take minutes."""
    def make():
        kept = None if width is None else kept_ids_for(inputs[2], inputs[0].shape[-1], width)
        return eager_penalty(*(shifted(*inputs) if liger else inputs), estimator=estimator, dtype=torch.float64,
                             kept_ids=kept)
    return _TRUTHS.get((inputs[0].data_ptr(), tuple(inputs[0].shape), inputs[0].dtype), (estimator, liger, width),
                       make)


def prepare_case(fn, provider, estimator, inputs, mode):
    """(the row without its times, the step to time) of one provider on a case's inputs."""
    logits = inputs[0]
    with torch.no_grad():
        out = fn(*inputs)  # warm-up, compile, and the error check
    error = (out.double() - _truth(inputs, estimator, provider == "liger", kept_width(provider))).abs().max().item()
    row = dict(provider=provider, estimator=estimator, tokens=logits.shape[0] * logits.shape[1],
               vocab=logits.shape[-1], dtype=str(logits.dtype).replace("torch.", ""), mode=mode, max_abs_error=error)
    return row, make_step(fn, inputs, mode)


def finish_row(row, inputs, timing, bandwidth):
    """The row with its times and the bandwidth they make for the bytes that must move."""
    median, p20, p80 = timing
    logits = inputs[0]
    forward_bytes = 2 * logits.numel() * logits.element_size()
    backward_bytes = (3 if row["estimator"] == "full" else 2) * logits.numel() * logits.element_size()
    moved = {"fwd": forward_bytes, "bwd": backward_bytes, "fwd+bwd": forward_bytes + backward_bytes}[row["mode"]]
    gbs = moved / median / 1e6
    row.update(median_ms=median, p20_ms=p20, p80_ms=p80, gb_per_s=gbs, pct_bandwidth=100 * gbs / bandwidth)
    return row
