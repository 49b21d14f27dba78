"""kl_kernels.integrations.skyrl against SkyRL 0.4.0's own functions, run from its pinned wheel
(kl_kernels/tools/wheel_code.py: SkyRL needs Python 3.12 and this suite runs on 3.11, so its package is not
installed; the modules below run as the wheel ships them, the rest of the package stubbed). Each function
plain and under patch() on the same inputs: values, gradients, dtypes, the calls served by the fused path;
and the micro-batch check (the same tokens scored in micro-batches of 1 and of 8)."""
import pytest
import torch

import kl_kernels
from kl_kernels.tools import wheel_code

REPLAY = "skyrl.backends.skyrl_train.utils.sample_support_replay"
FUNCTIONS = "skyrl.backends.skyrl_train.utils.torch_utils"
MODULES = ["skyrl.backends.skyrl_train.utils.packed_tensor",
           "skyrl.backends.skyrl_train.distributed.megatron.packing_utils",
           "skyrl.backends.skyrl_train.distributed.megatron.token_metadata",
           "skyrl.backends.skyrl_train.utils.sample_support", REPLAY, FUNCTIONS]
V, H = 1031, 48


@pytest.fixture(scope="module")
def skyrl():
    pytest.importorskip("jaxtyping")  # torch_utils imports it (tests/engines/requirements-imports.txt)
    try:
        engine = wheel_code.Engine("skyrl", MODULES)
    except wheel_code.WheelMissing as missing:
        pytest.skip(str(missing))
    with engine.active():  # patch() looks the package up in sys.modules
        from kl_kernels.integrations import skyrl as kl_skyrl
        yield engine, kl_skyrl


