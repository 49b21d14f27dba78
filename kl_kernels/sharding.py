"""A tensor-parallel vocabulary (docs/contract.md section 10): each rank of a torch.distributed
process group holds a contiguous shard of the vocabulary (logits [..., V_r], or lm_head weight
[V_r, H]); the shards in rank order form the whole vocabulary.

Each rank runs the usual fused kernel on its shard (the kernels take the shard's place in the
vocabulary: `vocab_start`, `vocab_size`; labels stay global ids) and gets per-row statistics of its
columns: the log-sum-exp, the label log-prob where it owns the label (-inf elsewhere), the entropy
and the exact KL of its columns' softmax. One all_gather of those [k <= 6, N] partials, merged on
every rank in rank order (so every rank gets the same bits, run after run), gives the statistics of
the whole vocabulary. With w_r = exp(lse_r - lse) the mass of shard r:
    lse = log sum_r exp(lse_r)              logp = logp_owner + lse_owner - lse
    H   = sum_r w_r (H_r - log w_r)         KL   = sum_r w_r (KL_r + log w_r - log v_r)
(v_r the reference's shard mass). The backward needs no communication: each rank's kernel gets
the merged lse, entropy and KL, so its p = exp(z/T - lse) is the whole vocabulary's softmax on its
columns, and writes its shard of the gradient.

Before the first collective that carries data, the ranks exchange one small header (their
shard size, and with validate=True the row count, the options and a fingerprint of the labels), so
a rank whose inputs disagree raises ValueError on every rank instead of hanging a collective. A
rank whose own checks failed still joins that exchange (fail_together), so its peers raise too.
Only collectives NCCL also has are used (all_gather), on the inputs' device.
"""
from __future__ import annotations

import contextlib
import itertools
import struct
import weakref
import zlib

import torch

from . import validation as check
from .contract import VocabShard, whole

# Shard layouts seen, for validate=False (no host sync per call): group -> {local size: every rank's end id}.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


# What every rank must agree on, in this order (the header's columns after the shard size and the
# failure flag); a column a function does not use is 0.
HEADER = ("function", "rows", "labels", "estimator", "ref_logits", "return_entropy", "ignore_index", "temperature")


def header(function: str, labels: torch.Tensor, validate: bool, *, estimator=None, has_ref=False,
           return_entropy=False, ignore_index=-100, temperature=1.0) -> dict:
    """The header of one call. Codes are stable across processes (crc32, not Python's salted hash);
    the labels' fingerprint costs a host sync, so it is taken with validate=True only."""
    def code(value) -> int:
        return zlib.crc32(repr(value).encode())

    scalar_t = -1 if isinstance(temperature, torch.Tensor) else struct.unpack("<q", struct.pack("<d", temperature))[0]
    return dict(zip(HEADER, (code(function), labels.numel(), labels_fingerprint(labels) if validate else 0,
                             code(estimator), int(has_ref), int(return_entropy), ignore_index, scalar_t)))


def labels_fingerprint(labels: torch.Tensor) -> int:
    """Two int64 sums that differ when the labels differ (positions weighted, so a swap shows);
    wrapping arithmetic is fine: only equality across ranks matters. A host sync: validate=True only."""
    flat = labels.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
    return int((flat * weights).sum()) ^ (int(flat.sum()) << 1)


def agree(group, device, local_vocab: int, header: dict, validate: bool, error: Exception | None = None) -> VocabShard:
    """This rank's VocabShard, after every rank agreed on the header (name -> int; the same on every
    rank or ValueError on every rank). `error`: this rank's own checks failed; it joins the exchange
    (so its peers do not wait forever), then raises it while they raise a ValueError naming it."""
    dist = _dist()
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if not validate and error is None:
        ends = _LAYOUTS.get(group, {}).get(local_vocab)
        if ends is not None:
            return _shard_of(rank, ends, group)
    names = list(header)
    mine = torch.tensor([local_vocab, error is not None, *header.values()], dtype=torch.int64, device=device)
    everyone = _all_gather(group, mine).tolist()
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(everyone) if row[1]]
    if failed:
        raise ValueError(f"process_group: rank(s) {failed} rejected their inputs (their error says why); "
                         f"this is rank {rank}, whose inputs were fine")
    for column, name in enumerate(names, start=2):
        values = [row[column] for row in everyone]
        if len(set(values)) > 1:
            raise ValueError(f"process_group: every rank must pass the same {name}, got {values} on ranks "
                             f"0..{len(values) - 1}")
    ends = tuple(itertools.accumulate(row[0] for row in everyone))
    _LAYOUTS.setdefault(group, {})[local_vocab] = ends
    return _shard_of(rank, ends, group)


def _shard_of(rank: int, ends: tuple, group) -> VocabShard:
    return VocabShard(ends[rank - 1] if rank else 0, ends[-1], group, ends)


def vocab_shard(group, device, local_vocab: int, validate: bool, function: str, labels: torch.Tensor,
                **options) -> VocabShard:
    """whole(local_vocab) without a group; else this rank's shard, once every rank agreed on the
    call's header (function, labels and the options of header()). With validate=True the labels are
    checked against the whole vocabulary, here for every call (with a group: the same labels on every
    rank, so all raise alike)."""
    shard = whole(local_vocab) if group is None else \
        agree(group, device, local_vocab, header(function, labels, validate, **options), validate)
    if validate:
        check.label_values(labels, shard.size, options["ignore_index"])
    return shard


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
    """Raise this rank's `error` after joining the header exchange its peers are in (with validate=True,
    or before the group's first exchange; after it, validate=False exchanges nothing and the caller
    promised consistent inputs)."""
    if group is None or not (validate or group not in _LAYOUTS):
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
    names = [name for name, value in stats._asdict().items() if value is not None]
    gathered = _all_gather(shard.group, torch.stack([getattr(stats, n) for n in names])).double()  # [W, k, N]
    part = dict(zip(names, gathered.unbind(1)))
    ends = torch.tensor(shard.ends, device=labels.device)
    # the rank whose shard holds the label (a label outside the vocabulary: every rank gave NaN)
    owner = torch.bucketize(labels, ends, right=True).clamp_(max=len(shard.ends) - 1).unsqueeze(0)

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
    dtype = stats.logp.dtype
    return stats._replace(**{name: torch.where(valid, value, 0.0).to(dtype) for name, value in out.items()})
