"""kl-bench itself: its providers compute the same penalty, its files are written, --compare flags
a slower row, and the row-looped TRL algorithm matches log_softmax + gather."""
import csv
import importlib.util
import json

import pytest
import torch

from kl_kernels.tools import bench, bench_linear, memory, providers, report, timing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_looped_logprobs(dtype):
    logits = (torch.randn(3, 7, 40) * 2).to(dtype)
    labels = torch.randint(0, 40, (3, 7))
    want = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)  # TRL computes in bf16
    torch.testing.assert_close(providers.row_looped_logprobs(logits, labels).float(), want, **tol)


@pytest.mark.parametrize("estimator", ["k1", "k3", "full"])
def test_providers_agree(estimator):
    inputs = timing.make_inputs(64, 50, torch.float32, torch.device("cpu"))
    want = providers.eager_penalty(*inputs, estimator=estimator, dtype=torch.float64)
    names = ["eager", "cpu", "reference"] + ([] if estimator == "full" else ["trl"])
    for name in names:
        got = providers.make_provider(name, estimator)(*inputs)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


def test_cli_writes_files_and_compares(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--tokens", "64", "--vocab", "50", "80", "--providers", "eager", "trl", "cpu", "--repeats", "2",
            "--modes", "fwd", "bwd", "fwd+bwd", "--json", str(out), "--csv", str(tmp_path / "rows.csv")]
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    assert {"device", "torch", "commit", "date"} <= set(data["environment"])
    assert len(data["rows"]) == 3 * 2 * 3
    for row in data["rows"]:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["max_abs_error"] < 1e-3 and row["peak_extra_mb"] >= 0
    with open(tmp_path / "rows.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    # a baseline ten times faster than anything real: every matched row is a regression
    for row in data["rows"]:
        for key in ("median_ms", "p20_ms", "p80_ms"):
            row[key] /= 10
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(data))
    capsys.readouterr()
    assert bench.main(["--tokens", "64", "--vocab", "50", "--providers", "cpu", "--repeats", "2", "--modes", "fwd",
                       "--compare", str(baseline)]) == 1
    assert "REGRESSION cpu" in capsys.readouterr().out


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(provider=p, mode=m, dtype=d, vocab=v, median_ms=1.0 + v / 100, peak_extra_mb=v / 10 * (p == "eager"),
                 speedup_vs_eager=1.0 if p == "eager" else 3.0)
            for p in ("eager", "cpu") for m in ("fwd", "fwd+bwd") for d in ("float32", "bfloat16") for v in (50, 80)]
    report.plot(rows, tmp_path / "plot.png", "test")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_from_results_file_plot_and_markdown(tmp_path, capsys):
    """--from: the table and the plot of a committed results file, without measuring again."""
    out = tmp_path / "rows.json"
    assert bench.main(["--tokens", "64", "--vocab", "50", "--providers", "eager", "cpu", "--repeats", "1",
                       "--json", str(out)]) == 0
    capsys.readouterr()
    args = ["--from", str(out), "--markdown"]
    if importlib.util.find_spec("matplotlib"):
        args += ["--plot", str(tmp_path / "again.png")]
    assert bench.main(args) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| dtype | vocab | mode | eager | cpu | vs eager |") and len(table) == 2 + 2


@pytest.mark.parametrize("estimator", ["k1", "low_var_kl", "full"])
def test_linear_providers_agree(estimator):
    torch.manual_seed(0)
    inputs = bench_linear.make_inputs(64, 16, 50, torch.float32, torch.device("cpu"))
    want = bench_linear.eager_linear(*(t.double() if i < 4 else t for i, t in enumerate(inputs)), estimator=estimator,
                                     dtype=torch.float64)
    providers = ["eager", "logits+cpu", "cpu", "reference"] + ([] if estimator == "full" else ["trl"])
    for name in providers:
        if name == "trl":
            pytest.importorskip("trl.kernels.chunked_logprob")
        got = bench_linear.make_provider(name, estimator)(*inputs)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


def test_fp32_logits_providers():
    """eager+fp32logits and <backend>+fp32logits (issue 37): bf16 inputs, float32 logits: the float64
    penalty of the same bf16 values to float32 rounding, where the bf16 head's rounded logits are far off."""
    torch.manual_seed(0)
    inputs = bench_linear.make_inputs(64, 32, 300, torch.bfloat16, torch.device("cpu"))
    want = bench_linear.eager_linear(*(t.double() if i < 4 else t for i, t in enumerate(inputs)), dtype=torch.float64)
    error = {name: (bench_linear.make_provider(name, "k1")(*inputs).double() - want).abs().max().item()
             for name in ("eager", "cpu", "eager+fp32logits", "cpu+fp32logits", "reference+fp32logits")}
    for name in ("eager+fp32logits", "cpu+fp32logits", "reference+fp32logits"):
        assert error[name] < 1e-4 and error[name] * 100 < error[name.split("+")[0] if "eager" in name else "cpu"], error