def _support(labels, width, generator, empty_rows=()):
    """SkyRL's [..., top_k] int32 support rows as its sampler records them: distinct ids, the sampled one
    among them (in a random place), trailing -1 padding in some rows; rows in empty_rows have no support
    (prompt positions)."""
    scores = torch.rand(*labels.shape, V, generator=generator)
    scores.scatter_(-1, labels[..., None], 2.0)  # the sampled id is kept
    support = scores.topk(width, dim=-1).indices
    support = support.gather(-1, torch.rand(support.shape, generator=generator).argsort(-1))
    flat = support.view(-1, width)
    short = torch.arange(flat.shape[0]) % 3 == 0  # every third row keeps fewer ids: the sampled one first
    flat[short] = torch.where(flat[short] == labels.reshape(-1, 1)[short], -2, flat[short]).sort(-1).values
    flat[short, 0] = labels.reshape(-1)[short]
    flat[short, width // 2:] = -1
    for row in empty_rows:
        flat[row] = -1
    return flat.view(support.shape).to(torch.int32)


def _scores(engine, kl_skyrl, patched, source, sampled, support, **kwargs):
    """sample_support_scores plain or patched: (logprobs, entropy, valid_mask, gradient of the sources)."""
    replay = engine[REPLAY]
    leaves = [t.detach().clone().requires_grad_() for t in source]
    call = lambda: replay.sample_support_scores(  # noqa: E731
        leaves[0], sampled, support, vocab_start_index=0, vocab_end_index=V, tp_group=None,
        lm_head_weight=leaves[1] if len(leaves) > 1 else None, **kwargs)
    if patched:
        with kl_skyrl.patch(quiet=True) as handle:
            out = call()
        assert handle.counts()[f"{REPLAY}.sample_support_scores"] == (1, 0), handle.fallback_reasons()
    else:
        out = call()
    g = torch.linspace(-1, 1, out.logprobs.numel()).view(out.logprobs.shape)
    loss = (out.logprobs * g).sum() + (out.entropy.sum() if out.entropy is not None and out.entropy.requires_grad
                                       else 0)
    loss.backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", ["off", "no grad", "grad"])
def test_sample_support_scores(skyrl, form, dtype, entropy):
    """Every form SkyRL's scorer takes: logits (FSDP), hidden states with the LM head's weight and a
    temperature (Megatron), entropy off / without / with its gradient, padded [B, T] positions, positions
    without a support row; patched vs plain vs float64."""
    engine, kl_skyrl = skyrl
    g = torch.Generator().manual_seed(11)
    B, T, K = 3, 9, 20
    sampled = torch.randint(0, V, (B, T), generator=g)
    support = _support(sampled, K, g, empty_rows=(0, 1, 13))
    if form == "logits":
        source = [(torch.randn(B, T, V, generator=g) * 2).to(dtype)]
        temperature = 1.0
    else:
        source = [torch.randn(B, T, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)]
        temperature = 0.7
    kwargs = dict(compute_entropy=entropy != "off", entropy_requires_grad=entropy == "grad", temperature=temperature)
    theirs, their_grads = _scores(engine, kl_skyrl, False, source, sampled, support, **kwargs)
    ours, our_grads = _scores(engine, kl_skyrl, True, source, sampled, support, **kwargs)
    truth, true_grads = _scores(engine, kl_skyrl, False, [t.double() for t in source], sampled, support, **kwargs)
    assert torch.equal(ours.valid_mask, theirs.valid_mask)
    assert ours.logprobs.dtype == theirs.logprobs.dtype
    assert (ours.entropy is None) == (theirs.entropy is None)
    pairs = [(ours.logprobs, theirs.logprobs, truth.logprobs)] + list(zip(our_grads, their_grads, true_grads))
    if ours.entropy is not None:
        assert ours.entropy.requires_grad == theirs.entropy.requires_grad
        pairs.append((ours.entropy, theirs.entropy, truth.entropy))
    for got, skyrl_value, want in pairs:
        our_error = (got.double() - want).abs().max().item()
        their_error = (skyrl_value.double() - want).abs().max().item()
        assert our_error <= 2 * their_error + 1e-5 * max(1.0, want.abs().max().item()), (our_error, their_error)
    assert (ours.logprobs[~ours.valid_mask] == 0).all()


@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_packed_sequences(skyrl, form):
    """Three sequences packed into one row as SkyRL's packed path scores them (score_aligned_sample_support:
    each position's support row looked up by id in a PackedTensor of rows; prompt positions without one),
    patched vs plain: log-probs, entropy, gradients."""
    engine, kl_skyrl = skyrl
    replay = engine[REPLAY]
    packed = engine["skyrl.backends.skyrl_train.utils.packed_tensor"]
    g = torch.Generator().manual_seed(21)
    prompts, responses = [2, 3, 1], [3, 4, 3]
    total = sum(prompts) + sum(responses)
    sampled = torch.randint(0, V, (1, total), generator=g)
    row_ids = torch.full((1, total), -1)
    at, row = 0, 0
    for prompt, response in zip(prompts, responses):
        row_ids[0, at + prompt:at + prompt + response] = torch.arange(row, row + response)
        at, row = at + prompt + response, row + response
    generated = row_ids[0] >= 0
    support = _support(sampled[0, generated], 12, g)
    rows = packed.PackedTensor(support, packed.cu_seqlens_from_lengths(responses))
    source = [torch.randn(1, total, V, generator=g) * 2] if form == "logits" else \
        [torch.randn(1, total, H, generator=g), torch.randn(V, H, generator=g) / H ** 0.5]

    def run(patched):
        leaves = [t.clone().requires_grad_() for t in source]
        call = lambda: replay.score_aligned_sample_support(  # noqa: E731
            leaves[0], sampled, row_ids, generated[None], rows, vocab_start_index=0, vocab_end_index=V,
            tp_group=None, compute_entropy=True, entropy_requires_grad=True,
            lm_head_weight=leaves[1] if form == "hidden" else None, temperature=0.9)
        if patched:
            with kl_skyrl.patch(quiet=True) as handle:
                out = call()
            assert handle.counts()[f"{REPLAY}.sample_support_scores"] == (1, 0)
        else:
            out = call()
        (out.logprobs.sum() + out.entropy.sum()).backward()
        return [out.logprobs, out.entropy, out.valid_mask] + [t.grad for t in leaves]

    for ours, theirs in zip(run(True), run(False)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_calls_handed_back(skyrl):
    """A sampled id outside its own support row (SkyRL scores it; the fused pass would not), a row that
    repeats an id (SkyRL counts it twice, kept_ids once) and SkyRL's own argument errors go to SkyRL."""
    engine, kl_skyrl = skyrl
    replay = engine[REPLAY]
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, V, generator=g)
    sampled = torch.randint(0, V, (5,), generator=g)
    support = _support(sampled, 4, g)
    support[2, 0] = (sampled[2] + 1) % V
    support[2, 1:] = -1
    args = dict(vocab_start_index=0, vocab_end_index=V, tp_group=None)
    repeated = _support(sampled, 4, g)
    repeated[1, 1:3] = repeated[1, 0]
    plain = replay.sample_support_scores(logits, sampled, repeated, **args).logprobs
    with kl_skyrl.patch(quiet=True) as handle:
        out = replay.sample_support_scores(logits, sampled, support, **args)
        assert torch.equal(replay.sample_support_scores(logits, sampled, repeated, **args).logprobs, plain)
        with pytest.raises(ValueError, match="int32"):
            replay.sample_support_scores(logits, sampled, support.long(), **args)
    assert torch.isfinite(out.logprobs).all()
    assert handle.counts()[f"{REPLAY}.sample_support_scores"] == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_from_logits(skyrl, dtype):
    engine, kl_skyrl = skyrl
    functions = engine[FUNCTIONS]
    g = torch.Generator().manual_seed(5)
    source = (torch.randn(2, 7, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (2, 7), generator=g)
    mask = torch.ones(2, 7)
    mask[0, :3] = 0

    def run():
        logits = source.clone().requires_grad_()
        logp = functions.logprobs_from_logits(logits, labels)
        entropy = functions.chunked_entropy_from_logits(logits, requires_grad=True, attention_mask=mask, chunk_size=4)
        frozen = functions.chunked_entropy_from_logits(logits, attention_mask=mask)
        (logp.float().sum() + entropy.float().sum()).backward()
        return logp, entropy, frozen, logits.grad

    theirs = run()
    with kl_skyrl.patch(quiet=True) as handle:
        ours = run()
    counts = handle.counts()
    assert counts[f"{FUNCTIONS}.logprobs_from_logits"] == (1, 0)
    assert counts[f"{FUNCTIONS}.chunked_entropy_from_logits"] == (2, 0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(ours, theirs):
        assert got.dtype == want.dtype and got.requires_grad == want.requires_grad
        torch.testing.assert_close(got.float(), want.float(), **tol)
    assert (ours[1][0, :3] == 0).all()


@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_micro_batches(skyrl, form, capsys):
    """The same tokens scored in micro-batches of 1 and of 8 sequences: patched, every log-prob has the same
    bits both ways; SkyRL's own count is printed (its PyTorch scorer's reductions may split differently)."""
    engine, kl_skyrl = skyrl
    replay = engine[REPLAY]
    g = torch.Generator().manual_seed(8)
    B, T, K = 8, 16, 50
    sampled = torch.randint(0, V, (B, T), generator=g)
    support = _support(sampled, K, g)
    if form == "logits":
        source, weight = torch.randn(B, T, V, generator=g) * 2, None
    else:
        source, weight = torch.randn(B, T, 256, generator=g), torch.randn(V, 256, generator=g) / 16

    def score(rows):
        return replay.sample_support_scores(source[rows], sampled[rows], support[rows], vocab_start_index=0,
                                            vocab_end_index=V, tp_group=None, lm_head_weight=weight,
                                            compute_entropy=True).logprobs

    def differing():
        whole = score(slice(0, B))
        alone = torch.cat([score(slice(b, b + 1)) for b in range(B)])
        return int((whole != alone).sum())

    theirs = differing()
    with kl_skyrl.patch(quiet=True):
        ours = differing()
    with capsys.disabled():
        print(f"\nSkyRL sample_support_scores ({form}), {B * T} tokens scored in micro-batches of 8 and of 1: "
              f"log-probs that differ: SkyRL {theirs}, patched {ours}")
    assert ours == 0


def test_fsdp_model_wrapper_forward():
    """SkyRL's FSDP model wrapper (HFModelWrapper.forward, from its wheel with its own imports; flash-attn's
    padding helpers from this suite's stub) with sample-support replay on, on a tiny random Llama built here:
    log-probs and entropy of the generated tokens over their support rows, and the model's gradients, patched
    vs plain; the scorer served by the fused path."""
    pytest.importorskip("loguru")  # model_wrapper imports it (tests/engines/requirements-imports.txt)
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        engine = wheel_code.Engine("skyrl", MODULES + ["skyrl.backends.skyrl_train.workers.model_wrapper"])
    except wheel_code.WheelMissing as missing:
        pytest.skip(str(missing))
    vocab, B, T, A, K = 64, 2, 10, 4, 8
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    g = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, vocab, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[0, :2] = 0  # left padding
    generated = sequences[:, -A:].reshape(-1)
    others = torch.rand(B * A, vocab, generator=g).scatter_(-1, generated[:, None], -1.0).topk(K - 1).indices
    support = torch.cat([generated[:, None], others], -1).to(torch.int32)  # the sampled token and 7 others
    with engine.active():
        from kl_kernels.integrations import skyrl as kl_skyrl
        packed = engine["skyrl.backends.skyrl_train.utils.packed_tensor"]
        wrapper = engine["skyrl.backends.skyrl_train.workers.model_wrapper"].HFModelWrapper(model, bf16=False)
        rows = packed.PackedTensor(support, packed.cu_seqlens_from_lengths([A] * B))

        def run():
            model.zero_grad()
            logp, output = wrapper(sequences, A, attention, temperature=0.8, return_output=True, compute_entropy=True,
                                   sample_support=rows, loss_mask=torch.ones(B, A), enable_sample_support_replay=True)
            (logp.sum() + 0.1 * output["entropy"].sum()).backward()
            return [logp.detach(), output["entropy"].detach()] + [p.grad.clone() for p in model.parameters()]

        theirs = run()
        with kl_skyrl.patch(quiet=True) as handle:
            ours = run()
    assert handle.counts()[f"{REPLAY}.sample_support_scores"] == (1, 0), handle.fallback_reasons()
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patch_names_what_it_replaced(skyrl):
    _, kl_skyrl = skyrl
    with kl_skyrl.patch(quiet=True) as handle:
        replaced = set(handle.replaced)
    assert f"{REPLAY}.sample_support_scores" in replaced
    assert f"{FUNCTIONS}.logprobs_from_logits" in replaced
    assert kl_kernels.kept_ids_from_lists([[1, 2]]).tolist() == [[1, 2]]  # SkyRL's rows need no converter


def _tensor_parallel_worker(rank, world_size, port):
    """SkyRL's Megatron scoring on a vocabulary shard: logits [.., V/2] and the hidden-state form with this
    rank's weight shard, on a 2-process gloo group as SkyRL passes it (tp_group, vocab_start/end_index)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    engine = wheel_code.Engine("skyrl", MODULES)
    width = V // 2 + 1
    vocab, start = 2 * width, rank * width
    g = torch.Generator().manual_seed(0)
    B, T, K = 2, 7, 30
    sampled = torch.randint(0, vocab, (B, T), generator=g)
    scores = torch.rand(B, T, vocab, generator=g).scatter_(-1, sampled[..., None], 2.0)
    support = scores.topk(K, dim=-1).indices.to(torch.int32)  # global ids, distinct, the sampled one kept
    support[0, 0] = -1
    logits = torch.randn(B, T, vocab, generator=g) * 2
    hidden = torch.randn(B, T, 40, generator=g)
    weight = torch.randn(vocab, 40, generator=g) / 40 ** 0.5
    with engine.active():
        from kl_kernels.integrations import skyrl as kl_skyrl
        replay = engine[REPLAY]

        def run(patched, form):
            source = (logits[..., start:start + width] if form == "logits" else hidden).clone().requires_grad_()
            shard = weight[start:start + width].clone().requires_grad_()
            kwargs = dict(vocab_start_index=start, vocab_end_index=start + width, tp_group=dist.group.WORLD,
                          compute_entropy=True, entropy_requires_grad=True,
                          lm_head_weight=shard if form == "hidden" else None, temperature=0.8)
            if patched:
                with kl_skyrl.patch(quiet=True) as handle:
                    out = replay.sample_support_scores(source, sampled, support, **kwargs)
                assert handle.counts()[f"{REPLAY}.sample_support_scores"] == (1, 0), handle.fallback_reasons()
            else:
                out = replay.sample_support_scores(source, sampled, support, **kwargs)
            (out.logprobs.sum() + 0.5 * out.entropy.sum()).backward()
            grads = [source.grad] + ([shard.grad] if form == "hidden" else [])
            if form == "hidden":
                dist.all_reduce(grads[0])  # each rank's hidden gradient is its shard's share, in both
            return [out.logprobs.detach(), out.entropy.detach()] + grads

        for form in ("logits", "hidden"):
            for ours, theirs in zip(run(True, form), run(False, form)):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    dist.barrier()
    dist.destroy_process_group()


def test_tensor_parallel_group(skyrl):
    """sample_support_scores with SkyRL's tp_group in 2 gloo processes, logits and hidden-state forms, patched
    vs plain: values, entropy and the gradients of the shards (and of the replicated hidden states)."""
    import torch.multiprocessing as mp

    from kl_kernels.tools.bench_sharding import free_port

    mp.spawn(_tensor_parallel_worker, args=(2, free_port()), nprocs=2, join=True)
