"""kl-bench's report: the environment of a run, the summary, the README's table, the plot, --compare."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch

import kl_kernels

from .memory import PeakMemory

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
            from .. import _build_info
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
            if hidden is not None:  # from hidden states the point is memory: it leads
                lines.append(f"  {name}, {where}: {_memory_first(row, providers)}")
                continue
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


def _memory_first(row, providers):
    """A hidden-state row's summary: peak memory and error against eager and compile, then the speed with
    the run's spread (p20-p80), so a noisy machine's timing is read as such."""
    peers = [providers[peer] for peer in ("eager", "compile") if peer in providers]
    memory = "; ".join(f"{peer['peak_extra_mb'] / max(row['peak_extra_mb'], 1e-9):.1f}x less than {peer['provider']} "
                       f"({peer['peak_extra_mb']:.0f} MB)" for peer in peers)
    error = ", ".join(f"{peer['provider']} {peer['max_abs_error']:.1e}" for peer in peers)
    speed = "; ".join(f"{peer['median_ms'] / row['median_ms']:.2f}x the speed of {peer['provider']} "
                      f"({peer['p20_ms']:.0f}-{peer['p80_ms']:.0f} ms)" for peer in peers)
    return (f"peak memory {row['peak_extra_mb']:.0f} MB{f' ({memory})' if memory else ''}; max error vs float64 "
            f"{row['max_abs_error']:.1e}{f' ({error})' if error else ''}; time {row['p20_ms']:.0f}-{row['p80_ms']:.0f} "
            f"ms p20-p80{f': {speed}' if speed else ''}")


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
