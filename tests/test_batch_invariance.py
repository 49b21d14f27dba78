"""Batch invariance (docs/contract.md section 11): a token's outputs and gradient row are bitwise the
same computed alone or among any other tokens - any batch size, order, padded or packed layout,
tile budget, CPU thread count - on every backend, from logits and from hidden states; a sequence's
sums depend on its own tokens only.

Each case draws a pool of tokens (logits rows or hidden states, reference, label, temperature, mask
and the upstream gradients of its outputs), computes every token alone with one thread, then calls
random batches of them with two: random subsets and orders, split into sequences padded with
ignored NaN rows or packed, random tile budgets; every token's numbers must carry the same bits.
"""
import random

import pytest
import torch

import kl_kernels

IGNORE = -100
LOW = (torch.bfloat16, torch.float16)


def same_bits(a, b):
    if a is None or b is None:
        return a is None and b is None
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(ints),
                                                                     b.contiguous().view(ints))


class Pool:
    """Per-token inputs; `linear` draws hidden states (and a shared weight, bias and reference model)."""

    def __init__(self, tokens, vocab, dtype, linear, hidden_size=40):
        self.vocab, self.dtype, self.linear = vocab, dtype, linear
        self.labels = torch.randint(0, vocab, (tokens,))
        self.temperature = torch.rand(tokens) + 0.5
        self.mask = (torch.rand(tokens) > 0.2).float()
        self.grads = [torch.randn(tokens) for _ in range(3)]  # upstream of logprobs, kl, entropy
        if linear:
            scale = hidden_size ** -0.5
            self.rows = torch.randn(tokens, hidden_size).to(dtype)
            self.ref_rows = (self.rows.float() + 0.2 * torch.randn(tokens, hidden_size)).to(dtype)
            self.weight = (torch.randn(vocab, hidden_size) * 3 * scale).to(dtype)
            self.ref_weight = (self.weight.float() + 0.1 * scale * torch.randn(vocab, hidden_size)).to(dtype)
            self.bias = torch.randn(vocab).to(dtype)
        else:
            self.rows = (torch.randn(tokens, vocab) * 3).to(dtype)
            self.ref_rows = (self.rows.float() + 0.3 * torch.randn(tokens, vocab)).to(dtype)


def _layout(pool, picked, packed, rng, split=True):
    """The batch of tokens `picked` (in this order), split into sequences: (inputs, position of each
    picked token in the flat [N] rows, the sequences' token lists). Padded: [B, T] with ignored NaN rows
    around the tokens; packed: [N] with cu_seqlens, ignored NaN rows inside some sequences."""
    cuts = sorted(rng.sample(range(1, len(picked)), min(len(picked) - 1, rng.randint(0, 3)))) if split else []
    sequences = [picked[a:b] for a, b in zip([0] + cuts, cuts + [len(picked)])]
    width = max(map(len, sequences)) + rng.randint(0, 3)
    slots = []  # per sequence: a token id or None (padding), in order
    for sequence in sequences:
        if packed:
            extra = rng.randint(0, 2)
            seq = list(sequence)
            for _ in range(extra):
                seq.insert(rng.randint(0, len(seq)), None)
        else:
            free = sorted(rng.sample(range(width), len(sequence)))
            seq = [None] * width
            for at, token in zip(free, sequence):
                seq[at] = token
        slots.append(seq)
    flat = [s for seq in slots for s in seq]
    index = torch.tensor([0 if s is None else s for s in flat])
    padding = torch.tensor([s is None for s in flat])

    def take(values, fill):
        picked_values = values[index].clone()
        picked_values[padding] = fill
        return picked_values

    rows = take(pool.rows, float("nan"))
    ref_rows = take(pool.ref_rows, float("nan"))
    labels = take(pool.labels, IGNORE)
    temperature = take(pool.temperature, 1.0)
    mask = take(pool.mask, 0.0)
    grads = [take(g, 0.0) for g in pool.grads]
    inputs = dict(rows=rows, ref_rows=ref_rows, labels=labels, temperature=temperature, mask=mask, grads=grads)
    if packed:
        lengths = [len(seq) for seq in slots]
        inputs["cu_seqlens"] = torch.tensor([0] + lengths).cumsum(0)
    else:
        shape = (len(slots), width)
        for key in ("rows", "ref_rows"):
            inputs[key] = inputs[key].view(*shape, -1)
        for key in ("labels", "temperature", "mask"):
            inputs[key] = inputs[key].view(shape)
        inputs["grads"] = [g.view(shape) for g in grads]
    positions = {token: at for at, token in enumerate(flat) if token is not None}
    return inputs, positions, sequences


