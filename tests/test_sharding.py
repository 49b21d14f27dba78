"""A tensor-parallel vocabulary (process_group=, docs/contract.md section 10), with the gloo backend on
CPU in 2 and 4 processes: every rank's outputs equal the single-process result on the whole
vocabulary, bit for bit the same on every rank and from run to run; its gradient is its shard of
the whole gradient; bad or disagreeing input raises on every rank instead of hanging.

Each spawned process builds the whole inputs from a shared seed, keeps its (uneven) shard, runs the
sharded call and the single-process call, and compares. Failures come back as the child's traceback.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kl_kernels
from kl_kernels.tools.bench_sharding import free_port
from kl_kernels.estimators import ESTIMATOR_NAMES

# shard sizes in rank order (uneven on purpose: a size-1 shard, labels owned unevenly)
SHARDS = {2: (17, 24), 4: (9, 1, 14, 17)}
DIFFERENTIABLE = ("logprobs", "kl", "penalty", "kl_sum", "kl_mean", "entropy")


def _backends():
    """The backends that serve the CPU tensors gloo moves here (triton only in the interpreter)."""
    from kl_kernels.dispatch import BACKENDS

    return [b.name for b in BACKENDS.values() if b.unavailable_reason is None and (not b.devices or "cpu" in b.devices)]


def _run(world_size: int, worker):
    mp.spawn(_entry, args=(world_size, free_port(), worker), nprocs=world_size, join=True)


def _entry(rank, world_size, port, worker):
    # once in ~3 full-suite runs a worker died with SIGABRT ("terminate called without an active
    # exception", no Python error): faulthandler prints where it happens, and a worker that finished
    # leaves with os._exit, skipping the interpreter's teardown of gloo's threads
    faulthandler.enable()
    torch.set_num_threads(1)
    # a collective left waiting fails the test in two minutes instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=2))
    worker(rank, world_size, dist.group.WORLD)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _span(rank, world_size):
    sizes = SHARDS[world_size]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _inputs(seed, dtype, packed, vocab):
    """The whole inputs, the same on every rank: ignored labels, a masked row of NaN logits."""
    g = torch.Generator().manual_seed(seed)
    shape = (13,) if packed else (2, 7)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype)
    ref_logits = (logits.float() + torch.randn(*shape, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[[1, 6]] = -100
    mask = torch.rand(shape, generator=g) > 0.25
    mask.view(-1)[4] = False
    logits.view(-1, vocab)[4] = float("nan")  # masked: must not reach any sum or gradient
    seqs = (3,) if packed else (2,)
    weights = {name: torch.randn(seqs if name in ("kl_sum", "kl_mean") else shape, generator=g)
               for name in DIFFERENTIABLE}
    for name in ("logprobs", "entropy"):  # unmasked outputs: a trainer masks them itself
        weights[name].view(-1)[4] = 0.0
    extra = dict(cu_seqlens=torch.tensor([0, 5, 9, 13])) if packed else {}
    return logits, ref_logits, labels, mask, weights, extra


def _loss(out, weights):
    return sum((getattr(out, name).float() * weights[name]).sum() for name in DIFFERENTIABLE
               if getattr(out, name) is not None and getattr(out, name).requires_grad)


def _same_on_every_rank(group, tensor):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    assert all(torch.equal(p, parts[0]) | (torch.isnan(p) & torch.isnan(parts[0])).all() for p in parts), \
        "ranks disagree"


def _compare_penalty(rank, world_size, group):
    vocab = sum(SHARDS[world_size])
    start, end = _span(rank, world_size)
    case = 0
    for backend in _backends():
        for dtype in (torch.float32, torch.bfloat16):
            for packed in (False, True):
                for estimator in ESTIMATOR_NAMES:
                    if backend != "cpu" and estimator not in ("k1", "k3+", "low_var_kl", "full"):
                        continue  # the slower backends: one of each kind (plain, straight-through, clamped, exact)
                    case += 1
                    logits, ref_logits, labels, mask, weights, extra = _inputs(case, dtype, packed, vocab)
                    temperature = 0.7 if case % 2 else torch.rand(labels.shape, generator=torch.Generator()
                                                                  .manual_seed(case)) + 0.5
                    kwargs = dict(ref_logits=ref_logits, mask=mask, estimator=estimator, return_entropy=True,
                                  temperature=temperature, backend=backend, **extra)
                    full_logits = logits.clone().requires_grad_()
                    want = kl_kernels.kl_penalty(full_logits, labels, **kwargs)
                    _loss(want, weights).backward()
                    outputs = []
                    for _ in range(2):  # twice: bitwise reproducible
                        shard = logits[..., start:end].clone().requires_grad_()
                        got = kl_kernels.kl_penalty(shard, labels, process_group=group,
                                                    **{**kwargs, "ref_logits": ref_logits[..., start:end]})
                        _loss(got, weights).backward()
                        outputs.append((got, shard.grad))
                    where = f"rank {rank}/{world_size} {backend} {dtype} packed={packed} {estimator}"
                    for name, value in want._asdict().items():
                        torch.testing.assert_close(getattr(got, name), value, rtol=2e-5, atol=2e-5, equal_nan=True,
                                                   msg=lambda m: f"{where} {name}: {m}")
                        assert torch.equal(getattr(outputs[0][0], name).nan_to_num(), getattr(got, name).nan_to_num())
                        _same_on_every_rank(group, getattr(got, name).nan_to_num(7.0))
                    # the merged log-probs are a few float32 ulps of lse from the direct ones; k3 and the + forms carry that
                    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
                    torch.testing.assert_close(shard.grad.float(), full_logits.grad[..., start:end].float(), **tol,
                                               msg=lambda m: f"{where} gradient: {m}")
                    assert torch.equal(outputs[0][1], shard.grad)
                    assert torch.isfinite(shard.grad).all(), where  # the masked NaN row got an exact 0


def _compare_logprobs_and_given_reference(rank, world_size, group):
    vocab = sum(SHARDS[world_size])
    start, end = _span(rank, world_size)
    for backend in _backends():
        logits, ref_logits, labels, mask, weights, _ = _inputs(101, torch.float32, False, vocab)
        logits.view(-1, vocab)[4] = torch.randn(vocab, generator=torch.Generator().manual_seed(3))  # no mask here
        full_logits, shard = logits.clone().requires_grad_(), logits[..., start:end].clone().requires_grad_()
        want = kl_kernels.token_logprobs(full_logits, labels, return_entropy=True, temperature=1.3, backend=backend)
        got = kl_kernels.token_logprobs(shard, labels, return_entropy=True, temperature=1.3, process_group=group,
                                        backend=backend)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
        (want[0] * weights["logprobs"] + want[1] * weights["entropy"]).sum().backward()
        (got[0] * weights["logprobs"] + got[1] * weights["entropy"]).sum().backward()
        torch.testing.assert_close(shard.grad, full_logits.grad[..., start:end], rtol=1e-5, atol=1e-6)
        # the reference as given log-probs, k3 with OpenRLHF's clamp
        ref_logprobs = torch.randn(labels.shape) - 3
        kwargs = dict(ref_logprobs=ref_logprobs, mask=mask, estimator="k3", kl_clamp=10.0, backend=backend)
        want = kl_kernels.kl_penalty(logits, labels, **kwargs)
        got = kl_kernels.kl_penalty(logits[..., start:end], labels, process_group=group, **kwargs)
        for name, value in want._asdict().items():
            torch.testing.assert_close(getattr(got, name), value, rtol=2e-5, atol=2e-5, equal_nan=True)
    # a vocabulary shard whose logits are all -inf (padded vocabulary entries): no mass, no NaN
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(11))
    banned = torch.zeros(vocab, dtype=torch.bool)
    banned[SHARDS[world_size][0]:SHARDS[world_size][0] + SHARDS[world_size][1]] = True  # rank 1's shard
    logits[:, banned] = float("-inf")
    labels = torch.tensor([0, vocab - 1, SHARDS[world_size][0]])  # the last label is banned: log-prob -inf
    want = kl_kernels.token_logprobs(logits, labels, return_entropy=True)
    got = kl_kernels.token_logprobs(logits[:, start:end], labels, return_entropy=True, process_group=group)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[0][2] == float("-inf") and torch.isfinite(got[1]).all()


def _compare_linear(rank, world_size, group):
    vocab = sum(SHARDS[world_size])
    start, end = _span(rank, world_size)
    g = torch.Generator().manual_seed(7)
    hidden, weight, bias = torch.randn(2, 6, 16, generator=g), torch.randn(vocab, 16, generator=g) * 0.3, \
        torch.randn(vocab, generator=g)
    ref_hidden, ref_weight = torch.randn(2, 6, 8, generator=g), torch.randn(vocab, 8, generator=g) * 0.3
    labels = torch.randint(0, vocab, (2, 6), generator=g)
    labels[0, 2] = -100
    w = torch.randn(3, 2, 6, generator=g)
    for backend in _backends():
        for estimator in ("k3", "full"):
            kwargs = dict(ref_hidden=ref_hidden, estimator=estimator, return_entropy=True, softcap=4.0,
                          backend=backend)
            full = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            want = kl_kernels.linear_kl_penalty(full[0], full[1], labels, bias=full[2], ref_weight=ref_weight,
                                                **kwargs)
            mine = [t.clone().requires_grad_() for t in (hidden, weight[start:end], bias[start:end])]
            got = kl_kernels.linear_kl_penalty(mine[0], mine[1], labels, bias=mine[2],
                                               ref_weight=ref_weight[start:end], process_group=group, **kwargs)
            for name, value in want._asdict().items():
                torch.testing.assert_close(getattr(got, name), value, rtol=2e-5, atol=2e-5)
            for out in (want, got):
                (out.logprobs * w[0] + out.kl * w[1] + out.entropy * w[2]).sum().backward()
            # the hidden gradient on each rank is its shard's contribution: their sum is the whole gradient
            hidden_grad = mine[0].grad.clone()
            dist.all_reduce(hidden_grad, group=group)
            torch.testing.assert_close(hidden_grad, full[0].grad, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine[1].grad, full[1].grad[start:end], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine[2].grad, full[2].grad[start:end], rtol=1e-5, atol=1e-5)
    logp = kl_kernels.linear_token_logprobs(hidden, weight[start:end], labels, bias=bias[start:end],
                                            process_group=group)
    torch.testing.assert_close(logp, kl_kernels.linear_token_logprobs(hidden, weight, labels, bias=bias))


def _errors_on_every_rank(rank, world_size, group):
    vocab = sum(SHARDS[world_size])
    start, end = _span(rank, world_size)
    logits, ref_logits, labels, mask, _, _ = _inputs(5, torch.float32, False, vocab)
    shard = logits[..., start:end]

    def raises(match, **kwargs):
        args = dict(logits=shard, labels=labels, ref_logits=ref_logits[..., start:end], process_group=group)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            kl_kernels.kl_penalty(args.pop("logits"), args.pop("labels"), **args)

    # a rank whose estimator or row count differs: every rank raises, naming what differs
    raises("same estimator", estimator="k3" if rank == 1 else "k1")
    last = 6 if rank == 0 else 7
    raises("same rows", logits=shard[:, :last], labels=labels[:, :last], ref_logits=ref_logits[:, :last, start:end])
    raises("same labels", labels=labels if rank else labels.flip(-1))
    # a rank whose own checks fail raises its error; its peers say which rank failed
    raises("mask must have shape|rank\\(s\\) \\[0\\]", mask=mask[:, :3] if rank == 0 else mask)
    # a label outside the whole vocabulary (valid in no shard): every rank
    bad = labels.clone()
    bad[0, 0] = vocab
    raises("labels", labels=bad)
    # the group still works after all that: a good call
    out = kl_kernels.kl_penalty(shard, labels, ref_logits=ref_logits[..., start:end], process_group=group)
    torch.testing.assert_close(out.kl, kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits).kl, rtol=2e-5,
                               atol=2e-5, equal_nan=True)  # row 4's NaN logits, unmasked here: NaN in both
    # validate=False: a bad label gives NaN in its row (as without a group), no error, no hang
    out = kl_kernels.kl_penalty(shard, bad, ref_logits=ref_logits[..., start:end], return_entropy=True,
                                validate=False, process_group=group)
    assert torch.isnan(out.logprobs[0, 0]) and torch.isnan(out.entropy[0, 0]) and torch.isfinite(out.kl[1]).all()


def _changing_layouts_and_mixed_validate(rank, world_size, group):
    """Issue 28: the shard layout changes between calls (another model, another vocabulary split) while
    a rank's own shard size stays the same; some calls have validate=False, on one rank or all. Every
    call still pairs its collectives up and gives the single-process log-probs."""
    torch.manual_seed(11)
    z = torch.randn(3, 7, 11) * 2
    labels = torch.randint(0, 10, (3, 7))
    layouts = [(4, 6), (4, 6), (5, 6), (4, 6), (2, 8), (2, 3), (4, 6)]  # the same local size under other splits
    for step, sizes in enumerate(layouts):
        vocab = sum(sizes)
        start = sum(sizes[:rank])
        local = z[..., :vocab][..., start:start + sizes[rank]].contiguous()
        validate = step % 3 != 1 and not (step == 5 and rank == 1)  # False on both ranks, then on one
        y = labels.clamp(max=vocab - 1)
        got = kl_kernels.token_logprobs(local, y, process_group=group, validate=validate)
        want = kl_kernels.token_logprobs(z[..., :vocab], y)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6, msg=f"step {step}, layout {sizes}")


def _options_compared_across_ranks(rank, world_size, group):
    """Issue 28: logit_scale, softcap, the mask, cu_seqlens and a tensor temperature are header fields
    (validate=True): a rank that differs makes every rank raise, naming the field."""
    vocab = sum(SHARDS[world_size])
    start, end = _span(rank, world_size)
    torch.manual_seed(3)  # the same inputs on every rank
    hidden = torch.randn(12, 8)
    weight = torch.randn(vocab, 8)
    labels = torch.randint(0, vocab, (12,))

    def raises(match, call):
        with pytest.raises(ValueError, match=match):
            call()

    raises("same logit_scale", lambda: kl_kernels.linear_token_logprobs(
        hidden, weight[start:end], labels, logit_scale=1.0 + rank, process_group=group))
    raises("same softcap", lambda: kl_kernels.linear_token_logprobs(
        hidden, weight[start:end], labels, softcap=30.0 if rank else None, process_group=group))
    raises("same logits_dtype", lambda: kl_kernels.linear_token_logprobs(
        hidden.bfloat16(), weight[start:end].bfloat16(), labels, logits_dtype=torch.float32 if rank else None,
        process_group=group))
    logits = torch.randn(12, vocab)[:, start:end]
    mask = torch.ones(12)
    mask[rank] = 0
    raises("same mask", lambda: kl_kernels.kl_penalty(logits, labels, ref_logprobs=-torch.ones(12), mask=mask,
                                                      process_group=group))
    cu = torch.tensor([0, 5 + rank, 12])
    raises("same cu_seqlens", lambda: kl_kernels.kl_penalty(logits, labels, ref_logprobs=-torch.ones(12),
                                                            cu_seqlens=cu, process_group=group))
    raises("same temperature values", lambda: kl_kernels.token_logprobs(
        logits, labels, temperature=torch.full((12,), 1.0 + rank), process_group=group))
    # the group still works
    kl_kernels.token_logprobs(logits, labels, process_group=group)


def _banned_shard_gradient(rank, world_size, group):
    """Issue 28: a rank whose whole shard is -inf (padded vocabulary entries) gets a zero gradient on
    every backend (the reference gave NaN), the others their shard of the full gradient."""
    sizes = SHARDS[world_size]
    vocab = sum(sizes)
    start, end = _span(rank, world_size)
    torch.manual_seed(5)
    z = torch.randn(4, vocab)
    z[:, sum(sizes[:-1]):] = float("-inf")  # the last rank's shard: padding
    labels = torch.randint(0, sum(sizes[:-1]), (4,))
    whole = z.clone().requires_grad_()
    kl_kernels.token_logprobs(whole, labels, return_entropy=True)[1].sum().backward()
    for backend in _backends():
        local = z[:, start:end].clone().requires_grad_()
        logp, entropy = kl_kernels.token_logprobs(local, labels, return_entropy=True, process_group=group,
                                                  backend=backend)
        (entropy.sum()).backward()
        assert torch.isfinite(local.grad).all(), backend
        torch.testing.assert_close(local.grad, whole.grad[:, start:end], rtol=1e-5, atol=1e-6, msg=backend)


def _kept_sets(labels, vocab, g):
    """[..., 6] global kept ids holding each label: a repeat, -1 in the middle, one row without a set, one
    row whose set lies in the last rank's shard only (the other ranks own none of it)."""
    kept = torch.randint(0, vocab, (*labels.shape, 6), generator=g)
    kept[..., 2] = labels.clamp(min=0)
    kept[..., 4] = kept[..., 0]
    kept[..., 3] = -1
    flat = kept.view(-1, 6)
    flat[2] = -1
    flat[3] = torch.tensor([vocab - 1, vocab - 2, vocab - 1, -1, vocab - 3, vocab - 2])
    return kept


