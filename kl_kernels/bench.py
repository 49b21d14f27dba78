"""kl-bench: time, bandwidth, peak memory and error of the KL penalty pass, per provider.

Providers: `eager` (the penalty code trainers run today: float32 log_softmax + gather for policy
and reference, the estimator, a masked sum), `trl` (TRL's row-looped selective_log_softmax, then
the same), `compile` (torch.compile of the eager code), each kl_kernels backend that can run
here, and the peers when installed: `liger` (Liger-Kernel's forward log-prob path) and
`flash_attn` (flash-attn's Triton cross-entropy as log-probs). Times are medians after warm-up
(p20/p80 beside them), synchronised on a GPU; GB/s counts the bytes that must move (forward: each
logits tensor read once; backward: one read of the logits, one write of the gradient, and one
read of the reference logits for `full`).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import kl_kernels
from kl_kernels.dispatch import native_backends
from kl_kernels.estimators import kl_from_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "bwd", "fwd+bwd")
ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "full")


def _estimate(logp, ref_logp, mask, estimator):
    kl = kl_from_logprobs(logp, ref_logp, estimator=estimator)
    return torch.where(mask != 0, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(-1)


def eager_penalty(logits, ref_logits, labels, mask, estimator="k1", dtype=torch.float32):
    """What verl/TRL/OpenRLHF write today (per-sequence masked sum); dtype=float64 is the truth."""
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)
    log_q = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    if estimator == "full":
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return torch.where(mask != 0, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(-1)
    index = labels.unsqueeze(-1)
    return _estimate(log_p.gather(-1, index).squeeze(-1), log_q.gather(-1, index).squeeze(-1), mask, estimator)


def row_looped_logprobs(logits, labels):
    """TRL's selective_log_softmax algorithm: float32 logits gather the label logits and subtract
    a per-row logsumexp computed one sequence at a time; bf16/fp16 logits take a log_softmax in
    their own dtype one sequence at a time (TRL's choice for stability), then gather."""
    index = labels.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        lse = torch.stack([torch.logsumexp(sequence, dim=-1) for sequence in logits])
        return logits.gather(-1, index).squeeze(-1) - lse
    return torch.stack([torch.log_softmax(sequence, -1).gather(-1, i).squeeze(-1) for sequence, i in zip(logits, index)])


def trl_penalty(logits, ref_logits, labels, mask, estimator="k1"):
    return _estimate(row_looped_logprobs(logits, labels).float(), row_looped_logprobs(ref_logits, labels).float(),
                     mask, estimator)


def liger_penalty(logits, ref_logits, labels, mask, estimator="k1"):
    """Liger-Kernel's log-prob path (liger_kernel.ops.grpo_loss.fused_selective_log_softmax), as
    its GRPO trainer uses it for policy and reference log-probs: forward only (no gradient), and,
    like HF logits, row t predicts labels[t + 1], so it covers T - 1 positions; the error column
    compares it with the float64 truth on those positions (see `shifted`)."""
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    logp = fused_selective_log_softmax(logits, labels, temperature=1.0)
    ref_logp = fused_selective_log_softmax(ref_logits, labels, temperature=1.0)
    return _estimate(logp, ref_logp, mask[:, 1:], estimator)


def flash_attn_penalty(logits, ref_logits, labels, mask, estimator="k1"):
    """flash-attn's Triton cross-entropy (the loss is -logp; it has a fused backward)."""
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def logprobs(z):
        return -cross_entropy_loss(z.reshape(-1, z.shape[-1]), labels.reshape(-1))[0].view(labels.shape)

    return _estimate(logprobs(logits), logprobs(ref_logits), mask, estimator)


def shifted(logits, ref_logits, labels, mask):
    return logits[:, :-1], ref_logits[:, :-1], labels[:, 1:], mask[:, 1:]


FORWARD_ONLY = {"liger"}
SAMPLED_ONLY = {"trl", "liger", "flash_attn"}  # providers of label log-probs: no `full`
PEERS = {"trl": "always", "liger": "liger_kernel", "flash_attn": "flash_attn"}


def make_provider(name, estimator):
    if name == "eager":
        return functools.partial(eager_penalty, estimator=estimator)
    if name == "compile":
        # each dtype, shape and grad mode compiles anew; past Dynamo's default limit of 8 it would
        # silently run eager, so the limit is raised for a sweep
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, limit, max(getattr(config, limit), 256))
        return torch.compile(functools.partial(eager_penalty, estimator=estimator))
    if name in PEERS:
        return functools.partial({"trl": trl_penalty, "liger": liger_penalty, "flash_attn": flash_attn_penalty}[name],
                                 estimator=estimator)
    return lambda logits, ref_logits, labels, mask: kl_kernels.kl_penalty(
        logits, labels, ref_logits=ref_logits, mask=mask, estimator=estimator, validate=False, backend=name).kl_sum