def _run(function, backend, pool, inputs, tile_bytes):
    """(per-token outputs as [N] tensors, per-sequence sums or None, the [N, V or H] gradient rows)."""
    rows = inputs["rows"].detach().clone().requires_grad_(True)
    common = dict(temperature=inputs["temperature"], ignore_index=IGNORE, return_entropy=True, backend=backend)
    if pool.linear:
        common["tile_bytes"] = tile_bytes
        model = dict(weight=pool.weight, bias=pool.bias)
    if function == "token_logprobs":
        if pool.linear:
            logp, entropy = kl_kernels.linear_token_logprobs(rows, model["weight"], inputs["labels"],
                                                             bias=model["bias"], **common)
        else:
            logp, entropy = kl_kernels.token_logprobs(rows, inputs["labels"], **common)
        outputs, sums = dict(logprobs=logp, entropy=entropy), None
        loss = (inputs["grads"][0] * logp).sum() + (inputs["grads"][2] * entropy).sum()
    else:
        penalty = dict(mask=inputs["mask"], cu_seqlens=inputs.get("cu_seqlens"), estimator="full", **common)
        if pool.linear:
            out = kl_kernels.linear_kl_penalty(rows, model["weight"], inputs["labels"], bias=model["bias"],
                                               ref_hidden=inputs["ref_rows"], ref_weight=pool.ref_weight, **penalty)
        else:
            out = kl_kernels.kl_penalty(rows, inputs["labels"], ref_logits=inputs["ref_rows"], **penalty)
        outputs = {k: getattr(out, k) for k in ("logprobs", "ref_logprobs", "kl", "penalty", "entropy")}
        sums = (out.kl_sum, out.kl_mean)
        loss = sum((g * outputs[k]).sum() for g, k in zip(inputs["grads"], ("logprobs", "kl", "entropy")))
    loss.backward()
    flat = {k: v.detach().reshape(-1) for k, v in outputs.items()}
    return flat, sums, rows.grad.reshape(-1, rows.shape[-1])


FUNCTIONS = [("token_logprobs", False), ("kl_penalty", False), ("token_logprobs", True), ("kl_penalty", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("function,linear", FUNCTIONS, ids=["logits-logprobs", "logits-penalty",
                                                           "hidden-logprobs", "hidden-penalty"])
def test_a_token_has_the_same_bits_alone_and_in_any_batch(backend, dtype, function, linear):
    interpreted = backend == "triton" and not torch.cuda.is_available()
    tokens, trials = (10, 3) if interpreted else (24, 8)
    rng = random.Random(f"{backend}-{dtype}-{function}-{linear}")
    # a vocabulary of two CPU kernel tiles and several Triton blocks; hidden states' H not a multiple of 16
    pool = Pool(tokens, 1100 if not interpreted else 300, dtype, linear)
    threads = torch.get_num_threads()
    alone = {}
    torch.set_num_threads(1)
    try:
        for token in range(tokens):
            inputs, positions, _ = _layout(pool, [token], packed=True, rng=random.Random(0))
            alone[token] = _run(function, backend, pool, inputs, tile_bytes=kl_kernels.linear.TILE_BYTES)
    finally:
        torch.set_num_threads(threads)
    alone_sums = {}
    for trial in range(trials):
        picked = rng.sample(range(tokens), rng.randint(1, tokens))
        packed = rng.random() < 0.5
        inputs, positions, sequences = _layout(pool, picked, packed, rng)
        # tile budgets from one matmul quantum of rows to the default
        tile_bytes = rng.choice([1, 16 * 1100 * 4 * 3, kl_kernels.linear.TILE_BYTES])
        outputs, sums, grad = _run(function, backend, pool, inputs, tile_bytes)
        for token, at in positions.items():
            want_outputs, _, want_grad = alone[token]
            for name, value in outputs.items():
                assert same_bits(value[at], want_outputs[name][0]), (name, token, trial, packed)
            assert same_bits(grad[at], want_grad[0]), ("gradient row", token, trial, packed)
        if sums is not None:
            for number, sequence in enumerate(sequences):
                key = tuple(sequence)
                if key not in alone_sums:
                    seq_inputs, _, _ = _layout(pool, list(sequence), True, random.Random(1), split=False)
                    alone_sums[key] = _run(function, backend, pool, seq_inputs, kl_kernels.linear.TILE_BYTES)[1]
                for got, want in zip(sums, alone_sums[key]):
                    assert same_bits(got[number], want[0]), ("sequence sum", sequence, trial, packed)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "hidden"])
