"""Sampling replay (docs/contract.md section 12): kept_ids on token_logprobs and kl_penalty, every
backend, against float64 formulas of the softmax over each row's kept set; rows without a set bit
for bit as without kept_ids; bad kept sets; a row alone or in a batch, the same bits."""
import pytest
import torch

import kl_kernels

V = 300


def _kept(labels, width, rng, pad_middle=True):
    """[..., width] kept ids holding each label, with repeats and -1 padding in the middle."""
    kept = torch.randint(0, V, (*labels.shape, width), generator=rng, device="cpu").to(labels.device)
    kept[..., width // 2] = labels  # the label somewhere inside
    if width > 3:
        kept[..., 1] = kept[..., 2]  # a repeat
        if pad_middle:
            kept[..., 3] = -1
    return kept


def _members(kept, vocab=V):
    """[..., V] bool: each row's kept set (a padding entry writes the row's largest id again: a scatter of
    False at a clamped -1 could land on a kept id 0, in either order)."""
    safe = torch.where(kept >= 0, kept, kept.amax(-1, keepdim=True).clamp(min=0))
    members = torch.zeros(*kept.shape[:-1], vocab, dtype=torch.bool).scatter_(-1, safe, True)
    return torch.where((kept >= 0).any(-1, keepdim=True), members, True)


def _truth(logits, ref_logits, labels, kept, temperature):
    """float64 logp, ref_logp, entropy, exact KL over each row's set (rows of all -1: the whole vocabulary)."""
    members = _members(kept, logits.shape[-1])
    t = temperature.double().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature

    def log_softmax(z):
        return torch.where(members, torch.log_softmax((z.double() / t).masked_fill(~members, float("-inf")), -1), 0.0)

    log_p, log_q = log_softmax(logits), log_softmax(ref_logits)
    p = torch.where(members, log_p.exp(), 0.0)
    pick = lambda lp: lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    # a banned token (p = 0) adds nothing: selected before the product, so no 0 * -inf reaches a gradient
    live = p > 0
    safe_p = torch.where(live, log_p, 0.0)
    entropy = -torch.where(live, p * safe_p, 0.0).sum(-1)
    banned = (live & (log_q == float("-inf"))).any(-1)
    kl = torch.where(live, p * (safe_p - torch.where(live & (log_q > float("-inf")), log_q, 0.0)), 0.0).sum(-1)
    kl = torch.where(banned, float("inf"), kl)
    # a set whose logits are all -inf has no softmax: a NaN row, as a row of all -inf logits
    undefined_p, undefined_q = ((torch.isnan(lp) & members).any(-1) for lp in (log_p, log_q))
    return (pick(log_p), pick(log_q), torch.where(undefined_p, float("nan"), entropy),
            torch.where(undefined_p | undefined_q, float("nan"), kl))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 5, 40, V])
@pytest.mark.parametrize("packed", [False, True])
def test_against_float64(backend, dtype, width, packed):
    rng = torch.Generator().manual_seed(width)
    shape = (12,) if packed else (2, 6)
    logits = (torch.randn(*shape, V) * 2).to(dtype)
    ref_logits = (logits.float() + 0.3 * torch.randn(*shape, V)).to(dtype)
    labels = torch.randint(0, V, shape)
    kept = torch.arange(V).expand(*shape, V).clone() if width == V else _kept(labels, width, rng)
    kept.view(-1, kept.shape[-1])[3] = -1  # one row without a set: its whole vocabulary
    temperature = torch.rand(shape) + 0.5
    layout = dict(cu_seqlens=torch.tensor([0, 5, 12])) if packed else {}
    x = logits.clone().requires_grad_()
    out = kl_kernels.kl_penalty(x, labels, ref_logits=ref_logits, estimator="full", temperature=temperature,
                                kept_ids=kept, return_entropy=True, backend=backend, **layout)
    weights = torch.randn(3, *shape)
    (weights[0] * out.logprobs + weights[1] * out.kl + weights[2] * out.entropy).sum().backward()
    x64 = logits.double().requires_grad_()
    truth = _truth(x64, ref_logits, labels, kept, temperature)
    (weights[0] * truth[0] + weights[1] * truth[3] + weights[2] * truth[2]).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip((out.logprobs, out.ref_logprobs, out.entropy, out.kl), truth):
        torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    outside = ~_members(kept)
    assert (x.grad[outside] == 0).all()  # nothing outside the kept sets