def default_providers(device):
    # `reference` (the pure-PyTorch truth, slow by design) only when asked for
    names = ["eager", "trl", "compile"] + native_backends(device.type)
    if device.type == "cuda":
        for name, module in PEERS.items():
            if module != "always":
                try:
                    __import__(module)
                    names.append(name)
                except ImportError:
                    pass
    return names


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cpu_counter():
    """kl_kernels._C's CPU allocation counter (csrc/memory_tracking.cpp), or None without the extension."""
    try:
        from . import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "track_cpu_memory") else None


class PeakMemory:
    """Peak extra memory of a region: the CUDA allocator's peak; on the CPU the peak of the bytes
    allocated through ATen's CPU allocator while the region runs (kl_kernels._C counts them: exact
    and the same run to run), else, without the extension, the process's resident high-water mark
    (reset through /proc/self/clear_refs, Linux only; it depends on what malloc kept)."""

    def __init__(self, device):
        self.device = device
        self.counter = _cpu_counter() if device.type == "cpu" else None
        self.method = "cuda allocator" if device.type == "cuda" else "cpu allocator" if self.counter else "rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.counter is not None:
            self.counter.track_cpu_memory(True)
            self.counter.reset_cpu_memory_peak()
            self.base = self.counter.cpu_memory_stats()[0]
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
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        elif self.counter is not None:
            self.extra = self.counter.cpu_memory_stats()[1] - self.base
            self.counter.track_cpu_memory(False)
        else:
            self.extra = self._field("VmHWM") - self.base

    @staticmethod
    def _field(name):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
        return 0


WARMUP = 2  # untimed steps per provider before the timed ones


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


def prepare_case(fn, provider, estimator, inputs, mode):
    """(the row without its times, the step to time) of one provider on a case's inputs."""
    logits = inputs[0]
    with torch.no_grad():
        out = fn(*inputs)  # warm-up, compile, and the error check
    truth_inputs = shifted(*inputs) if provider == "liger" else inputs
    truth = eager_penalty(*truth_inputs, estimator=estimator, dtype=torch.float64)
    error = (out.double() - truth).abs().max().item()
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


def peak_extra_bytes(fn, tokens, vocab, dtype, mode, device):
    """Peak memory the timed part of one step adds over its inputs (after a warm-up step)."""
    return step_peak_bytes(make_step(fn, make_inputs(tokens, vocab, dtype, device), mode), device)


