"""Pure-PyTorch truth for the fused pass, chunked over rows.

Every backend implements the same two functions (dispatch.FusedPass), on dispatch.PassArgs:

  fused_kl_fwd(args, need_entropy, need_full) -> RowStats(logp, ref_logp, entropy, full_kl, lse, ref_lse)
  fused_kl_bwd(args, stats, grads, inplace) -> grad_logits [B, T, V]

args.logits / args.ref_logits are [B, T, V] with a contiguous vocabulary dim (any row strides, so
`logits[:, :-1]` is read in place); args.labels are [N = B*T] int64; args.temperature is a float or
an [N] tensor. The V columns are the ids [shard.start, shard.start + V) of a vocabulary of
shard.size ids: 0 and V, or a tensor-parallel rank's shard (sharding.py). Labels are ids of the
whole vocabulary; in another shard, a label has log-prob -inf here (no mass in these columns) and
no term in the backward, whose stats (lse, ref_lse, entropy, full_kl) are then those of the whole
vocabulary. Work happens one block of rows at a time (at most CHUNK_ELEMENTS values of [rows, V]
in the compute dtype), so memory stays O(chunk) whatever N is.
"""
from __future__ import annotations

import torch

from ..contract import PassArgs, RowGrads, RowStats, compute_dtype

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per block: a handful of these is the peak


def _flat(tensor: torch.Tensor) -> bool:
    B, T, _ = tensor.shape
    return B <= 1 or tensor.stride(0) == T * tensor.stride(1)


def _row_blocks(*tensors: torch.Tensor | None):
    """Yield (n0, n1, views): for each [B, T, V] tensor a [n1-n0, V] view of its rows, no copies.

    All tensors walk the same blocks: flat over N when every one allows it, else one sequence at a
    time (e.g. logits[:, :-1], whose batch rows are not evenly spaced).
    """
    present = [t for t in tensors if t is not None]
    B, T, V = present[0].shape
    chunk = max(1, CHUNK_ELEMENTS // max(V, 1))
    if all(_flat(t) for t in present):
        segments = [(0, B * T, [None if t is None else t.reshape(B * T, V) for t in tensors])]
    else:
        segments = [(b * T, (b + 1) * T, [None if t is None else t[b] for t in tensors]) for b in range(B)]
    for start, stop, views in segments:
        for n0 in range(start, stop, chunk):
            n1 = min(n0 + chunk, stop)
            yield n0, n1, [None if v is None else v[n0 - start:n1 - start] for v in views]


def _scaled(rows: torch.Tensor, temperature, n0: int, n1: int, dtype: torch.dtype):
    x = rows.to(dtype)
    if isinstance(temperature, torch.Tensor):
        return x / temperature[n0:n1].to(dtype).unsqueeze(-1)
    return x / temperature if temperature != 1.0 else x


def _row_sums(values: torch.Tensor, reduce=torch.sum) -> torch.Tensor:
    """reduce(values, dim=-1) of a block of rows, each row's bits its own (docs/contract.md section 11).
    A reduction whose output is one element (a block of one row) is split across threads by ATen once
    it has 32768 values or more (TensorIterator's two-pass reduction), so its order differs from the
    same row's inside a larger block, which one thread reduces alone. A one-row block is therefore
    reduced as two copies of itself: the same path as any other block, for one row's extra read."""
    if values.shape[0] == 1:
        return reduce(values.expand(2, *values.shape[1:]).contiguous(), dim=-1)[:1]
    return reduce(values, dim=-1)


def _p_times(p: torch.Tensor, values: torch.Tensor):
    # p * values with 0 where p == 0: a -inf logit (a banned token) contributes nothing instead
    # of 0 * -inf = NaN, while NaN in p (NaN logits) still propagates since NaN == 0 is False.
    return torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device), p * values)


def _log_softmax(x: torch.Tensor):
    """(log p, lse) of a block of rows. log_softmax shifts by the row max before exp, so log p keeps
    its digits even where lse is huge (x - lse would round them away). An lse of +inf (a +inf
    logit, or one that overflows once divided by T) leaves no softmax: the row is NaN, as on every
    backend (csrc/fused_kl_math.h)."""
    lse = _row_sums(x.double(), torch.logsumexp)  # saved in float64, as on every backend
    undefined = lse == float("inf")
    lse = torch.where(undefined, float("nan"), lse)
    log_p = torch.where(undefined.unsqueeze(-1), float("nan"), torch.log_softmax(x, dim=-1))
    return log_p, lse


def _shifted(log_softmax, saved_lse):
    """log p over these columns moved from their own lse to the saved one (a shard's to the whole
    vocabulary's; exactly 0 unsharded). A shard with no mass (every logit -inf) under a finite saved
    lse has p = 0 everywhere: log p -inf, not its own -inf - -inf = NaN."""
    log_p, lse = log_softmax
    empty = (lse == float("-inf")) & (saved_lse > float("-inf"))
    shifted = log_p + (lse - saved_lse).to(log_p.dtype).unsqueeze(-1)
    return torch.where(empty.unsqueeze(-1), float("-inf"), shifted)