def test_rows_without_a_set_are_bit_for_bit_unchanged(backend):
    logits = torch.randn(2, 7, V) * 3
    labels = torch.randint(0, V, (2, 7))
    kept = _kept(labels, 9, torch.Generator().manual_seed(0))
    kept[0] = -1  # the first sequence: no sets
    grads = []
    outs = []
    for kept_ids in (None, kept):
        x = logits.clone().requires_grad_()
        logp, entropy = kl_kernels.token_logprobs(x, labels, return_entropy=True, kept_ids=kept_ids, backend=backend)
        (logp.sum() + entropy.sum()).backward()
        outs.append((logp, entropy))
        grads.append(x.grad)
    for plain, replayed in zip(*outs):
        assert torch.equal(plain[0], replayed[0])
    assert torch.equal(grads[0][0], grads[1][0])  # including the sign of every zero


def test_a_row_has_the_same_bits_alone_and_in_a_batch(backend):
    logits = torch.randn(9, V) * 2
    labels = torch.randint(0, V, (9,))
    kept = _kept(labels, 17, torch.Generator().manual_seed(1))
    kept[4] = -1

    def run(index):
        x = logits[index].clone().requires_grad_()
        out = kl_kernels.kl_penalty(x, labels[index], ref_logprobs=-torch.ones(len(index)), estimator="k3",
                                    kept_ids=kept[index], return_entropy=True, backend=backend)
        (out.kl.sum() + out.entropy.sum()).backward()
        return out.logprobs.detach(), out.kl.detach(), out.entropy.detach(), x.grad

    batch = run(torch.tensor([8, 2, 4, 0, 6]))
    for at, row in enumerate([8, 2, 4, 0, 6]):
        for got, want in zip(run(torch.tensor([row])), batch):
            assert torch.equal(got[0], want[at])


def test_bad_kept_sets(backend):
    logits = torch.randn(2, 3, V)
    labels = torch.randint(0, V, (2, 3))
    kept = _kept(labels, 4, torch.Generator().manual_seed(2))
    outside = kept.clone()
    outside[0, 1] = (labels[0, 1] + 1) % V  # the label left out of its set
    with pytest.raises(ValueError, match="kept_ids"):
        kl_kernels.token_logprobs(logits, labels, kept_ids=outside, backend=backend)
    with pytest.raises(ValueError, match="kept_ids"):
        kl_kernels.token_logprobs(logits, labels, kept_ids=torch.full((2, 3, 2), V), backend=backend)
    with pytest.raises(ValueError, match="kept_ids"):
        kl_kernels.token_logprobs(logits, labels, kept_ids=kept[0], backend=backend)
    with pytest.raises(TypeError, match="kept_ids"):
        kl_kernels.token_logprobs(logits, labels, kept_ids=kept.float(), backend=backend)
    # validate=False: a label outside its set gives a NaN row, the others are untouched
    logp = kl_kernels.token_logprobs(logits, labels, kept_ids=outside, validate=False, backend=backend)
    assert torch.isnan(logp[0, 1]) and torch.isfinite(logp[torch.arange(2) != 0]).all()
    # an ignored row is 0 whatever its set says
    ignored = labels.clone()
    ignored[1, 2] = -100
    assert kl_kernels.token_logprobs(logits, ignored, kept_ids=kept, backend=backend)[1, 2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [(1.0, None), (0.5, 3.0)])
