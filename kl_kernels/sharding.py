"""A tensor-parallel vocabulary (docs/contract.md section 10): each rank of a torch.distributed
process group holds a contiguous shard of the vocabulary (logits [..., V_r], or lm_head weight
[V_r, H]); the shards in rank order form the whole vocabulary.

Each rank runs the usual fused kernel on its shard, on labels made local on the device (its own
label's column, or "not here", or bad), and gets per-row statistics of its columns: the log-sum-exp, the label log-prob where it owns the label (-inf elsewhere), the entropy
and the exact KL of its columns' softmax. One all_gather of those [k <= 6, N] partials, merged on
every rank in rank order (so every rank gets the same bits, run after run), gives the statistics of
the whole vocabulary. With w_r = exp(lse_r - lse) the mass of shard r:
    lse = log sum_r exp(lse_r)              logp = logp_owner + lse_owner - lse
    H   = sum_r w_r (H_r - log w_r)         KL   = sum_r w_r (KL_r + log w_r - log v_r)
(v_r the reference's shard mass). The backward needs no communication: each rank's kernel gets
the merged lse, entropy and KL, so its p = exp(z/T - lse) is the whole vocabulary's softmax on its
columns, and writes its shard of the gradient.

Before the collective that carries data, the ranks exchange one small header on every call (their
shard sizes, the options, and with validate=True fingerprints of the labels, mask, cu_seqlens and a
tensor temperature): the same collectives on every rank whatever validate says and whatever came
before, so no layout is remembered that could go stale. With validate=True it is read back (a host
sync), and a rank whose inputs disagree makes every rank raise ValueError instead of hanging a
collective; a rank whose own checks failed still joins it (fail_together), so its peers raise too.
With validate=False the shard sizes stay on the device. Only collectives NCCL also has are used
(all_gather), on the inputs' device.
"""
from __future__ import annotations

import contextlib
import struct
import zlib

import torch

from . import replay
from . import validation as check
from .contract import VocabShard, whole

def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs an initialised torch.distributed (init_process_group)")
    return dist


def _all_gather(group, tensor: torch.Tensor) -> torch.Tensor:
    """[W, *tensor.shape]: every rank's tensor in rank order (all_gather: gloo and NCCL alike)."""
    dist = _dist()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


# What every rank must agree on, in this order (the header's columns after the shard size, the failure
# flag and the validate flag); a column a function does not use is 0. The fingerprints (labels, mask,
# cu_seqlens, a tensor temperature) cost a host sync: taken with validate=True only, compared among
# the ranks that took them.
HEADER = ("function", "rows", "estimator", "ref_logits", "return_entropy", "ignore_index", "temperature",
          "logit_scale", "softcap", "logits_dtype", "kept_ids width", "labels", "mask", "cu_seqlens",
          "temperature values", "kept_ids")