def _label_columns(labels: torch.Tensor, ignore_index: int, shard, V: int):
    """(valid, bad, owned, column) of each label: not ignored; outside the vocabulary (validate=False
    only: NaN rows); in these V columns; its column here (0 where not owned, so any gather is in bounds)."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= shard.size))
    column = labels - shard.start
    owned = valid & ~bad & (column >= 0) & (column < V)
    return valid, bad, owned, torch.where(owned, column, torch.zeros_like(column))


def _label_logprob(log_probs: torch.Tensor, valid, bad, owned, column):
    picked = log_probs.gather(-1, column.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(owned, picked, torch.full_like(picked, float("-inf")))
    picked = torch.where(bad, torch.full_like(picked, float("nan")), picked)
    return torch.where(valid, picked, torch.zeros_like(picked))


def fused_kl_fwd(args: PassArgs, need_entropy: bool, need_full: bool) -> RowStats:
    logits, labels, ref_logits, temperature, ignore_index, shard = args
    B, T, V = logits.shape
    N = B * T
    dtype = compute_dtype(logits.dtype)
    new = lambda kind=dtype: torch.empty(N, dtype=kind, device=logits.device)  # noqa: E731
    logp, lse = new(), new(torch.float64)
    ref_logp = ref_lse = entropy = full_kl = None
    if ref_logits is not None:
        ref_logp, ref_lse = new(), new(torch.float64)
    if need_entropy:
        entropy = new()
    if need_full:
        full_kl = new()
    for n0, n1, (rows, ref_rows) in _row_blocks(logits, ref_logits):
        label = _label_columns(labels[n0:n1], ignore_index, shard, V)
        valid, bad = label[:2]
        x = _scaled(rows, temperature, n0, n1, dtype)
        log_p, row_lse = _log_softmax(x)
        lse[n0:n1] = torch.where(valid, row_lse, 0.0)
        logp[n0:n1] = _label_logprob(log_p, *label)
        p = torch.exp(log_p) if (need_entropy or need_full) else None
        if need_entropy:
            h = -_row_sums(_p_times(p, log_p))
            entropy[n0:n1] = torch.where(valid, torch.where(bad, torch.nan, h), 0.0)
        if ref_rows is not None:
            xr = _scaled(ref_rows, temperature, n0, n1, dtype)
            log_q, row_ref_lse = _log_softmax(xr)
            ref_lse[n0:n1] = torch.where(valid, row_ref_lse, 0.0)
            ref_logp[n0:n1] = _label_logprob(log_q, *label)
            if need_full:
                # +inf where the reference bans (-inf) a token the policy can sample (finite log p), however
                # small p is (csrc/fused_kl_math.h sd_term); not 0 once p underflows
                banned = ((log_q == float("-inf")) & (log_p > float("-inf"))).any(-1)
                kl = torch.where(banned, float("inf"), _row_sums(_p_times(p, log_p - log_q)))
                full_kl[n0:n1] = torch.where(valid, torch.where(bad, torch.nan, kl), 0.0)
    return RowStats(logp, ref_logp, entropy, full_kl, lse, ref_lse)


def fused_kl_bwd(args: PassArgs, stats: RowStats, grads: RowGrads, inplace: bool) -> torch.Tensor:
    """d logp/dz = (1[v=y] - p)/T;  dH/dz = -p (log p + H)/T;  dKL/dz = p (log p - log q - KL)/T."""
    logits, labels, ref_logits, temperature, ignore_index, shard = args
    grad_logp, grad_entropy, grad_full = grads
    lse, ref_lse, entropy, full_kl = stats.lse, stats.ref_lse, stats.entropy, stats.full_kl
    B, T, V = logits.shape
    dtype = compute_dtype(logits.dtype)
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    ref_logits = ref_logits if grad_full is not None else None
    for n0, n1, (rows, out, ref_rows) in _row_blocks(logits, grad, ref_logits):
        valid, bad, owned, column = _label_columns(labels[n0:n1], ignore_index, shard, V)
        # recomputed rather than x - saved lse, for the digits (see _log_softmax), then moved from these
        # columns' lse to the saved one (a shard's to the whole vocabulary's; exactly 0 when unsharded)
        log_p = _shifted(_log_softmax(_scaled(rows, temperature, n0, n1, dtype)), lse[n0:n1])
        p = torch.exp(log_p)
        g_logp = grad_logp[n0:n1].to(dtype) if grad_logp is not None else torch.zeros(n1 - n0, dtype=dtype, device=p.device)
        g = -p * g_logp.unsqueeze(-1)
        g.scatter_add_(-1, column.unsqueeze(-1), torch.where(owned, g_logp, 0.0).unsqueeze(-1))
        any_grad = g_logp != 0
        if grad_entropy is not None:
            g_h = grad_entropy[n0:n1].to(dtype).unsqueeze(-1)
            g = g - g_h * _p_times(p, log_p + entropy[n0:n1].unsqueeze(-1))
            any_grad = any_grad | (g_h.squeeze(-1) != 0)
        if ref_rows is not None:
            log_q = _shifted(_log_softmax(_scaled(ref_rows, temperature, n0, n1, dtype)), ref_lse[n0:n1])
            g_f = grad_full[n0:n1].to(dtype).unsqueeze(-1)
            # full's term only where its gradient flows: a masked row's reference NaN stays out
            g = g + torch.where(g_f != 0, g_f * _p_times(p, log_p - log_q - full_kl[n0:n1].unsqueeze(-1)), 0.0)
            any_grad = any_grad | (g_f.squeeze(-1) != 0)
        if isinstance(temperature, torch.Tensor):
            g = g / temperature[n0:n1].to(dtype).unsqueeze(-1)
        elif temperature != 1.0:
            g = g / temperature
        g = torch.where(bad.unsqueeze(-1), float("nan"), g)  # validate=False only: a NaN row, as in every backend
        # Rows nothing flows back from (ignored, masked) get an exact 0 even if their logits are NaN
        keep = (valid & any_grad).unsqueeze(-1)
        out.copy_(torch.where(keep, g, torch.zeros((), dtype=dtype, device=g.device)))
    return grad