def test_cli_linear_mode(tmp_path):
    out = tmp_path / "rows.json"
    args = ["--linear", "--tokens", "64", "--hidden", "16", "24", "--vocab", "50", "--providers", "eager",
            "logits+cpu", "cpu", "--repeats", "2", "--modes", "fwd", "fwd+bwd", "--json", str(out)]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 3 * 2 and {row["hidden"] for row in rows} == {16, 24}
    for row in rows:
        assert row["median_ms"] > 0 and row["peak_extra_mb"] >= 0 and row["max_abs_error"] < 1e-3


def test_summary_and_environment(capsys, monkeypatch):
    env = report.environment(torch.device("cpu"))
    assert env["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256", "NEON", "SVE") \
        and env["kl_kernels"] and env["device"].startswith("cpu: ")
    rows = [dict(provider=p, dtype="float32", vocab=50, mode="fwd", median_ms=ms, peak_extra_mb=mb, pct_bandwidth=40.0)
            for p, ms, mb in (("eager", 4.0, 100.0), ("compile", 2.0, 0.0), ("cpu", 1.0, 0.0))]
    text = report.summary(rows)
    assert "cpu, float32 V=50 fwd: 4.00x the speed of eager with 100 MB less peak memory" in text
    assert "2.00x the speed of compile with no extra memory either; 40% of the measured bandwidth" in text
    # --plot without matplotlib fails before any measurement
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        bench.main(["--plot", "x.png", "--tokens", "64", "--vocab", "50"])
    assert "matplotlib" in capsys.readouterr().err


def test_compare_verdicts_respect_the_spread():
    row = lambda median, p20, p80: dict(median_ms=median, p20_ms=p20, p80_ms=p80)  # noqa: E731
    old = row(10.0, 9.5, 10.5)
    assert report.verdict(old, row(13.0, 12.5, 13.5), 0.15) == "REGRESSION"  # beyond both spreads
    assert report.verdict(old, row(12.0, 9.0, 15.0), 0.15) == "noisy"  # slower median, overlapping spread
    assert report.verdict(old, row(10.5, 10.0, 11.0), 0.15) == "same"
    assert report.verdict(old, row(7.0, 6.8, 7.2), 0.15) == "faster"


