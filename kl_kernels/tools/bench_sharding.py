"""kl-bench --tp W: the tensor-parallel vocabulary (process_group=) run with gloo in W local processes.

Each rank holds an equal shard of the vocabulary of the policy and reference logits and runs
kl_penalty on it (`cpu` backend, one thread per rank); rank 0 also runs the single-process call on
the whole vocabulary. Reported per case: the sharded step's median (the slowest rank's), the
single-process median, the largest difference from the single-process outputs, and the bytes each
rank received per token in the forward's collectives, counted by wrapping torch.distributed's
all_gather (the header exchange included): O(k) statistics per token, against the V/W logits
values per token a gathered vocabulary would move.
"""
from __future__ import annotations

import json
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kl_kernels


def free_port() -> int:
    """A free TCP port on the loopback for a local process group (kl-bench --tp and the tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CountingAllGather:
    """Wraps dist.all_gather: bytes this rank received from the others."""

    def __init__(self):
        self.original, self.received = dist.all_gather, 0

    def __call__(self, tensor_list, tensor, group=None, async_op=False):
        self.received += sum(t.numel() * t.element_size() for t in tensor_list) - tensor.numel() * tensor.element_size()
        return self.original(tensor_list, tensor, group=group, async_op=async_op)


def _step(logits, ref_logits, labels, mask, estimator, mode, group):
    logits = logits.detach().requires_grad_(mode != "fwd")
    out = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator=estimator,
                                return_entropy=True, backend="cpu", process_group=group)
    if mode != "fwd":
        (out.kl_sum.sum() + 0.01 * out.entropy.sum()).backward()
    return out


def _timed(fn, repeats, group=None):
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def _worker(rank, world, port, cases, repeats, estimator, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.group.WORLD
    counter = _CountingAllGather()
    dist.all_gather = counter
    try:
        for tokens, vocab, dtype, mode in cases:
            g = torch.Generator().manual_seed(vocab)
            logits = torch.randn(max(1, tokens // 512), min(tokens, 512), vocab, generator=g).to(dtype)
            ref_logits = (logits.float() + 0.1 * torch.randn(logits.shape, generator=g)).to(dtype)
            labels = torch.randint(0, vocab, logits.shape[:-1], generator=g)
            mask = torch.rand(labels.shape, generator=g) > 0.1
            ids = torch.arange(vocab).tensor_split(world)[rank]
            shard = slice(int(ids[0]), int(ids[-1]) + 1)
            mine, ref_mine = logits[..., shard].contiguous(), ref_logits[..., shard].contiguous()
            run = lambda: _step(mine, ref_mine, labels, mask, estimator, mode, group)  # noqa: E731
            got = run()
            counter.received = 0
            got = run()
            per_token = counter.received / labels.numel()
            sharded_ms = _timed(run, repeats, group)
            slowest = torch.tensor([sharded_ms])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
            if rank == 0:
                whole = lambda: _step(logits, ref_logits, labels, mask, estimator, mode, None)  # noqa: E731
                want = whole()
                error = max(float((getattr(got, name) - getattr(want, name)).detach().abs().max())
                            for name in ("logprobs", "kl", "kl_sum", "entropy"))
                results.append(dict(world_size=world, tokens=labels.numel(), vocab=vocab, dtype=str(dtype)[6:],
                                    mode=mode, estimator=estimator, sharded_ms=float(slowest),
                                    single_process_ms=_timed(whole, repeats),
                                    received_bytes_per_token=per_token,
                                    shard_logits_bytes_per_token=(vocab // world) * logits.element_size(),
                                    max_abs_diff_vs_single=error))
            dist.barrier(group)
    finally:
        dist.all_gather = counter.original
        dist.destroy_process_group()


def run(world, tokens, vocabs, dtypes, modes, estimator, repeats, json_path=None, env=None):
    """Spawn `world` gloo processes, print the rows, return them."""
    cases = [(tokens, vocab, dtype, mode) for dtype in dtypes for vocab in vocabs for mode in modes]
    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(_worker, args=(world, free_port(), cases, repeats, estimator, results), nprocs=world, join=True)
        rows = list(results)
    print(f"{'ranks':>5} {'dtype':<9} {'vocab':>7} {'mode':<8} {'sharded ms':>10} {'1-process ms':>12} "
          f"{'recv B/token':>12} {'shard logits B/token':>20} {'max diff':>9}")
    for row in rows:
        print(f"{row['world_size']:>5} {row['dtype']:<9} {row['vocab']:>7} {row['mode']:<8} {row['sharded_ms']:>10.1f} "
              f"{row['single_process_ms']:>12.1f} {row['received_bytes_per_token']:>12.1f} "
              f"{row['shard_logits_bytes_per_token']:>20} {row['max_abs_diff_vs_single']:>9.1e}")
    received = sorted({round(r["received_bytes_per_token"]) for r in rows})
    span = f"{received[0]}" if len(received) == 1 else f"{received[0]}-{received[-1]}"
    print(f"# each rank receives {span} bytes per token in the forward (per-row "
          "statistics and the header), independent of the vocabulary; gathering the vocabulary instead "
          "would move the shard's logits. The backward exchanges nothing.")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    return rows
