"""kl-lab --quick: the qualitative shape of the guide's claims on the lab's small model, fixed seeds.
The thresholds are far from the measured values (k=0: KL ~5 nats/token, quality -6; k=0.1: KL ~0.2,
quality within 0.05 of the reference; k=10: KL ~0.01), so the test checks the shape, not noise."""
import pytest

from kl_kernels.tools import lab, lab_report


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    assert lab.main(["--quick", "--out", str(out), "--no-plots"]) == 0
    rows = lab.read_steps(out / "steps.csv")
    return rows, (out / "report.md").read_text()


def test_quick_lab_shape(quick):
    rows, report = quick
    final = lab_report.summarise(rows)
    ref = final["reference"]
    # KL per token falls as k_kl rises
    assert final[0.0]["kl_token"] > 10 * final[0.1]["kl_token"] > 10 * final[10.0]["kl_token"]
    # k_kl = 0 hacks the proxy: more proxy reward and worse true quality than the sweet spot
    assert final[0.0]["proxy"] > final[0.1]["proxy"] + 1.0
    assert final[0.0]["quality"] < final[0.1]["quality"] - 1.0
    # the sweet spot improves the proxy over the reference and keeps the language
    assert final[0.1]["proxy"] > ref["proxy"] + 0.1 and final[0.1]["quality"] > ref["quality"] - 0.3
    # k_kl = 10 stays near the reference
    assert final[10.0]["kl_token"] < 0.05 and abs(final[10.0]["quality"] - ref["quality"]) < 0.2
    assert "| KL falls as k_kl rises (the brake works), within noise | held |" in report


def test_chain_quality_is_the_chains_log_likelihood():
    import torch

    chain = lab.Chain()
    tokens = chain.sample(64, torch.Generator().manual_seed(0))
    mask = lab.response_mask(tokens)
    assert (mask.sum(-1) >= 1).all() and ((tokens[:, 1:] == lab.EOS).float() * mask).sum() <= 64
    want = []
    for row, m in zip(tokens.tolist(), mask.tolist()):
        n = int(sum(m))
        want.append(sum(float(chain.log_probs[a, b]) for a, b in zip(row[:n], row[1:n + 1])) / n)
    torch.testing.assert_close(chain.quality(tokens, mask), torch.tensor(want))


def test_missing_matplotlib_is_said_at_the_start(tmp_path, monkeypatch, capsys):
    """A plain install has no matplotlib: kl-lab says so before any run (it used to die at the end)."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as stop:
        lab.main(["--quick", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--no-plots" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