def test_cli_tensor_parallel_mode(tmp_path):
    """--tp 2: two gloo processes; what a rank receives per token is the per-row statistics (k = 5 float64
    here: log-prob, lse, reference log-prob and lse, entropy) plus the header per call (shard size, failure
    and validate flags, and sharding.HEADER's fields: int64 each), whatever V."""
    from kl_kernels.sharding import HEADER

    header_bytes = 8 * (3 + len(HEADER))
    out = tmp_path / "tp.json"
    assert bench.main(["--tp", "2", "--tokens", "96", "--vocab", "64", "640", "--modes", "fwd+bwd", "--repeats", "1",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["vocab"] for row in rows] == [64, 640]
    for row in rows:
        assert row["received_bytes_per_token"] == pytest.approx(5 * 8 + header_bytes / 96)
        assert row["max_abs_diff_vs_single"] < 1e-4 and row["sharded_ms"] > 0


@pytest.mark.parametrize("provider", ["eager", "cpu"])
def test_cpu_peak_memory_is_reproducible_and_counts_the_gradient(provider):
    """The CPU peak comes from the tools' allocation counter (kl_kernels.tools._memory): the same row twice gives the same
    bytes, and never fewer than the op must allocate (the bf16 logits gradient)."""
    fn = providers.make_provider(provider, "k1")
    device = torch.device("cpu")
    assert memory.PeakMemory(device).method == "cpu allocator"
    peaks = [memory.peak_extra_bytes(fn, 512, 3000, torch.bfloat16, "fwd+bwd", device) for _ in range(2)]
    assert peaks[0] == peaks[1]
    gradient = 512 * 3000 * 2
    assert peaks[0] >= gradient
    if provider == "eager":  # at least one float32 log-softmax of the policy: the [N, V] temporary the kernels avoid
        assert peaks[0] >= 512 * 3000 * 4 + gradient
    else:
        assert peaks[0] < gradient + 512 * 3000  # the gradient and O(N) outputs, no [N, V] temporary


def test_cpu_counter_serves_raw_allocations():
    """oneDNN's bf16 matmul allocates through Allocator::raw_allocate, which needs a DataPtr whose
    context is its data pointer: the counter must serve it (it crashed the H = 4096 kl-bench row)."""
    with memory.PeakMemory(torch.device("cpu")) as peak:
        a, b = torch.randn(512, 256).bfloat16(), torch.randn(1000, 256).bfloat16()
        out = torch.nn.functional.linear(a, b)
    assert peak.extra >= out.nbytes + a.nbytes + b.nbytes


def test_kept_ids_for_the_bench_are_distinct():
    labels = torch.randint(0, 50, (4, 9))
    kept = providers.kept_ids_for(labels, 50, 7)
    assert torch.equal(kept[..., 0], labels) and ((kept >= 0) & (kept < 50)).all()
    assert (kept.sort(-1).values.diff(dim=-1) != 0).all()  # a sampler's set: no repeats


def test_skyrl_provider_matches_ours():
    """skyrl+kept<K>: SkyRL 0.4.0's own scorer (from its wheel) of the same kept sets, from logits and from
    hidden states, agrees with <backend>+kept<K>."""
    from kl_kernels.tools import wheel_code

    try:
        wheel_code.wheel("skyrl")
    except wheel_code.WheelMissing as missing:
        pytest.skip(str(missing))
    inputs = timing.make_inputs(64, 50, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(providers.make_provider("skyrl+kept7", "k3")(*inputs),
                               providers.make_provider("cpu+kept7", "k3")(*inputs), rtol=1e-4, atol=1e-4)
    inputs = bench_linear.make_inputs(64, 16, 50, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(bench_linear.make_provider("skyrl+kept7", "k3")(*inputs),
                               bench_linear.make_provider("cpu+kept7", "k3")(*inputs), rtol=1e-4, atol=1e-4)


def test_kept_provider_matches_the_eager_truth_over_the_kept_sets():
    """<backend>+kept<K> (sampling replay's cost rows) computes the penalty over each position's kept set:
    the same as the eager formula with the rest of each row out of the softmax."""
    inputs = timing.make_inputs(64, 50, torch.float32, torch.device("cpu"))
    kept = providers.kept_ids_for(inputs[2], 50, 7)
    want = providers.eager_penalty(*inputs, estimator="k3", dtype=torch.float64, kept_ids=kept)
    got = providers.make_provider("cpu+kept7", "k3")(*inputs)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    plain = providers.eager_penalty(*inputs, estimator="k3", dtype=torch.float64)
    assert (plain - want).abs().max() > 1e-2  # the kept sets change the numbers: the check can fail
    # the hidden-state head's provider (kl-bench --linear): the same kept sets, from hidden states
    inputs = bench_linear.make_inputs(64, 16, 50, torch.float32, torch.device("cpu"))
    kept = providers.kept_ids_for(inputs[4], 50, 7)
    want = bench_linear.eager_linear(*(t.double() if i < 4 else t for i, t in enumerate(inputs)), estimator="k3",
                                     dtype=torch.float64, kept_ids=kept)
    got = bench_linear.make_provider("cpu+kept7", "k3")(*inputs)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv,words", [
    (["--compare", "missing.json"], "--compare missing.json"),
    (["--from", "missing.json"], "--from missing.json"),
    (["--json", "/nonexistent/folder/x.json"], "--json"),
    (["--csv", "/nonexistent/folder/x.csv"], "--csv"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "xla"], "--device"),
    (["--device", "nonsense"], "--device"),
    (["--providers", "foo"], "--providers foo"),
    (["--providers", "logits+cpu"], "--providers logits+cpu"),
    (["--providers", "cpu+fp32logits"], "--providers cpu+fp32logits"),
    (["--linear", "--providers", "nope+fp32logits"], "--providers nope"),
    (["--linear", "--providers", "liger"], "--providers liger"),
    (["--repeats", "0"], "--repeats"),
    (["--tokens", "0"], "--tokens"),
    (["--vocab", "0"], "--vocab"),
    (["--hidden", "512"], "--hidden applies to --linear"),
    (["--linear", "--hidden", "0"], "--hidden"),
    (["--threshold", "-1"], "--threshold"),
    (["--estimator", "k4"], "--estimator"),
    (["--tp", "2", "--linear"], "--tp"),
])
def test_arguments_are_checked_before_any_work(argv, words, capsys, monkeypatch):
    """Issue 38: every argument is checked first, with one line naming it (argparse's exit 2), before any
    measuring: a bandwidth reading or a case's inputs would mean the run had started."""
    from kl_kernels.tools import bench

    def started(*args, **kwargs):
        raise AssertionError("the run started before the arguments were checked")

    monkeypatch.setattr(bench, "read_bandwidth", started)
    monkeypatch.setattr(bench, "environment", started)
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_every_estimator_of_the_library_is_accepted():
    from kl_kernels.estimators import ESTIMATOR_NAMES
    from kl_kernels.tools import bench

    assert set(bench.ESTIMATORS) == set(ESTIMATOR_NAMES) and "k3+" in bench.ESTIMATORS


def test_help_texts_say_no_default_of_none(capsys):
    """Issue 38: an option without a default says itself what happens without it; argparse's
    '(default: None)' after that read as a contradiction (kl-lab --backend)."""
    from kl_kernels.tools import lab

    for main in (bench.main, lab.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default:" in text