def _compare_kept(rank, world_size, group):
    """Sampling replay under tensor parallelism (section 12): kept ids are global, each rank sums its own;
    outputs and gradients equal the single-process call's with the same kept_ids."""
    vocab = sum(SHARDS[world_size])
    start, end = _span(rank, world_size)
    for case, (backend, packed) in enumerate((b, p) for b in _backends() for p in (False, True)):
        logits, ref_logits, labels, mask, weights, extra = _inputs(40 + case, torch.float32, packed, vocab)
        labels.view(-1)[3] = vocab - 2  # the row whose set is the last shard's
        kept = _kept_sets(labels, vocab, torch.Generator().manual_seed(case))
        kwargs = dict(ref_logits=ref_logits, mask=mask, estimator="full", return_entropy=True, temperature=0.8,
                      kept_ids=kept, backend=backend, **extra)
        full_logits = logits.clone().requires_grad_()
        want = kl_kernels.kl_penalty(full_logits, labels, **kwargs)
        _loss(want, weights).backward()
        shard = logits[..., start:end].clone().requires_grad_()
        got = kl_kernels.kl_penalty(shard, labels, process_group=group,
                                    **{**kwargs, "ref_logits": ref_logits[..., start:end]})
        _loss(got, weights).backward()
        where = f"rank {rank}/{world_size} {backend} packed={packed}"
        for name, value in want._asdict().items():
            torch.testing.assert_close(getattr(got, name), value, rtol=2e-5, atol=2e-5, equal_nan=True,
                                       msg=lambda m: f"{where} {name}: {m}")
            _same_on_every_rank(group, getattr(got, name).nan_to_num(7.0))
        torch.testing.assert_close(shard.grad, full_logits.grad[..., start:end], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{where} gradient: {m}")
        plain = kl_kernels.kl_penalty(shard.detach(), labels, process_group=group,
                                      **{**kwargs, "ref_logits": ref_logits[..., start:end], "kept_ids": None})
        assert (plain.kl - got.kl).abs().max() > 1e-3  # the sets change the numbers: the check can fail
    # from hidden states
    g = torch.Generator().manual_seed(9)
    hidden, weight = torch.randn(2, 5, 16, generator=g), torch.randn(vocab, 16, generator=g) * 0.5
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    labels[0, 3] = vocab - 2
    kept = _kept_sets(labels, vocab, g)
    full = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    mine = [hidden.clone().requires_grad_(), weight[start:end].clone().requires_grad_()]
    outs = [kl_kernels.linear_token_logprobs(*full, labels, kept_ids=kept, return_entropy=True),
            kl_kernels.linear_token_logprobs(*mine, labels, kept_ids=kept, return_entropy=True, process_group=group)]
    for logp, entropy in outs:
        (logp * weights["logprobs"].view(-1)[:10].view(2, 5) + entropy).sum().backward()
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    hidden_grad = mine[0].grad.clone()
    dist.all_reduce(hidden_grad, group=group)
    torch.testing.assert_close(hidden_grad, full[0].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine[1].grad, full[1].grad[start:end], rtol=1e-5, atol=1e-5)
    # bad sets: every rank raises (an id outside the whole vocabulary, a label outside its set), or with
    # validate=False the label's row is NaN; kept_ids that differ between ranks: every rank raises
    shard = logits[..., start:end]
    labels = torch.randint(0, vocab, logits.shape[:-1], generator=g)
    kept = _kept_sets(labels, vocab, g)
    for bad, match in ((torch.where(kept == 0, vocab, kept), "kept_ids must be token ids"),
                       (torch.where(kept == labels[..., None], -1, kept), "every label must be in its row's")):
        bad.view(-1, 6)[0, 0] = vocab if "token ids" in match else bad.view(-1, 6)[0, 0]
        with pytest.raises(ValueError, match=match):
            kl_kernels.token_logprobs(shard, labels, kept_ids=bad, process_group=group)
    outside = torch.where(kept == labels[..., None], -1, kept)
    logp = kl_kernels.token_logprobs(shard, labels, kept_ids=outside, validate=False, process_group=group)
    rows_outside = (outside >= 0).any(-1)
    assert torch.isnan(logp[rows_outside]).all() and torch.isfinite(logp[~rows_outside]).all(), (logp, rows_outside)
    with pytest.raises(ValueError, match="same kept_ids"):
        kl_kernels.token_logprobs(shard, labels, kept_ids=kept if rank else kept.flip(-1).contiguous(),
                                  process_group=group)
    # kept_ids whose position-weighted sums were equal (issue 35 finding 6) differ between the ranks: raise
    pairs = torch.tensor([[[0, 5, 7], [1, 9, 3]]]) if rank == 0 else torch.tensor([[[0, 6, 6], [1, 8, 4]]])
    with pytest.raises(ValueError, match="same kept_ids"):
        kl_kernels.token_logprobs(torch.randn(1, 2, end - start), torch.tensor([[0, 1]]), kept_ids=pairs,
                                  process_group=group)
    with pytest.raises(ValueError, match="same kept_ids width"):
        kl_kernels.token_logprobs(shard, labels, kept_ids=kept if rank else None, process_group=group)


@pytest.mark.parametrize("world_size", [2, 4])
def test_kept_ids_equal_single_process(world_size):
    _run(world_size, _compare_kept)


def test_changing_layouts_and_mixed_validate():
    _run(2, _changing_layouts_and_mixed_validate)


def _mixed_validate_with_a_bad_id(rank, world_size, group):
    """Issue 35 finding 7: the same labels (or kept ids) with one id outside the whole vocabulary, rank 0
    validate=True, rank 1 validate=False: rank 0 raises, rank 1 gets NaN rows instead of waiting in the
    merge's collective for a rank that left; the next call pairs its collectives up as usual."""
    vocab = sum(SHARDS[world_size])
    start, end = _span(rank, world_size)
    torch.manual_seed(4)
    logits = torch.randn(2, 5, vocab)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(vocab, 8)
    labels = torch.randint(0, vocab, (2, 5))
    bad_labels = labels.clone()
    bad_labels[1, 2] = vocab + 3
    kept = torch.stack([labels, (labels + 1) % vocab, torch.full_like(labels, -1)], -1)
    bad_kept = kept.clone()
    bad_kept[0, 1, 2] = vocab
    validate = rank == 0
    calls = [lambda y, k: kl_kernels.token_logprobs(logits[..., start:end], y, kept_ids=k, process_group=group,
                                                    validate=validate),
             lambda y, k: kl_kernels.kl_penalty(logits[..., start:end], y, ref_logprobs=-torch.ones(2, 5),
                                                kept_ids=k, process_group=group, validate=validate).kl,
             lambda y, k: kl_kernels.linear_token_logprobs(hidden, weight[start:end], y, kept_ids=k,
                                                           process_group=group, validate=validate)]
    for call in calls:
        for y, k, match in ((bad_labels, None, "labels must lie"), (labels, bad_kept, "kept_ids must be token ids")):
            if validate:
                with pytest.raises(ValueError, match=match):
                    call(y, k)
            else:
                assert torch.isnan(call(y, k)).all()
        want = kl_kernels.token_logprobs(logits, labels, kept_ids=kept)
        if call is calls[0]:
            torch.testing.assert_close(call(labels, kept), want, rtol=2e-6, atol=2e-6)
        else:
            assert torch.isfinite(call(labels, kept)).all()


def test_mixed_validate_with_a_bad_id_never_leaves_a_rank_waiting():
    _run(2, _mixed_validate_with_a_bad_id)


def test_the_kept_ids_fingerprint_has_no_linear_collisions():
    """Issue 35 finding 6: a position-weighted sum gave these two rank's kept_ids one fingerprint."""
    from kl_kernels.sharding import fingerprint

    assert fingerprint(torch.tensor([[0, 5, 7], [1, 9, 3]])) != fingerprint(torch.tensor([[0, 6, 6], [1, 8, 4]]))
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 1000, (64, 8), generator=g)
    seen = {fingerprint(base)}
    for _ in range(200):  # two or three changed entries whose weighted sums cancel never collide
        other = base.clone().view(-1)
        i, j = torch.randperm(other.numel(), generator=g)[:2].tolist()
        other[i], other[j] = other[j].item(), other[i].item()
        if torch.equal(other.view(64, 8), base):
            continue
        seen.add(fingerprint(other.view(64, 8)))
    assert len(seen) > 190
    assert fingerprint(base) == fingerprint(base.clone())
    assert fingerprint(torch.tensor([0.5, -0.0])) != fingerprint(torch.tensor([0.5, 0.0]))


def test_options_are_compared_across_ranks():
    _run(2, _options_compared_across_ranks)


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_banned_shard_has_a_zero_gradient(world_size):
    _run(world_size, _banned_shard_gradient)


@pytest.mark.parametrize("world_size", [2, 4])
def test_penalty_equals_single_process(world_size):
    _run(world_size, _compare_penalty)


@pytest.mark.parametrize("world_size", [2, 4])
def test_logprobs_given_reference_and_banned_shard(world_size):
    _run(world_size, _compare_logprobs_and_given_reference)


@pytest.mark.parametrize("world_size", [2, 4])
def test_linear_equals_single_process(world_size):
    _run(world_size, _compare_linear)


def test_errors_raise_on_every_rank():
    _run(2, _errors_on_every_rank)


def test_without_distributed_initialised():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        kl_kernels.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), process_group=object())