def test_the_reported_batch_sizes(backend_name, dtype, linear):
    """The report's comparisons (issue 26): 2048 tokens; a row alone, batches of 7, 513 and 1024 and
    the whole 2048 reordered, with 1 and 2 threads: values and gradient rows, every bit."""
    tokens, vocab, hidden_size = 2048, 1025, 100
    labels = torch.randint(0, vocab, (tokens,))
    grads = torch.randn(2, tokens)
    if linear:
        hidden = torch.randn(tokens, hidden_size).to(dtype)
        weight = (torch.randn(vocab, hidden_size) * hidden_size ** -0.5 * 3).to(dtype)
    else:
        hidden = (torch.randn(tokens, vocab) * 3).to(dtype)

    def run(index):
        rows = hidden[index].clone().requires_grad_(True)
        if linear:
            logp, entropy = kl_kernels.linear_token_logprobs(rows, weight, labels[index], return_entropy=True,
                                                             backend=backend_name)
        else:
            logp, entropy = kl_kernels.token_logprobs(rows, labels[index], return_entropy=True, backend=backend_name)
        ((grads[0, index] * logp).sum() + (grads[1, index] * entropy).sum()).backward()
        return logp.detach(), entropy.detach(), rows.grad

    everything = run(torch.arange(tokens))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for size in (1, 7, 513, 1024, 2048):
                index = torch.randperm(tokens)[:size]
                for got, want in zip(run(index), everything):
                    assert same_bits(got, want[index]), (size, count)
    finally:
        torch.set_num_threads(threads)


# issue 35 finding 5: shapes whose matmuls moved a row's bits with its position (fp64 H = 17, 65, 4097;
# fp32 H = 17 with V = 5 or 9; V = 31) and a few more odd ones
ODD_SHAPES = [(torch.float64, 17, 300), (torch.float32, 17, 5), (torch.float64, 4097, 5), (torch.float64, 65, 31),
              (torch.float32, 17, 9), (torch.float64, 16, 2265), (torch.float32, 3, 3), (torch.bfloat16, 33, 7),
              (torch.float32, 130, 1027), (torch.float64, 1, 1)]


@pytest.mark.parametrize("dtype,hidden_size,vocab", ODD_SHAPES, ids=[f"{str(d)[6:]}-H{h}-V{v}" for d, h, v in ODD_SHAPES])
def test_odd_matmul_shapes(dtype, hidden_size, vocab):
    """The hidden-state head from odd sizes: a token alone (one thread) and at random places in batches of
    up to 40 tokens (two threads, tiles of 16 rows or one tile), the same bits: values and gradient rows."""
    pool = Pool(40, vocab, dtype, True, hidden_size=hidden_size)
    threads = torch.get_num_threads()
    rng = random.Random(f"{dtype}-{hidden_size}-{vocab}")
    alone = {}
    try:
        torch.set_num_threads(1)
        for token in range(pool.labels.numel()):
            inputs, _, _ = _layout(pool, [token], packed=True, rng=random.Random(0))
            alone[token] = _run("kl_penalty", "cpu", pool, inputs, kl_kernels.linear.TILE_BYTES)
        torch.set_num_threads(2)
        for trial in range(3):
            picked = rng.sample(range(40), rng.randint(2, 40))
            inputs, positions, _ = _layout(pool, picked, rng.random() < 0.5, rng)
            outputs, _, grad = _run("kl_penalty", "cpu", pool, inputs, rng.choice([1, kl_kernels.linear.TILE_BYTES]))
            for token, at in positions.items():
                for name, value in outputs.items():
                    assert same_bits(value[at], alone[token][0][name][0]), (name, token, trial)
                assert same_bits(grad[at], alone[token][2][0]), ("gradient row", token, trial)
    finally:
        torch.set_num_threads(threads)