def step_peak_bytes(step, device):
    step.prepare()
    step.run()
    for leaf in step.leaves:
        leaf.grad = None
    step.state.clear()
    step.prepare()
    with PeakMemory(device) as peak:
        step.run()
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
    if commit is None:  # an installed wheel: the commit setup.py recorded at build time
        try:
            from . import _build_info
            commit = _build_info.COMMIT
        except ImportError:
            pass
    name = torch.cuda.get_device_name() if device.type == "cuda" else _cpu_model()
    versions = dict(torch=torch.__version__, kl_kernels=kl_kernels.__version__)
    for package in ("triton", "trl", "liger_kernel", "flash_attn"):
        try:
            versions[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            pass
    return dict(device=f"{device.type}: {name}", cpu_capability=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads(), **versions, python=platform.python_version(), commit=commit,
                date=time.strftime("%Y-%m-%d"), peak_memory=PeakMemory(device).method)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def row_key(row):
    return (row["provider"], row.get("estimator", "k1"), row["dtype"], row["vocab"], row["tokens"], row["mode"],
            row.get("hidden"))


def verdict(old, new, threshold):
    """A REGRESSION only when the new row is slower by more than `threshold` beyond both rows' spread
    (its p20 above the old p80 by that much); `faster` the same way round. A median moved by more
    than the threshold while the spreads overlap is `noisy`: measure again, on a quieter machine."""
    if new["p20_ms"] > old["p80_ms"] * (1 + threshold):
        return "REGRESSION"
    if new["p80_ms"] < old["p20_ms"] * (1 - threshold):
        return "faster"
    ratio = new["median_ms"] / old["median_ms"]
    return "noisy" if ratio > 1 + threshold or ratio < 1 - threshold else "same"


def compare(rows, baseline_file, threshold):
    """Each row against the baseline's (verdict above). Returns the lines and the regressions."""
    with open(baseline_file) as f:
        baseline = {row_key(row): row for row in json.load(f)["rows"]}
    lines, regressions = [], 0
    for row in rows:
        old = baseline.get(row_key(row))
        if old is None:
            continue
        ratio = row["median_ms"] / old["median_ms"]
        result = verdict(old, row, threshold)
        regressions += result == "REGRESSION"
        lines.append(f"{result:<10} {row['provider']:<10} {row['dtype']:<9} {row['vocab']:>7} {row['mode']:<8} "
                     f"{old['median_ms']:>9.2f} -> {row['median_ms']:>9.2f} ms ({ratio:.2f}x)")
    return lines, regressions


def summary(rows):
    """The paragraph that answers "how much faster and leaner than my trainer's code": for each
    kl_kernels provider and case, the speed-up and the peak memory against eager and torch.compile."""
    ours = {b.name for b in kl_kernels.available_backends()}
    by_case = {}
    for row in rows:
        case = (row["dtype"], row.get("hidden"), row["vocab"], row["mode"])
        by_case.setdefault(case, {})[row["provider"]] = row
    lines = []
    for (dtype, hidden, vocab, mode), providers in by_case.items():
        for name, row in providers.items():
            if name.split("+")[-1] not in ours:
                continue
            where = f"{dtype}{'' if hidden is None else f' H={hidden}'} V={vocab} {mode}"
            parts = []
            for peer in ("eager", "compile"):
                if peer in providers:
                    other = providers[peer]
                    if row["peak_extra_mb"] > 0.5:
                        memory = f"{other['peak_extra_mb'] / row['peak_extra_mb']:.2f}x less peak memory"
                    elif other["peak_extra_mb"] > 0.5:
                        memory = f"{other['peak_extra_mb']:.0f} MB less peak memory (none extra)"
                    else:
                        memory = "no extra memory either"
                    parts.append(f"{other['median_ms'] / row['median_ms']:.2f}x the speed of {peer} with {memory}")
            if "pct_bandwidth" in row:
                parts.append(f"{row['pct_bandwidth']:.0f}% of the measured bandwidth")
            lines.append(f"  {name}, {where}: " + ("; ".join(parts) or "no eager/compile row to compare with"))
    return "# summary (peak memory: extra bytes over the inputs)\n" + "\n".join(lines) if lines else ""


def plot(rows, path, title):
    """One row of panels per mode: the speed-up over eager (left) and the peak extra memory (right)
    against the vocabulary size, a colour per provider and a line style per dtype, a legend on each
    panel, ticks at the measured vocabulary sizes."""
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit(f"kl-bench --plot needs matplotlib (pip install matplotlib): {error}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 3.6 * len(modes)), squeeze=False)
    colours = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(r["provider"] for r in rows))}
    styles = {d: s for d, s in zip(dict.fromkeys(r["dtype"] for r in rows), ("-", "--", ":", "-."))}
    vocabs = sorted({r["vocab"] for r in rows})
    for (ax_speed, ax_memory), mode in zip(axes, modes):
        series = {}
        for row in rows:
            if row["mode"] == mode:
                series.setdefault((row["provider"], row["dtype"]), []).append(row)
        for (provider, dtype), points in series.items():
            points.sort(key=lambda r: r["vocab"])
            style = dict(color=colours[provider], linestyle=styles[dtype], marker="o", label=f"{provider} {dtype}")
            vocab = [r["vocab"] for r in points]
            speedups = [r.get("speedup_vs_eager") for r in points]
            if all(speedups):
                ax_speed.plot(vocab, speedups, **style)
            ax_memory.plot(vocab, [max(r["peak_extra_mb"], 0.1) for r in points], **style)
        ax_speed.set_ylabel(f"{mode}: speed-up over eager (x)")
        ax_memory.set_ylabel(f"{mode}: peak extra memory (MB, log)")
        ax_memory.set_yscale("log")
        for axis in (ax_speed, ax_memory):
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(FixedLocator(vocabs))
            axis.xaxis.set_minor_locator(NullLocator())
            axis.set_xticklabels([str(v) for v in vocabs])
            axis.set_xlabel("vocabulary size")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7, ncol=2)
    fig.suptitle(title + "\n(memory below 0.1 MB, i.e. no [N, V] buffer, is drawn at 0.1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_title(rows, env):
    first = rows[0] if rows else {}
    return (f"kl-bench, {first.get('tokens')} tokens, estimator {first.get('estimator', 'k1')}; {env['device']}, "
            f"torch {env['torch']}, commit {env['commit']}")


def markdown(rows):
    """The README's headline table from kl-bench rows: median ms per provider, the kernel's speed-up
    over eager and torch.compile, its GB/s, and peak extra memory per provider."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    ours = [p for p in providers if p in {b.name for b in kl_kernels.available_backends()}] or providers[-1:]
    kernel = ours[0]
    head = ["dtype", "vocab", "mode", *providers, "vs eager", "vs compile", f"`{kernel}` GB/s (% bw)",
            "peak extra MB: " + " / ".join(providers)]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: | --- |" + " ---: |" * (len(head) - 3)]
    cases = {}
    for row in rows:
        cases.setdefault((row["dtype"], row["vocab"], row["mode"]), {})[row["provider"]] = row
    for (dtype, vocab, mode), case in cases.items():
        mine = case.get(kernel)
        ratio = lambda peer: f"{case[peer]['median_ms'] / mine['median_ms']:.1f}x" if mine and peer in case else "-"  # noqa: E731
        cells = [dtype, str(vocab), mode, *(f"{case[p]['median_ms']:.0f}" if p in case else "-" for p in providers),
                 ratio("eager"), ratio("compile"),
                 f"{mine['gb_per_s']:.1f} ({mine['pct_bandwidth']:.0f}%)" if mine and "gb_per_s" in mine else "-",
                 " / ".join(f"{case[p]['peak_extra_mb']:.0f}" if p in case else "-" for p in providers)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kl-bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens N per step (sequences of 512)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000], help="vocabulary sizes V")
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=["float32"], help="logits dtypes")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="k1", help="the KL estimator")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwd+bwd"],
                        help="fwd, bwd (the backward alone) and fwd+bwd")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="default: eager, trl, compile, every kl_kernels backend native to the device (reference "
                             "only when named), and on a GPU liger and flash_attn when installed")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row, after warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--json", metavar="FILE", help="also write the rows (with the environment) as JSON")
    parser.add_argument("--csv", metavar="FILE", help="also write the rows as CSV, the environment in each row")
    parser.add_argument("--plot", metavar="PNG", help="also plot time and peak memory against vocabulary size "
                                                      "(needs matplotlib: the bench extra)")
    parser.add_argument("--compare", metavar="FILE", help="a previous --json file: flag rows slower than it")
    parser.add_argument("--threshold", type=float, default=0.15,
                        help="--compare flags a row slower by more than this fraction")
    parser.add_argument("--linear", action="store_true",
                        help="from hidden states: F.linear + penalty (eager, compile), TRL's chunked head, "
                             "logits+<backend>, and linear_kl_penalty per backend (kl_kernels/bench_linear.py)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024], help="hidden sizes H for --linear")
    parser.add_argument("--from", dest="from_json", metavar="FILE",
                        help="no measuring: the rows of a previous --json file, for --plot / --markdown")
    parser.add_argument("--markdown", action="store_true", help="also print the rows as the README's table")
    parser.add_argument("--tp", type=int, metavar="W", default=None,
                        help="a tensor-parallel vocabulary: W gloo processes on this CPU, each with 1/W of the "
                             "vocabulary (kl_kernels/bench_sharding.py); prints the bytes exchanged per token")
    args = parser.parse_args(argv)
    if args.plot:
        try:  # before the run, not after minutes of it
            import matplotlib  # noqa: F401
        except ImportError as error:
            parser.error(f"--plot needs matplotlib (pip install matplotlib, or the package's bench extra): {error}")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, env = saved["rows"], saved["environment"]
        print(summary(rows))
        if args.markdown:
            print(markdown(rows))
        if args.plot:
            plot(rows, args.plot, plot_title(rows, env))
        return 0
    device = torch.device(args.device)
    env = environment(device)
    bandwidth = read_bandwidth(device)
    print(f"# {env['device']} ({env['cpu_capability']}), {env['threads']} threads, torch {env['torch']}, "
          f"commit {env['commit']}; "
          f"{'copy' if device.type == 'cuda' else 'read'} bandwidth {bandwidth:.1f} GB/s; estimator {args.estimator}")
    if args.tp:
        from . import bench_sharding

        bench_sharding.run(args.tp, args.tokens, args.vocab, [DTYPES[d] for d in args.dtype], args.modes,
                           args.estimator, args.repeats, args.json, env)
        return 0
    if args.linear:
        from . import bench_linear as suite
        providers = args.providers or suite.default_providers(device)
        hidden_sizes = args.hidden
        print(f"{'provider':<12} {'dtype':<9} {'hidden':>6} {'vocab':>7} {'mode':<8} {'median ms':>10} {'p20-p80':>17} "
              f"{'peak MB':>8} {'err vs f64':>10} {'speed-up':>8}")
    else:
        suite = None
        providers = args.providers or default_providers(device)
        hidden_sizes = [None]
        print(f"{'provider':<10} {'dtype':<9} {'vocab':>7} {'mode':<8} {'median ms':>10} {'p20-p80':>15} "
              f"{'GB/s':>7} {'%bw':>5} {'peak MB':>8} {'err vs f64':>10} {'speed-up':>8}")
    providers = [p for p in providers if not (args.estimator == "full" and p in SAMPLED_ONLY | {"trl"})]
    fns = {provider: (suite or sys.modules[__name__]).make_provider(provider, args.estimator) for provider in providers}
    rows = []
    this = suite or sys.modules[__name__]
    for dtype in args.dtype:
        for hidden_size in hidden_sizes:
            for vocab in args.vocab:
                shape = (args.tokens, vocab) if suite is None else (args.tokens, hidden_size, vocab)
                inputs = this.case_inputs(*shape, DTYPES[dtype], device)
                for mode in args.modes:
                    prepared = [this.prepare_case(fns[provider], provider, args.estimator, inputs, mode)
                                for provider in providers if mode == "fwd" or provider not in FORWARD_ONLY]
                    timings = measure([step for _, step in prepared], device, args.repeats, warmup=this.WARMUP)
                    case = [this.finish_row(row, inputs, timing, bandwidth)
                            for (row, _), timing in zip(prepared, timings)]
                    eager_ms = next((row["median_ms"] for row in case if row["provider"] == "eager"), None)
                    for row in case:
                        row["speedup_vs_eager"] = eager_ms / row["median_ms"] if eager_ms else None
                    rows.extend(case)
                del inputs
    if PeakMemory(device).method == "rss":
        fix_malloc_for_peaks()
    for row in rows:
        speedup = f"{row['speedup_vs_eager']:.2f}x" if row["speedup_vs_eager"] else "-"
        if suite:
            row["peak_extra_mb"] = suite.peak_extra_bytes(fns[row["provider"]], args.tokens, row["hidden"],
                                                          row["vocab"], DTYPES[row["dtype"]], row["mode"], device) / 2**20
            print(f"{row['provider']:<12} {row['dtype']:<9} {row['hidden']:>6} {row['vocab']:>7} {row['mode']:<8} "
                  f"{row['median_ms']:>10.2f} {row['p20_ms']:>8.2f}-{row['p80_ms']:<8.2f} {row['peak_extra_mb']:>8.1f} "
                  f"{row['max_abs_error']:>10.2e} {speedup:>8}", flush=True)
            continue
        row["peak_extra_mb"] = peak_extra_bytes(fns[row["provider"]], args.tokens, row["vocab"], DTYPES[row["dtype"]],
                                                row["mode"], device) / 2**20
        print(f"{row['provider']:<10} {row['dtype']:<9} {row['vocab']:>7} {row['mode']:<8} {row['median_ms']:>10.2f} "
              f"{row['p20_ms']:>7.2f}-{row['p80_ms']:<7.2f} {row['gb_per_s']:>7.1f} "
              f"{row['pct_bandwidth']:>5.1f} {row['peak_extra_mb']:>8.1f} {row['max_abs_error']:>10.2e} "
              f"{speedup:>8}", flush=True)
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, read_bandwidth_gb_per_s=bandwidth, rows=rows), f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*rows[0], *env, "read_bandwidth_gb_per_s"] if rows else [])
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, **env, "read_bandwidth_gb_per_s": bandwidth})
    if args.markdown:
        print(markdown(rows))
    if args.plot:
        plot(rows, args.plot, plot_title(rows, env))
    if args.compare:
        lines, regressions = compare(rows, args.compare, args.threshold)
        print(f"# against {args.compare} (threshold {args.threshold:.0%}): {regressions} regression(s)")
        print("\n".join(lines))
        return 1 if regressions else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