FINGERPRINTS = ("labels", "mask", "cu_seqlens", "temperature values", "kept_ids")


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def header(function: str, labels: torch.Tensor, validate: bool, *, estimator=None, has_ref=False,
           return_entropy=False, ignore_index=-100, temperature=1.0, logit_scale=1.0, softcap=None, logits_dtype=None,
           mask=None, cu_seqlens=None, kept_ids=None) -> dict:
    """The header of one call. Codes are stable across processes (crc32, not Python's salted hash)."""
    def code(value) -> int:
        return zlib.crc32(repr(value).encode())

    tensor_t = isinstance(temperature, torch.Tensor)
    values = dict(function=code(function), rows=labels.numel(), estimator=code(estimator), ref_logits=int(has_ref),
                  return_entropy=int(return_entropy), ignore_index=ignore_index,
                  temperature=-1 if tensor_t else _bits(temperature), logit_scale=_bits(logit_scale),
                  softcap=-1 if softcap is None else _bits(softcap),
                  logits_dtype=0 if logits_dtype is None else code(str(logits_dtype)),
                  **{"kept_ids width": -1 if kept_ids is None else kept_ids.shape[-1]})
    fingerprints = (labels, mask, cu_seqlens, temperature if tensor_t else None, kept_ids)
    for name, value in zip(FINGERPRINTS, fingerprints):
        values[name] = fingerprint(value) if validate and value is not None else 0
    return {name: values[name] for name in HEADER}


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's finaliser constants (as int64): each bit of the input reaches every bit of the output
_MIX = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A mixing hash of int64 values (splitmix64's finaliser, wrapping int64 arithmetic; >> is arithmetic
    in torch, the same on every device)."""
    x = (x ^ (x >> 30)) * _MIX[0]
    x = (x ^ (x >> 27)) * _MIX[1]
    return x ^ (x >> 31)


def fingerprint(values: torch.Tensor) -> int:
    """A sum over the values of a mixing hash of (position, value bits): differs when the values differ,
    and, unlike a weighted sum, no few changed or swapped values can cancel out (issue 35: {0, 5, 7} and
    {1, 9, 3} on two ranks had one position-weighted sum); the same bits for the same values on every
    rank. A host sync: validate=True only."""
    flat = values.reshape(-1)
    bits = flat.to(torch.int64) if not flat.is_floating_point() else flat.double().view(torch.int64)
    positions = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
    return int(_mix(bits ^ _mix(positions)).sum())


def agree(group, device, local_vocab: int, header: dict, validate: bool, error: Exception | None = None):
    """(every rank's shard size as an int64 tensor on the device, this rank), after the ranks exchanged
    the header (name -> int). Every call exchanges it, whatever validate says, so the ranks' collectives
    always pair up. With validate=True the header is read (a host sync): a rank whose inputs differ, or
    that failed its own checks (`error`: it joins the exchange, then raises it), makes every rank raise.
    With validate=False nothing is read back: the sizes stay on the device."""
    dist = _dist()
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    mine = torch.tensor([local_vocab, error is not None, bool(validate), *header.values()], dtype=torch.int64,
                        device=device)
    everyone = _all_gather(group, mine)
    if error is not None:
        raise error
    if validate:
        rows = everyone.tolist()
        failed = [r for r, row in enumerate(rows) if row[1]]
        if failed:
            raise ValueError(f"process_group: rank(s) {failed} rejected their inputs (their error says why); "
                             f"this is rank {rank}, whose inputs were fine")
        for column, name in enumerate(header, start=3):
            # a fingerprint only among the ranks that took one (validate=True)
            values = [row[column] for row in rows if name not in FINGERPRINTS or row[2]]
            if len(set(values)) > 1:
                raise ValueError(f"process_group: every rank must pass the same {name}, got {values} on ranks "
                                 f"0..{len(values) - 1}")
    return everyone[:, 0], rank


def bad_label(ignore_index: int) -> int:
    """A label id that is neither ignore_index nor in any vocabulary: the kernels make its row NaN."""
    return -1 if ignore_index != -1 else -2


def vocab_shard(group, device, local_vocab: int, validate: bool, function: str, labels: torch.Tensor,
                **options) -> tuple[VocabShard, torch.Tensor, replay.KeptSet | None]:
    """(the kernels' VocabShard, the [N] int64 labels they read, the replay.KeptSet of options["kept_ids"]
    or None). Without a group: whole(local_vocab), the labels, the kept set. With one, after every rank
    agreed on the call's header (header()): the labels made local on the device (no host sync): a label
    this rank owns is its column here, one another rank owns is local_vocab (no column here), one outside
    the whole vocabulary a negative id (a NaN row); the shard is [0, local_vocab + 1) with each label's
    owner rank for the merge; the kept set is this rank's part of each (its ids, as its columns).

    With validate=True the labels and kept ids are checked against the whole vocabulary. Sharded, that
    happens after the header exchange, and a peer that does not validate would already be on its way to
    the merge's collective: a failed check is kept in the shard (VocabShard.error) and raised after the
    merge, which makes every row NaN on every rank (the same labels everywhere: every rank that
    validates raises it)."""
    flat = labels.reshape(-1).to(torch.int64).contiguous()
    ignore_index, kept_ids = options["ignore_index"], options.get("kept_ids")
    if group is None:
        if validate:
            check.label_values(labels, local_vocab, ignore_index)
        kept = None if kept_ids is None else replay.kept_set(kept_ids, labels, local_vocab, ignore_index, validate)
        return whole(local_vocab), _outside_is_bad(flat, kept, ignore_index), kept
    sizes, rank = agree(group, device, local_vocab, header(function, labels, validate, **options), validate)
    ends = sizes.cumsum(0)
    start = ends[rank] - local_vocab
    error = None
    if validate:
        try:
            check.label_values(labels, int(ends[-1]), ignore_index)
        except ValueError as failed:
            error = failed
    kept = None
    if kept_ids is not None:
        kept = replay.kept_set(kept_ids, labels, ends[-1], ignore_index, False, start, local_vocab)
        if validate and error is None:
            try:
                replay.check_values(kept_ids, kept, ends[-1])
            except ValueError as failed:
                error = failed
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= ends[-1]))
    column = flat - start
    owned = valid & ~bad & (column >= 0) & (column < local_vocab)
    local = torch.where(owned, column, torch.where(bad, bad_label(ignore_index), local_vocab))
    local = torch.where(valid, local, ignore_index)
    owner = torch.bucketize(flat, ends, right=True).clamp_(max=ends.numel() - 1)
    return (VocabShard(0, local_vocab + 1, group, owner, start, ends[-1], error),
            _outside_is_bad(local, kept, ignore_index), kept)


def _outside_is_bad(labels, kept, ignore_index: int):
    """The kernels' labels with a label outside its kept set made a bad one: a NaN row in every kernel
    call and through the merge (validate=False; with validate=True it raised)."""
    return labels if kept is None else torch.where(kept.inside, labels, bad_label(ignore_index))


@contextlib.contextmanager
def checks(group, device, validate: bool):
    """Around a rank's input checks: a check that raises first joins the peers' header exchange."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as error:
        if group is None:
            raise
        fail_together(group, device, validate, error)


def fail_together(group, device, validate: bool, error: Exception):
    """Raise this rank's `error` after joining the header exchange its peers are in (every call has one:
    with validate=True they raise too; with validate=False they do not read it, and the caller promised
    consistent inputs)."""
    if group is None:
        raise error
    agree(group, device, 0, dict.fromkeys(HEADER, 0), validate, error)


def _weighted(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # sum over shards of weight * values, a shard with no mass (w = 0: every logit -inf, e.g. padded
    # vocabulary entries) adding 0 rather than 0 * NaN
    return torch.where(weight == 0, 0.0, weight * values).sum(0)


def merge(args, stats):
    """A shard's per-row statistics (contract.RowStats of the kernel on args.logits) -> those of the
    whole vocabulary (module docstring), the same bits on every rank."""
    shard, labels = args.shard, args.labels
    if shard.error is not None:  # this rank's failed check: every rank's rows NaN, then it raises (vocab_shard)
        stats = stats._replace(lse=torch.full_like(stats.lse, float("nan")))
    names = [name for name, value in stats._asdict().items() if value is not None]
    # [W, k, N], in float64: the saved lse is float64 (contract.RowStats), the rest travels with it
    gathered = _all_gather(shard.group, torch.stack([getattr(stats, n).double() for n in names]))
    part = dict(zip(names, gathered.unbind(1)))
    # the rank whose shard holds the label (a label outside the vocabulary: every rank gave NaN)
    owner = shard.owner.unsqueeze(0)

    def total(lse_shards, logp_shards):
        lse_all = torch.logsumexp(lse_shards, 0)
        owner_lse = lse_shards.gather(0, owner).squeeze(0)
        picked = logp_shards.gather(0, owner).squeeze(0)
        # the owner's shard all -inf (a banned label): log-prob -inf, not -inf - -inf = NaN
        label_logp = torch.where(owner_lse == float("-inf"), owner_lse - lse_all, picked + (owner_lse - lse_all))
        return lse_all, label_logp, lse_shards - lse_all

    out = {}
    out["lse"], out["logp"], log_w = total(part["lse"], part["logp"])
    weight = log_w.exp()
    if "ref_lse" in part:
        out["ref_lse"], out["ref_logp"], log_v = total(part["ref_lse"], part["ref_logp"])
    if "entropy" in part:
        out["entropy"] = _weighted(weight, part["entropy"] - log_w)
    if "full_kl" in part:
        out["full_kl"] = _weighted(weight, part["full_kl"] + log_w - log_v)
    valid = labels != args.ignore_index
    # a bad label's row is NaN (every rank's part was), also where the rank taken as its owner holds no
    # mass there (its lse -inf would read as a banned label's -inf)
    bad = valid & (labels < 0)
    dtype = stats.logp.dtype

    def finished(name, value):
        if not name.endswith("lse"):
            value = torch.where(bad, float("nan"), value)
        return torch.where(valid, value, 0.0).to(stats.lse.dtype if name.endswith("lse") else dtype)
    merged = stats._replace(**{name: finished(name, value) for name, value in out.items()})
    if shard.error is not None:
        raise shard.error
    return merged
