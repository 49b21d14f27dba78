"""KL controllers and diagnose() against hand-computed values and the kl-guide bands."""
import pytest
import torch

import kl_kernels


def test_adaptive_sequence_of_updates():
    ctl = kl_kernels.AdaptiveKLController(init_kl_coef=0.2, target_kl=3.0, horizon=10000)
    value = 0.2
    # (current_kl, n_steps) -> proportional error clipped to [-0.2, 0.2]
    for current, steps, error in [(6.0, 256, 0.2), (3.375, 256, 0.125), (0.3, 512, -0.2), (3.0, 64, 0.0),
                                  (2.4, 128, -0.2), (torch.tensor(4.5), 100, 0.2)]:
        ctl.update(current, steps)
        value *= 1 + error * steps / 10000
        assert ctl.value == pytest.approx(value, rel=1e-12)
    hand = 0.2 * (1 + 0.2 * 256 / 1e4) * (1 + 0.125 * 256 / 1e4) * (1 - 0.2 * 512 / 1e4) \
        * (1 - 0.2 * 128 / 1e4) * (1 + 0.2 * 100 / 1e4)
    assert ctl.value == pytest.approx(hand, rel=1e-12)


def test_adaptive_state_dict_round_trip():
    ctl = kl_kernels.AdaptiveKLController(0.1, 0.02, 500)
    ctl.update(0.05, 32)
    state = ctl.state_dict()
    other = kl_kernels.AdaptiveKLController(1.0, 1.0, 1)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.value == ctl.value
    ctl.update(0.01, 7)
    other.update(0.01, 7)
    assert other.value == ctl.value


def test_fixed():
    ctl = kl_kernels.FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    other = kl_kernels.FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


@pytest.mark.parametrize("args,words", [((-0.1, 3.0, 100), "init_kl_coef"), ((0.1, 0.0, 100), "target_kl"),
                                        ((0.1, 3.0, 0), "horizon"), ((float("nan"), 3.0, 10), "init_kl_coef")])
def test_adaptive_bad_input(args, words):
    with pytest.raises(ValueError, match=words):
        kl_kernels.AdaptiveKLController(*args)


def test_update_bad_input():
    ctl = kl_kernels.AdaptiveKLController(0.1, 3.0, 100)
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, -1)
    assert ctl.value == 0.1
    with pytest.raises(ValueError, match="kl_coef"):
        kl_kernels.FixedKLController(-1)


@pytest.mark.parametrize("coef,band,advice", [
    (0.0, "no-brake", "raise"), (0.0099, "no-brake", "raise"), (0.01, "loose", "keep"), (0.0499, "loose", "keep"),
    (0.05, "sweet-spot", "keep"), (0.2, "sweet-spot", "keep"), (0.21, "tight", "keep"), (1.0, "tight", "keep"),
    (1.5, "frozen", "lower"), (10.0, "frozen", "lower"), (10.5, "out-of-range", "lower"),
])
def test_diagnose_coef_bands(coef, band, advice):
    d = kl_kernels.diagnose(kl_coef=coef)
    assert d.kl_coef_band == band and d.advice == advice
    assert d.kl_per_token_band is None and d.kl_per_sequence_band is None
    assert d.messages and all(isinstance(m, str) for m in d.messages)


@pytest.mark.parametrize("per_token,per_sequence,bands,advice", [
    (0.005, None, ("too-low", None), "lower"), (0.01, None, ("healthy", None), "keep"),
    (0.05, None, ("healthy", None), "keep"), (0.06, None, ("too-high", None), "raise"),
    (None, 0.5, (None, "too-low"), "lower"), (None, 1.0, (None, "healthy"), "keep"),
    (None, 6.0, (None, "healthy"), "keep"), (None, 6.5, (None, "too-high"), "raise"),
    (0.005, 7.0, ("too-low", "too-high"), "raise"),  # any too-high wins
    (-0.02, 3.0, ("too-low", "healthy"), "lower"),  # k1 estimates can be negative
])
def test_diagnose_measured_kl_governs(per_token, per_sequence, bands, advice):
    d = kl_kernels.diagnose(kl_coef=5.0, kl_per_token=per_token, kl_per_sequence=per_sequence)
    assert (d.kl_per_token_band, d.kl_per_sequence_band) == bands
    assert d.kl_coef_band == "frozen" and d.advice == advice


def test_diagnose_bad_input():
    with pytest.raises(ValueError, match="kl_coef"):
        kl_kernels.diagnose(kl_coef=-1)
    with pytest.raises(ValueError, match="kl_per_token"):
        kl_kernels.diagnose(kl_per_token=float("nan"))
    assert kl_kernels.diagnose().advice == "keep"
    assert kl_kernels.diagnose(kl_per_sequence=torch.tensor(2.0)).kl_per_sequence_band == "healthy"


def test_update_takes_negative_kl_and_refuses_nan_inf_and_a_negative_multiplier():
    ctl = kl_kernels.AdaptiveKLController(0.1, 3.0, 100)
    ctl.update(-0.05, 10)  # a batch mean of k1 is often slightly negative early in training
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100), rel=1e-12)
    before = ctl.state_dict()
    for bad in (float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="current_kl"):
            ctl.update(bad, 1)
    # below target, n_steps = 5 * horizon makes the multiplier 0, past it negative
    for steps in (500, 501, 10_000):
        with pytest.raises(ValueError, match=r"n_steps=\d+ with horizon=100"):
            ctl.update(0.0, steps)
    assert ctl.state_dict() == before
    ctl.update(0.0, 499)  # the multiplier is still positive
    assert ctl.value > 0
    kl_kernels.AdaptiveKLController(1.0, 1.0, 1).load_state_dict(ctl.state_dict())
