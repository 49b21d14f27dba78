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
import json
import os
import sys
import types

import torch

from . import memory, providers as logits_providers, timing
from .cli import HelpFormatter
from .memory import PeakMemory, fix_malloc_for_peaks, peak_extra_bytes
from .providers import FORWARD_ONLY, SAMPLED_ONLY, default_providers
from .report import compare, environment, markdown, plot, plot_title, summary
from .timing import measure, read_bandwidth
from ..estimators import ESTIMATOR_NAMES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MODES = ("fwd", "bwd", "fwd+bwd")

# a run with no other argument finishes in about a minute on 2 cores (--linear: 45 s measured); from
# hidden states the matmuls dominate, so that case is narrow (H 128), with N past one logits tile (512
# rows) so that the head's memory, its point, shows
DEFAULTS = dict(tokens=2048, vocab=[32000], repeats=5)
LINEAR_DEFAULTS = dict(tokens=1024, vocab=[32000], repeats=3, hidden=[128])


# every name the library takes (aliases and the straight-through "+" forms included)
ESTIMATORS = ESTIMATOR_NAMES


# the suite from logits, as bench_linear is the suite from hidden states: what main's loop asks of a suite
LOGITS = types.SimpleNamespace(make_provider=logits_providers.make_provider, case_inputs=timing.case_inputs,
                               prepare_case=timing.prepare_case, finish_row=timing.finish_row, WARMUP=timing.WARMUP,
                               peak_extra_bytes=memory.peak_extra_bytes)


def check_arguments(parser, args) -> None:
    """Every argument checked before any work (issue 38): parser.error's one line naming it, exit 2."""
    for name in ("tokens", "repeats", "tp"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    for name in ("vocab", "hidden"):
        for value in getattr(args, name) or ():
            if value < 1:
                parser.error(f"--{name} sizes must be >= 1, got {value}")
    if args.threshold < 0:
        parser.error(f"--threshold must be >= 0, got {args.threshold}")
    if args.hidden is not None and not args.linear:
        parser.error("--hidden applies to --linear (from hidden states) only")
    if args.tp is not None and (args.linear or args.providers):
        parser.error("--tp runs its own providers from logits: it takes neither --linear nor --providers")
    for name in ("compare", "from_json"):
        path = getattr(args, name)
        if path is not None:
            try:
                with open(path) as f:
                    json.load(f)["rows"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                option = "--from" if name == "from_json" else "--compare"
                parser.error(f"{option} {path}: not a readable kl-bench --json file ({error})")
    for name in ("json", "csv", "plot"):
        path = getattr(args, name)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if path is not None and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            parser.error(f"--{name} {path}: the folder {folder} does not exist or is not writable")
    if args.plot:
        try:  # before the run, not after minutes of it
            import matplotlib  # noqa: F401
        except ImportError as error:
            parser.error(f"--plot needs matplotlib (pip install matplotlib, or the package's bench extra): {error}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    if args.providers and not args.from_json:
        for provider in args.providers:
            reason = provider_problem(provider, args.linear, device, [DTYPES[d] for d in args.dtype])
            if reason:
                parser.error(f"--providers {provider}: {reason}")


def provider_problem(name, linear, device, dtypes):
    """Why kl-bench cannot run provider `name` here, or None."""
    from ..dispatch import select_backend
    from .providers import KEPT, PEERS

    from .bench_linear import FP32_LOGITS

    if name.endswith(FP32_LOGITS):
        if not linear:
            return f"<provider>{FP32_LOGITS} is a provider of --linear"
        name = name[:-len(FP32_LOGITS)]
    if name in ("eager", "compile") or name in PEERS and PEERS[name] == "always":
        return None
    if name in PEERS:
        if linear:
            return "a peer from logits; --linear has eager, compile, trl, logits+<backend> and the backends"
        try:
            __import__(PEERS[name])
        except ImportError as error:
            return f"not installed ({error})"
        return None
    backend = name
    if KEPT.match(name):
        backend = KEPT.match(name)["backend"]
        if backend == "skyrl":
            from .wheel_code import WheelMissing, wheel
            try:
                wheel("skyrl")
            except WheelMissing as missing:
                return str(missing)
            return None
    elif name.startswith("logits+"):
        if not linear:
            return "logits+<backend> is a provider of --linear"
        backend = name.split("+", 1)[1]
    try:
        for dtype in dtypes:
            select_backend(backend, device, (dtype,))
    except (RuntimeError, ValueError) as error:
        known = "eager, compile, trl" + (", logits+<backend>" if linear else ", liger, flash_attn")
        more = ", eager+fp32logits, <backend>+fp32logits" if linear else ""
        return f"{error} (providers: {known}, a kl_kernels backend, <backend>+kept<K>{more})"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kl-bench", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens N per step (sequences of 512) (default: 2048)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabulary sizes V (default: 32000)")
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=["float32"], help="logits dtypes")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="k1", help="the KL estimator")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwd+bwd"],
                        help="fwd, bwd (the backward alone) and fwd+bwd")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="default: eager, trl, compile, every kl_kernels backend native to the device (reference "
                             "only when named), and on a GPU liger and flash_attn when installed; <backend>+kept<K> "
                             "(e.g. cpu+kept20): that backend with kept_ids of K ids per position (sampling replay)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed steps per row, after warm-up (default: 5; {LINEAR_DEFAULTS['repeats']} with --linear)")
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
                             "logits+<backend>, and linear_kl_penalty per backend (kl_kernels/tools/bench_linear.py)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help=f"hidden sizes H for --linear (default: {LINEAR_DEFAULTS['hidden'][0]})")
    parser.add_argument("--from", dest="from_json", metavar="FILE",
                        help="no measuring: the rows of a previous --json file, for --plot / --markdown")
    parser.add_argument("--markdown", action="store_true", help="also print the rows as the README's table")
    parser.add_argument("--tp", type=int, metavar="W", default=None,
                        help="a tensor-parallel vocabulary: W gloo processes on this CPU, each with 1/W of the "
                             "vocabulary (kl_kernels/tools/bench_sharding.py); prints the bytes exchanged per token")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    for name, value in (LINEAR_DEFAULTS if args.linear else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
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
        name_width = max([12] + [len(provider) for provider in providers])
        print(f"{'provider':<{name_width}} {'dtype':<9} {'hidden':>6} {'vocab':>7} {'mode':<8} {'median ms':>10} {'p20-p80':>17} "
              f"{'peak MB':>8} {'err vs f64':>10} {'speed-up':>8}")
    else:
        suite = None
        providers = args.providers or default_providers(device)
        hidden_sizes = [None]
        print(f"{'provider':<10} {'dtype':<9} {'vocab':>7} {'mode':<8} {'median ms':>10} {'p20-p80':>15} "
              f"{'GB/s':>7} {'%bw':>5} {'peak MB':>8} {'err vs f64':>10} {'speed-up':>8}")
    providers = [p for p in providers if not (args.estimator == "full" and p in SAMPLED_ONLY | {"trl"})]
    fns = {provider: (suite or LOGITS).make_provider(provider, args.estimator) for provider in providers}
    rows = []
    this = suite or LOGITS
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
            print(f"{row['provider']:<{name_width}} {row['dtype']:<9} {row['hidden']:>6} {row['vocab']:>7} {row['mode']:<8} "
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