def test_hidden_states_against_float64(backend, dtype, transform, monkeypatch):
    """kept_ids on linear_kl_penalty: the rows with a set projected onto their kept columns, the others in
    logits tiles (row tiles of 16, vocabulary chunks of 100 rows in the backward), a logit transform, a
    reference model; values and the gradients of hidden, weight and bias against float64."""
    logit_scale, softcap = transform
    monkeypatch.setattr(kl_kernels.projection, "PARTIAL_BYTES", 100 * 24 * 4)
    n, hidden_size = 37, 24
    hidden = torch.randn(n, hidden_size).to(dtype)
    weight = (torch.randn(V, hidden_size) / 3).to(dtype)
    bias = torch.randn(V).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(n, hidden_size)).to(dtype)
    labels = torch.randint(0, V, (n,))
    labels[5] = -100
    kept = _kept(labels.clamp(min=0), 9, torch.Generator().manual_seed(3))
    kept[7] = -1
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = kl_kernels.linear_kl_penalty(h, w, labels, bias=b, ref_hidden=ref_hidden, ref_weight=weight, ref_bias=bias,
                                       estimator="full",
                                       logit_scale=logit_scale, softcap=softcap, kept_ids=kept, return_entropy=True,
                                       tile_bytes=1, backend=backend)
    g = torch.randn(3, n)
    (g[0] * out.logprobs + g[1] * out.kl + g[2] * out.entropy).sum().backward()

    def logits(hh, ww, bb):
        z = torch.nn.functional.linear(hh.double(), ww.double(), bb.double()) * logit_scale
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    truth = _truth(logits(h64, w64, b64), logits(ref_hidden, weight, bias), labels.clamp(min=0), kept, 1.0)
    valid = (labels != -100).double()
    (g[0] * truth[0] * valid + g[1] * truth[3] * valid + g[2] * truth[2] * valid).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for got, want in zip((out.logprobs, out.ref_logprobs, out.entropy, out.kl), truth):
        torch.testing.assert_close(got.double(), want.detach() * valid, **tol)
    for got, want in zip((h.grad, w.grad, b.grad), (h64.grad, w64.grad, b64.grad)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= tol["rtol"] * scale + tol["atol"]


def test_hidden_state_kept_rows_skip_the_vocabulary(monkeypatch):
    """From hidden states a row with a kept set costs O(K H) (docs/contract.md section 13): with every row
    kept, no projection onto the whole vocabulary runs, forward or backward; values and gradients are
    those of the logits path on the same F.linear logits."""
    from kl_kernels import projection

    calls = []
    original = projection.Projection._project
    monkeypatch.setattr(projection.Projection, "_project", lambda self, *a: calls.append(1) or original(self, *a))
    n, hidden_size = 21, 32
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = (torch.randn(V, hidden_size) / 4).requires_grad_()
    labels = torch.randint(0, V, (n,))
    kept = _kept(labels, 11, torch.Generator().manual_seed(4))
    logp, entropy = kl_kernels.linear_token_logprobs(hidden, weight, labels, kept_ids=kept, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert calls == []
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    want_logp, want_entropy = kl_kernels.token_logprobs(torch.nn.functional.linear(h, w), labels, kept_ids=kept,
                                                        return_entropy=True)
    (want_logp.sum() + want_entropy.sum()).backward()
    for got, want in ((logp, want_logp), (entropy, want_entropy), (hidden.grad, h.grad), (weight.grad, w.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kept[3] = -1  # one row without a set: the tiles hold it alone
    kl_kernels.linear_token_logprobs(hidden, weight, labels, kept_ids=kept)
    assert calls


@pytest.mark.parametrize("dtype, logits_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("hidden_size, width", [(24, 1), (100, 7), (1030, 50)])
def test_hidden_state_kept_row_alone_and_in_a_batch(dtype, logits_dtype, hidden_size, width):
    """A kept row's log-prob, entropy and hidden-gradient row have the same bits alone and in any batch of
    kept and plain rows (section 11 with section 13's projection onto the kept ids)."""
    n = 40
    g = torch.Generator().manual_seed(hidden_size + width)
    hidden = torch.randn(n, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(V, hidden_size, generator=g) / hidden_size ** 0.5).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    kept = _kept(labels, width, g, pad_middle=False)
    kept[::3] = -1  # a third of the rows without a set

    def run(index):
        h = hidden[index].clone().requires_grad_()
        logp, entropy = kl_kernels.linear_token_logprobs(h, weight, labels[index], kept_ids=kept[index],
                                                         return_entropy=True, logits_dtype=logits_dtype)
        (logp * 0.7 + entropy).sum().backward()
        return logp.detach(), entropy.detach(), h.grad

    order = torch.randperm(n, generator=g)
    batch = run(order)
    for at in (0, 1, 2, n - 1):
        for got, want in zip(run(order[at:at + 1]), batch):
            assert torch.equal(got[0], want[at]), (at, int(order[at]))


def _brute_force_kept(row, temperature, top_k, top_p, min_p):
    """One row's kept set, step by step in float64 as vLLM's sampler orders them."""
    x = row.double() / temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if min_p is not None:
        p = torch.softmax(x, -1)
        keep &= p >= min_p * p.max()
    if top_k is not None:
        keep &= x >= x[keep].topk(min(top_k, int(keep.sum()))).values[-1]
    if top_p is not None:
        p = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
        mass, kept = 0.0, set()
        for index in p.argsort(descending=True).tolist():  # most probable first until the mass reaches top_p
            kept.add(index)
            mass += p[index].item()
            if mass >= top_p:
                break
        keep &= torch.tensor([v in kept for v in range(len(x))])
    return set(keep.nonzero().flatten().tolist())


@pytest.mark.parametrize("settings", [dict(top_k=7), dict(top_p=0.8), dict(min_p=0.05), dict(top_k=20, top_p=0.9),
                                      dict(top_k=50, top_p=0.95, min_p=0.01, temperature=0.7)])
def test_kept_ids_from_sampler(settings):
    logits = torch.randn(3, 4, 200) * 3
    kept = kl_kernels.kept_ids_from_sampler(logits, **settings)
    assert kept.shape[:2] == (3, 4)
    args = dict(temperature=1.0, top_k=None, top_p=None, min_p=None) | settings
    for row, ids in zip(logits.reshape(-1, 200), kept.reshape(12, -1)):
        assert set(ids[ids >= 0].tolist()) == _brute_force_kept(row, **args)
        assert ((ids >= 0).cumprod(0) == (ids >= 0)).all()  # -1 only after a row's set
    # a token sampled from the engine's truncated distribution is in its kept set: kept_ids validates it
    members = _members(kept, 200)
    probs = torch.softmax((logits / args["temperature"]).masked_fill(~members, float("-inf")), -1)
    sampled = torch.multinomial(probs.reshape(12, 200), 1).view(3, 4)
    kl_kernels.token_logprobs(logits, sampled, temperature=args["temperature"], kept_ids=kept)


def test_kept_ids_from_sampler_bad_settings():
    """The values each engine rejects (tests/test_engine_samplers.py checks them against the engines' own
    SamplingParams); top_k 0 is vLLM's "off" and SGLang's error; width is the result's K."""
    with pytest.raises(ValueError, match="top_p"):
        kl_kernels.kept_ids_from_sampler(torch.randn(2, 9), top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        kl_kernels.kept_ids_from_sampler(torch.randn(2, 9), top_k=-2)
    with pytest.raises(ValueError, match="top_k"):
        kl_kernels.kept_ids_from_sampler(torch.randn(2, 9), top_k=0, engine="sglang")
    with pytest.raises(ValueError, match="engine"):
        kl_kernels.kept_ids_from_sampler(torch.randn(2, 9), engine="trt")
    assert kl_kernels.kept_ids_from_sampler(torch.randn(2, 9), top_k=0).tolist() == [[-1], [-1]]
    assert kl_kernels.kept_ids_from_sampler(torch.randn(2, 9), top_k=3, width=5).shape == (2, 5)
    with pytest.raises(ValueError, match="width"):
        kl_kernels.kept_ids_from_sampler(torch.randn(2, 9), top_k=3, width=2)


def test_the_cpu_kernel_marks_the_same_entries_as_the_sort(monkeypatch):
    """replay._first_occurrences: the CPU bitmap kernel (csrc/cpu/replay.cpp) and the stable sort used on
    other devices mark the same entries: each id in [0, columns) at its first place in its row."""
    from kl_kernels import replay

    assert replay._has_cpu_kernel()
    g = torch.Generator().manual_seed(5)
    for columns, width in ((1, 3), (64, 40), (65, 200), (1000, 7), (70000, 513)):
        ids = torch.randint(-1, min(columns, 50) if width > 100 else columns, (33, width), generator=g)
        ids[0] = -1
        ids[1, : width // 2] = columns - 1  # repeats of the last column, a whole word of the bitmap
        kernel = replay._first_occurrences(ids, columns)
        monkeypatch.setattr(replay, "_has_cpu_kernel", lambda: False)
        sort = replay._first_occurrences(ids, columns)
        monkeypatch.undo()
        assert torch.equal(kernel, sort)
        torch.library.opcheck(torch.ops.kl_kernels.kept_counts.default, (ids, columns))
        # the truth, one row at a time
        for row, marks in zip(ids.tolist(), kernel.tolist()):
            seen = set()
            for value, mark in zip(row, marks):
                assert mark == (value >= 0 and value not in seen)
                seen.add(value)


def _same_bits(a, b):
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def test_a_banned_token_inside_its_set(backend):
    """Issue 35 finding 1: a label whose logit is -inf inside its kept set has log-prob -inf (probability 0),
    as without kept_ids, not 0; a reference that bans the sampled token gives ref_logprobs -inf and k1 +inf;
    a set whose logits are all -inf is a NaN row, as a row of all -inf logits is without kept_ids."""
    inf = float("inf")
    logits = torch.tensor([[2.0, -inf, 1.0, 0.5], [2.0, 0.5, 1.0, 0.5], [-inf, -inf, 1.0, 0.5]])
    ref_logits = torch.tensor([[2.0, 0.0, 1.0, 0.5], [1.0, -inf, 1.0, 0.5], [-inf, -inf, 1.0, 0.5]])
    labels = torch.tensor([1, 1, 0])
    kept = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, -1]])
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, kept_ids=kept, estimator="k1",
                                return_entropy=True, backend=backend)
    plain = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, estimator="k1", backend=backend)
    assert out.logprobs[0] == -inf and plain.logprobs[0] == -inf
    assert out.ref_logprobs[1] == -inf and out.kl[1] == inf and plain.kl[1] == inf
    assert torch.isfinite(out.logprobs[1]) and torch.isfinite(out.entropy[:2]).all()
    assert torch.isnan(out.logprobs[2]) and torch.isnan(out.entropy[2])
    all_banned = kl_kernels.token_logprobs(torch.full((1, 4), -inf), torch.tensor([0]), backend=backend)
    assert torch.isnan(all_banned).all()


@pytest.mark.parametrize("estimator", ["k3", "low_var_kl", "k1+", "k3+", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_kept_ids_of_all_minus_one_are_bit_for_bit_the_call_without(backend, estimator, dtype, packed):
    """Issue 35 finding 2: kl_penalty with kept_ids of all -1 (no row has a set) gives every output and
    the gradient with the bits of the call without kept_ids, on the one-pass backends too; and the rows
    without a set keep those bits when other rows of their sequence have one."""
    shape = (15,) if packed else (3, 5)
    logits = (torch.randn(*shape, V) * 3).to(dtype)
    ref_logits = (logits.double() + 0.5 * torch.randn(*shape, V)).to(dtype)
    labels = torch.randint(0, V, shape)
    mask = torch.rand(shape) > 0.2
    layout = dict(cu_seqlens=torch.tensor([0, 4, 11, 15])) if packed else {}
    upstream = torch.randn(5, *shape)

    def run(kept_ids):
        x = logits.clone().requires_grad_()
        out = kl_kernels.kl_penalty(x, labels, ref_logits=ref_logits, mask=mask, estimator=estimator,
                                    kept_ids=kept_ids, return_entropy=True, backend=backend, **layout)
        loss = sum((g * t).sum() for g, t in zip(upstream, (out.logprobs, out.kl, out.penalty, out.entropy)))
        (loss + out.kl_sum.sum() + (upstream[4].reshape(-1)[:out.kl_mean.numel()] * out.kl_mean).sum()).backward()
        return out, x.grad

    plain, plain_grad = run(None)
    none, none_grad = run(torch.full((*shape, 4), -1))
    for name in plain._fields:
        assert _same_bits(getattr(none, name), getattr(plain, name)), name
    assert _same_bits(none_grad, plain_grad)
    # some rows with a set: every row without one keeps its bits
    kept = _kept(labels, 9, torch.Generator().manual_seed(4))
    without = torch.rand(shape) < 0.6
    kept[without] = -1
    some, some_grad = run(kept)
    for name in ("logprobs", "ref_logprobs", "kl", "penalty", "entropy"):
        assert _same_bits(getattr(some, name)[without], getattr(plain, name)[without]), name
    flat_without = without.reshape(-1)
    assert _same_bits(some_grad.reshape(-1, V)[flat_without], plain_grad.reshape(-1, V)[flat_without])


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_a_wide_row_alone_and_in_a_batch(backend_name):
    """Issue 35 findings 3 and 4: with 2 threads, a row of V >= 32768 values (and a kept set of K >= 32768
    ids) has the same bits alone, as the one row left over after a block, and inside a block: ATen splits
    a reduction with one output across threads."""
    vocab = 40000
    logits = torch.randn(22, vocab) * 3
    labels = torch.randint(0, vocab, (22,))
    kept = torch.stack([torch.randperm(vocab) for _ in range(3)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)

    def run(index, kept_ids=None):
        x = logits[index].clone().requires_grad_()
        out = kl_kernels.kl_penalty(x, labels[index], ref_logprobs=-torch.ones(len(index)), estimator="k3",
                                    return_entropy=True, kept_ids=kept_ids, backend=backend_name)
        (out.kl.sum() + out.entropy.sum()).backward()
        return out.logprobs.detach(), out.kl.detach(), out.entropy.detach(), x.grad

    try:
        for size in (21, 22):  # one block and a row over (reference: blocks of 26 rows at this V), or none
            batch = run(torch.arange(size))
            for row in range(size):  # every row: a split sum may round alike by chance
                for got, want in zip(run(torch.tensor([row])), batch):
                    assert _same_bits(got[0], want[row]), (size, row)
        batch = run(torch.arange(3), kept)
        for row in range(3):
            for got, want in zip(run(torch.tensor([row]), kept[row:row + 1]), batch):
                assert _same_bits(got[0], want[row]), row
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 1])
def test_kept_set_fuzz(backend, seed):
    """Seeded random kept-set cases (issue 35; KL_KERNELS_FUZZ_CASES, default 10 per seed): widths from 1
    to the vocabulary, repeats, -1 anywhere, rows without a set, ignored rows, banned (-inf) logits inside
    the sets (the label's too), a reference banning kept tokens, tensor temperatures, every estimator;
    values and the gradient against float64 over the sets, and every row alone with the same bits."""
    import os
    import random

    from kl_kernels.estimators import ESTIMATOR_NAMES

    rng = random.Random(seed)
    interpreted = backend == "triton" and not torch.cuda.is_available()
    for case in range(int(os.environ.get("KL_KERNELS_FUZZ_CASES", "10"))):
        torch.manual_seed(1000 * seed + case)
        n, vocab = rng.randint(1, 9 if interpreted else 24), rng.choice([7, 64, 301] if interpreted else [7, 301, 2049])
        width = rng.choice([1, 2, 5, vocab // 2 + 1, vocab])
        dtype = rng.choice([torch.float32, torch.bfloat16])
        estimator = rng.choice(ESTIMATOR_NAMES)
        logits = (torch.randn(n, vocab) * rng.choice([0.5, 3.0])).to(dtype)
        ref_logits = (logits.float() + 0.5 * torch.randn(n, vocab)).to(dtype)
        labels = torch.randint(0, vocab, (n,))
        kept = torch.randint(-1, vocab, (n, width))
        kept[:, rng.randrange(width)] = labels
        kept[torch.rand(n) < 0.25] = -1  # rows without a set
        labels[torch.rand(n) < 0.15] = -100
        banned = torch.rand(n, vocab) < 0.05
        banned[torch.rand(n) < 0.5] = False
        logits = logits.masked_fill(banned, float("-inf"))
        ref_logits = ref_logits.masked_fill(torch.rand(n, vocab) < 0.03, float("-inf"))
        temperature = torch.rand(n) + 0.5
        grads = torch.randn(3, n)

        def run(index):
            x = logits[index].clone().requires_grad_()
            out = kl_kernels.kl_penalty(x, labels[index], ref_logits=ref_logits[index], estimator=estimator,
                                        temperature=temperature[index], kept_ids=kept[index], return_entropy=True,
                                        backend=backend)
            parts = (out.logprobs, out.kl, out.entropy)
            sum(torch.where(torch.isfinite(t), g[index] * t, 0.0).sum() for g, t in zip(grads, parts)).backward()
            return out, x.grad

        out, grad = run(torch.arange(n))
        x64 = logits.double().requires_grad_()
        ignored = labels == -100
        truth = _truth(x64, ref_logits, labels.clamp(min=0), torch.where(ignored[:, None], -1, kept), temperature)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for name, got, want in zip(("logprobs", "ref_logprobs", "entropy"), (out.logprobs, out.ref_logprobs,
                                                                               out.entropy), truth[:3]):
            want = torch.where(ignored, 0.0, want.detach())
            torch.testing.assert_close(got.double(), want, equal_nan=True, **tol, msg=lambda m: f"{case} {name}: {m}")
        if estimator == "full":
            want = torch.where(ignored, 0.0, truth[3].detach())
            torch.testing.assert_close(out.kl.double(), want, equal_nan=True, **tol, msg=lambda m: f"{case} kl: {m}")
        elif estimator in ("k1", "kl"):
            finite = torch.isfinite(truth[0]) & torch.isfinite(truth[1]) & ~ignored
            torch.testing.assert_close(out.kl.double()[finite], (truth[0] - truth[1]).detach()[finite], **tol)
        if estimator in ("k1", "kl", "full"):  # the gradient where every output is finite
            live = ~ignored & torch.isfinite(truth[0]) & torch.isfinite(truth[1]) & torch.isfinite(truth[2])
            live &= torch.isfinite(truth[3]) if estimator == "full" else live
            kl_truth = truth[3] if estimator == "full" else truth[0] - truth[1]
            parts = (truth[0], kl_truth, truth[2])
            sum(torch.where(live, g * t, 0.0).sum() for g, t in zip(grads.double(), parts)).backward()
            torch.testing.assert_close(grad.double()[live], x64.grad[live], **tol, msg=lambda m: f"{case} grad: {m}")
        for row in rng.sample(range(n), min(n, 3)):
            alone, alone_grad = run(torch.tensor([row]))
            for name in ("logprobs", "ref_logprobs", "kl", "entropy"):
                assert _same_bits(getattr(alone, name)[0], getattr(out, name)[row]), (case, row, name)
            assert _same_bits(alone_grad[0], grad[row]), (case, row)
