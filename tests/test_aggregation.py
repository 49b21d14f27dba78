"""aggregate (verl's modes) and kl_rewards against plain loops."""
import pytest
import torch

import kl_kernels


def loop_aggregate(values, mask, mode, global_tokens=None, global_sequences=None):
    values, mask = values.double().tolist(), mask.double().tolist()
    rows = [(sum(v * m for v, m in zip(vr, mr) if m != 0), sum(mr), any(m != 0 for m in mr))
            for vr, mr in zip(values, mask)]
    width = len(values[0])
    if mode == "token-sum":
        return sum(r[0] for r in rows)
    if mode == "token-mean":
        tokens = sum(r[1] for r in rows) if global_tokens is None else global_tokens
        return sum(r[0] for r in rows) / tokens if tokens else 0.0
    per_seq = {"seq-mean-token-sum": lambda s, c: s, "seq-mean-token-sum-norm": lambda s, c: s,
               "seq-mean-token-mean": lambda s, c: s / c}[mode]
    kept = [per_seq(s, c) for s, c, has in rows if has]
    sequences = len(kept) if global_sequences is None else global_sequences
    seq_mean = sum(kept) / sequences if sequences else 0.0
    # Dr. GRPO / current verl (PR 5417): the sequence mean of token sums over the mask width
    return seq_mean / width if mode == "seq-mean-token-sum-norm" else seq_mean


MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", ["bool", "float_weights"])
@pytest.mark.parametrize("globals_", [(None, None), (50, 7), (torch.tensor(40), torch.tensor(9))])
def test_modes(mode, mask_kind, globals_):
    values = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 8) > 0.4
    mask[2] = False  # a sequence with no valid token
    if mask_kind == "float_weights":
        mask = mask * (torch.rand(5, 8) + 0.5)
    poisoned = values.detach().clone()
    poisoned[mask == 0] = float("nan")  # masked values must never reach the result
    poisoned.requires_grad_(True)
    got = kl_kernels.aggregate(poisoned, mask, mode, global_tokens=globals_[0], global_sequences=globals_[1])
    g = [None if x is None else float(x) for x in globals_]
    want = loop_aggregate(values.detach(), mask, mode, *g)
    assert got.dim() == 0 and got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    assert torch.isfinite(poisoned.grad).all() and (poisoned.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_is_zero(mode):
    values = torch.randn(3, 4, requires_grad=True)
    out = kl_kernels.aggregate(values, torch.zeros(3, 4), mode)
    assert out.item() == 0.0
    out.backward()
    assert (values.grad == 0).all()
    if mode != "token-sum":  # the mode without a count denominator
        assert kl_kernels.aggregate(values, torch.ones(3, 4), mode, global_tokens=0, global_sequences=0).item() == 0


def test_aggregate_bad_input():
    with pytest.raises(ValueError, match="token-mean"):
        kl_kernels.aggregate(torch.zeros(2, 3), torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match="mask"):
        kl_kernels.aggregate(torch.zeros(2, 3), torch.ones(2, 4), "token-mean")
    with pytest.raises(ValueError, match="global_tokens"):
        kl_kernels.aggregate(torch.zeros(2, 3), torch.ones(2, 3), "token-mean", global_tokens=-1)
    with pytest.raises(TypeError, match="values"):
        kl_kernels.aggregate(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), "token-mean")


def test_kl_rewards_hand_example():
    kl = torch.tensor([[0.5, 1.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    scores = torch.tensor([2.0, -7.0, 5.0])
    rewards = kl_kernels.kl_rewards(scores, kl, mask, 0.1, score_clip=3.0)
    expected = torch.tensor([[-0.05, -0.1, -0.2 + 2.0, 0.0],
                             [0.0, -0.1, 0.0, -0.1 - 3.0],  # score clipped to -3 at the last valid token
                             [0.0, 0.0, 0.0, 0.0]])  # no valid token: no score
    torch.testing.assert_close(rewards, expected)
    assert not rewards.requires_grad


def test_kl_rewards_random_against_loop():
    kl = torch.randn(6, 10, dtype=torch.float64)
    mask = torch.rand(6, 10) > 0.3
    scores = torch.randn(6, dtype=torch.float64) * 4
    kl_nan = kl.clone()
    kl_nan[~mask] = float("nan")
    rewards = kl_kernels.kl_rewards(scores, kl_nan, mask, 0.2)
    for b in range(6):
        valid = mask[b].nonzero().flatten().tolist()
        for t in range(10):
            want = -0.2 * kl[b, t].item() if t in valid else 0.0
            if valid and t == valid[-1]:
                want += scores[b].item()
            assert rewards[b, t].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("coef", [-0.1, float("nan"), float("inf")])
def test_kl_rewards_bad_coef(coef):
    with pytest.raises(ValueError, match="kl_coef"):
        kl_kernels.kl_rewards(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3), coef)
    with pytest.raises(ValueError, match="scores"):
        kl_kernels.kl_rewards(torch.zeros(3), torch.zeros(2, 3), torch.ones(2, 3), 0.1)
