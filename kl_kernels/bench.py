"""kl-bench: time, bandwidth, peak memory and error of the KL penalty pass, per provider.

Providers: `eager` (the penalty code trainers run today: float32 log_softmax + gather for policy
and reference, the estimator, a masked sum), `compile` (torch.compile of that code) and each
kl_kernels backend that can run here. Times are medians after warm-up (p20/p80 beside them);
GB/s counts the bytes that must move (each logits tensor read once in the forward; in the
backward one more read of the logits and one write of the gradient).
"""
from __future__ import annotations

import argparse
import ctypes
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import kl_kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager_penalty(logits, ref_logits, labels, mask, dtype=torch.float32):
    """What verl/TRL/OpenRLHF write today (k1, per-sequence masked sum); dtype=float64 is the truth."""
    logp = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_logp = torch.log_softmax(ref_logits.to(dtype), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    kl = (logp - ref_logp) * mask.to(dtype)
    return kl.sum(-1)


def liger_penalty(logits, ref_logits, labels, mask):
    """Liger-Kernel's log-prob path (liger_kernel.ops.grpo_loss.fused_selective_log_softmax), as
    its GRPO trainer uses it for the policy and reference log-probs: forward only (no gradient),
    and, like HF logits, row t predicts labels[t + 1], so it covers T - 1 positions; the error
    column compares it with the float64 truth on those positions (see `shifted`)."""
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    logp = fused_selective_log_softmax(logits, labels, temperature=1.0)
    ref_logp = fused_selective_log_softmax(ref_logits, labels, temperature=1.0)
    return ((logp - ref_logp) * mask[:, 1:]).sum(-1)


def shifted(logits, ref_logits, labels, mask):
    return logits[:, :-1], ref_logits[:, :-1], labels[:, 1:], mask[:, 1:]


FORWARD_ONLY = {"liger"}


def make_provider(name):
    if name == "eager":
        return eager_penalty
    if name == "compile":
        return torch.compile(eager_penalty)
    if name == "liger":
        return liger_penalty
    return lambda logits, ref_logits, labels, mask: kl_kernels.kl_penalty(
        logits, labels, ref_logits=ref_logits, mask=mask, validate=False, backend=name).kl_sum


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak extra memory of a region: CUDA allocator peak, or the process's resident high-water
    mark on the CPU (reset through /proc/self/clear_refs, Linux only)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._field("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = self._field("VmHWM") - self.base

    @staticmethod
    def _field(name):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
        return 0


def measure(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


def read_bandwidth(device):
    """GB/s of one read of a 1 GiB float32 tensor (x.sum()), or a device copy on CUDA."""
    x = torch.ones(1 << 28, device=device)
    if device.type == "cuda":
        y = torch.empty_like(x)
        ms, _, _ = measure(lambda: y.copy_(x), device, 10)
        return 2 * x.numel() * 4 / ms / 1e6
    ms, _, _ = measure(lambda: x.sum(), device, 5)
    return x.numel() * 4 / ms / 1e6


def make_inputs(tokens, vocab, dtype, device):
    batch = max(1, tokens // 512)
    seq = tokens // batch
    logits = (torch.randn(batch, seq, vocab, device=device) * 2).to(dtype)
    ref_logits = (logits.float() + torch.randn_like(logits, dtype=torch.float32) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    mask = (torch.rand(batch, seq, device=device) > 0.1).float()
    return logits, ref_logits, labels, mask


def make_step(fn, inputs, mode):
    logits, ref_logits, labels, mask = inputs
    leaf = logits.requires_grad_(mode != "fwd")

    def step():
        leaf.grad = None  # the previous step's gradient is not part of this step's memory
        out = fn(leaf, ref_logits, labels, mask)
        if mode != "fwd":
            out.sum().backward()
        return out

    step.leaf = leaf
    return step


def bench_case(fn, provider, tokens, vocab, dtype, mode, device, repeats, bandwidth):
    inputs = make_inputs(tokens, vocab, dtype, device)
    logits = inputs[0]
    step = make_step(fn, inputs, mode)
    out = step()  # warm-up, compile, and the error check
    truth_inputs = [x.detach() for x in inputs]
    if provider == "liger":
        truth_inputs = shifted(*truth_inputs)
    error = (out.detach().double() - eager_penalty(*truth_inputs, dtype=torch.float64)).abs().max().item()
    median, p20, p80 = measure(step, device, repeats)
    element = logits.element_size()
    moved = 2 * logits.numel() * element + (2 * logits.numel() * element if mode != "fwd" else 0)
    gbs = moved / median / 1e6
    return dict(provider=provider, tokens=logits.shape[0] * logits.shape[1], vocab=vocab,
                dtype=str(dtype).replace("torch.", ""), mode=mode, median_ms=median, p20_ms=p20, p80_ms=p80,
                gb_per_s=gbs, pct_bandwidth=100 * gbs / bandwidth, max_abs_error=error)


def peak_extra_bytes(fn, tokens, vocab, dtype, mode, device):
    """Peak memory one step adds over its inputs (after a warm-up step)."""
    step = make_step(fn, make_inputs(tokens, vocab, dtype, device), mode)
    step()
    step.leaf.grad = None
    with PeakMemory(device) as peak:
        step()
    return peak.extra


def fix_malloc_for_peaks():
    """glibc keeps freed large blocks resident once its dynamic mmap threshold has grown, which
    hides later peaks from the resident high-water mark; a fixed threshold maps and unmaps every
    large block. Set only for the memory pass: it slows a blocked loop's many allocations."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def environment(device):
    # a device machine gets a copy of the working tree without .git: the caller passes the commit
    commit = os.environ.get("KL_KERNELS_COMMIT")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip() or commit
    except OSError:
        pass
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    return dict(device=f"{device.type}: {name}", threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), commit=commit, date=time.strftime("%Y-%m-%d"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kl-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000])
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=["float32"])
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--providers", nargs="+", default=None,
                        help="default: eager, compile and every kl_kernels backend available here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the rows (with the environment) as JSON")
    parser.add_argument("--csv", metavar="FILE", help="also write the rows as CSV, the environment in each row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    providers = args.providers or ["eager", "compile"] + [
        b.name for b in kl_kernels.available_backends()
        if b.available and (b.name == "reference" or (b.name == "cpu") == (device.type == "cpu"))]
    env = environment(device)
    bandwidth = read_bandwidth(device)
    print(f"# {env['device']}, {env['threads']} threads, torch {env['torch']}, commit {env['commit']}; "
          f"read bandwidth {bandwidth:.1f} GB/s")
    header = f"{'provider':<10} {'dtype':<9} {'vocab':>7} {'mode':<8} {'median ms':>10} {'p20-p80':>15} " \
             f"{'GB/s':>7} {'%bw':>5} {'peak MB':>8} {'max err':>9} {'vs eager':>8}"
    print(header)
    fns = {provider: make_provider(provider) for provider in providers}
    cases = [(dtype, vocab, mode) for dtype in args.dtype for vocab in args.vocab for mode in args.modes]
    rows = []
    for dtype, vocab, mode in cases:
        eager_ms = None
        for provider in providers:
            if mode != "fwd" and provider in FORWARD_ONLY:
                continue
            row = bench_case(fns[provider], provider, args.tokens, vocab, DTYPES[dtype], mode, device,
                             args.repeats, bandwidth)
            eager_ms = row["median_ms"] if provider == "eager" else eager_ms
            row["speedup_vs_eager"] = eager_ms / row["median_ms"] if eager_ms else None
            rows.append(row)
    fix_malloc_for_peaks()
    for row in rows:
        row["peak_extra_mb"] = peak_extra_bytes(fns[row["provider"]], args.tokens, row["vocab"], DTYPES[row["dtype"]],
                                                row["mode"], device) / 2**20
        speedup = f"{row['speedup_vs_eager']:.2f}x" if row["speedup_vs_eager"] else "-"
        print(f"{row['provider']:<10} {row['dtype']:<9} {row['vocab']:>7} {row['mode']:<8} {row['median_ms']:>10.2f} "
              f"{row['p20_ms']:>7.2f}-{row['p80_ms']:<7.2f} {row['gb_per_s']:>7.1f} "
              f"{row['pct_bandwidth']:>5.1f} {row['peak_extra_mb']:>8.1f} {row['max_abs_error']:>9.2e} "
              f"{speedup:>8}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, read_bandwidth_gb_per_s=bandwidth, rows=rows), f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            fields = [*rows[0], *env, "read_bandwidth_gb_per_s"] if rows else []
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, **env, "read_bandwidth_gb_per_s": bandwidth})
    return 0


if __name__ == "__main__":
    sys.exit(main())
