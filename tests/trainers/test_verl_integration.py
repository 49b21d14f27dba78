"""kl_kernels.integrations.verl inside the installed verl (pinned in requirements.txt): each patched
function against verl's own (values, dtypes, gradients, no writes into the caller's logits), the
hidden-state head against float64, and verl's PPO pieces (log-probs -> kl_penalty -> agg_loss ->
policy loss, apply_kl_penalty on a real DataProto) patched vs unpatched."""
import importlib

import pytest
import torch

from trainer_env import require

require("verl")
verl_F = importlib.import_module("verl.utils.torch_functional")
from kl_kernels.integrations import verl as kl_verl  # noqa: E402

FUNCTIONS = ["logprobs_from_logits", "logprobs_from_logits_v2", "logprobs_from_logits_naive", "entropy_from_logits",
             "entropy_from_logits_with_chunking"]


def _call(name, logits, labels):
    function = getattr(verl_F, name)
    return function(logits) if name.startswith("entropy") else function(logits, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_matches_verl(name, dtype):
    shape = (67, 1031) if name == "entropy_from_logits_with_chunking" else (3, 29, 1031)
    source = (torch.randn(shape) * 2).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    weights = torch.randn(shape[:-1])
    logits = source.clone().requires_grad_()
    theirs = _call(name, logits, labels)
    (theirs.float() * weights).sum().backward()
    their_grad, logits.grad = logits.grad, None
    with kl_verl.patch(quiet=True) as handle:
        ours = _call(name, logits, labels)
        (ours.float() * weights).sum().backward()
    assert handle.counts()[f"verl.utils.torch_functional.{name}"] == (1, 0)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(logits.detach(), source)  # verl's CPU path never writes into the logits: nor do we
    tolerance = 1e-5 if dtype == torch.float32 else 0.05  # bf16: verl rounds every step, we round once
    torch.testing.assert_close(ours.float(), theirs.float(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(logits.grad.float(), their_grad.float(), atol=tolerance, rtol=tolerance)


def test_inplace_backward_only_where_verl_would(monkeypatch):
    """inplace_backward=True (verl's default) writes the gradient over the logits only on verl's
    flash-attn path (float32 result) and only for an intermediate; a leaf, or logits another op
    saved, keeps its values and gets the right gradient."""
    x = torch.randn(2, 9, 301, requires_grad=True)
    labels = torch.randint(0, 301, (2, 9))
    expected_grad = torch.func.grad(
        lambda t: (torch.log_softmax(t, -1).gather(-1, labels[..., None]).sum() + (t ** 2).sum()))(x.detach())
    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)  # as on a GPU with flash-attn
    with kl_verl.patch(quiet=True):
        leaf = x.detach().clone().requires_grad_()
        logp = verl_F.logprobs_from_logits(leaf, labels)
        assert logp.dtype == torch.float32
        (logp.sum() + (leaf ** 2).sum()).backward()
        torch.testing.assert_close(leaf.grad, expected_grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(leaf.detach(), x.detach())
        intermediate = x * 1.0
        verl_F.logprobs_from_logits(intermediate, labels).sum().backward()  # in place: nothing else saved it
        torch.testing.assert_close(x.grad, expected_grad - 2 * x.detach(), atol=1e-5, rtol=1e-5)
        bf16 = verl_F.logprobs_from_logits(x.detach().bfloat16(), labels)
        assert bf16.dtype == torch.float32  # verl's flash path returns float32 for every dtype


def test_linear_cross_entropy_against_float64():
    """verl's hidden-state head (its Triton kernels need CUDA; on CPU the replacement serves it)."""
    module = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    hidden = torch.randn(2, 21, 40, requires_grad=True)
    weight = (torch.randn(613, 40) / 40 ** 0.5).requires_grad_()
    labels = torch.randint(0, 613, (2, 21))
    with kl_verl.patch(quiet=True) as handle:
        logp, entropy = module.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    assert handle.counts()["verl.utils.kernel.linear_cross_entropy.linear_cross_entropy"] == (1, 0)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    log_p = torch.log_softmax((h64 @ w64.t()) / 0.7, -1).reshape(-1, 613)
    logp64 = log_p.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    ent64 = -(log_p.exp() * log_p).sum(-1)
    (logp64.sum() + 0.5 * ent64.sum()).backward()
    assert logp.shape == entropy.shape == (42,) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), logp64.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ent64.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_micro_batch_size_does_not_change_the_log_probs(dtype):
    """verl issue 6280: old_log_prob (computed at one micro-batch size) and log_prob (at another) of the
    same tokens differ. Patched, both heads - logprobs_from_logits on the logits and linear_cross_entropy
    on the hidden states - give every token the same bits at micro-batches of 8 and 1 sequences. The
    unfused path's difference (F.linear per micro-batch, then verl's own log-probs) is printed: it is the
    matmul's, which picks its blocking from the rows it is given."""
    module = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    batch, length, hidden_size, vocab = 8, 5, 40, 613
    hidden = torch.randn(batch, length, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, length))

    def by_micro_batches(size, head, rows=hidden):
        return torch.cat([head(rows[i:i + size], labels[i:i + size]) for i in range(0, batch, size)])

    def fused_head(h, y):
        return module.linear_cross_entropy(h.reshape(-1, hidden_size), weight, y.reshape(-1), 1.0, "none")[0].view(y.shape)

    def unfused_head(h, y):
        return verl_F.logprobs_from_logits(torch.nn.functional.linear(h, weight), y)

    logits = hidden @ weight.t()  # the same logits rows, grouped two ways
    with kl_verl.patch(quiet=True):
        differing = {"logprobs_from_logits": by_micro_batches(8, verl_F.logprobs_from_logits, logits)
                     .ne(by_micro_batches(1, verl_F.logprobs_from_logits, logits)).sum().item(),
                     "linear_cross_entropy": by_micro_batches(8, fused_head).ne(by_micro_batches(1, fused_head))
                     .sum().item()}
    plain = by_micro_batches(8, unfused_head).ne(by_micro_batches(1, unfused_head)).sum().item()
    print(f"tokens whose log-prob differs between micro-batches of 8 and 1 ({dtype}): patched {differing}; "
          f"unpatched F.linear + logprobs_from_logits: {plain} of {batch * length}")
    assert differing == {"logprobs_from_logits": 0, "linear_cross_entropy": 0}


def _ppo_step(patched):
    """verl's own PPO pieces on log-probs from verl's functions: kl_penalty, agg_loss, the vanilla
    policy loss, the entropy bonus; then apply_kl_penalty on a DataProto."""
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty
    from verl.workers.config.actor import ActorConfig

    torch.manual_seed(3)
    batch, length, vocab = 4, 12, 997
    logits = torch.randn(batch, length, vocab, requires_grad=True)
    ref_logits = torch.randn(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    mask = (torch.arange(length) < torch.tensor([12, 9, 5, 1])[:, None]).float()
    advantages = torch.randn(batch, length)
    handle = kl_verl.patch(quiet=True) if patched else None
    try:
        log_prob = verl_F.logprobs_from_logits(logits, labels)
        ref_log_prob = verl_F.logprobs_from_logits(ref_logits, labels)
        entropy = verl_F.entropy_from_logits(logits)
        config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size=2, clip_ratio=0.2)
        pg_loss, _ = core_algos.compute_policy_loss_vanilla(
            old_log_prob=log_prob.detach(), log_prob=log_prob, advantages=advantages, response_mask=mask,
            loss_agg_mode="seq-mean-token-sum-norm", config=config)
        kl_loss = core_algos.agg_loss(core_algos.kl_penalty(log_prob, ref_log_prob, "low_var_kl"), mask,
                                      "seq-mean-token-mean")
        loss = pg_loss + 0.1 * kl_loss - 0.01 * core_algos.agg_loss(entropy, mask, "token-mean")
        loss.backward()
        data = DataProto.from_dict(tensors={"response_mask": mask, "token_level_scores": torch.randn(batch, length),
                                            "old_log_probs": log_prob.detach(), "ref_log_prob": ref_log_prob})
        controller = core_algos.AdaptiveKLController(init_kl_coef=0.05, target_kl=0.5, horizon=100)
        data, metrics = apply_kl_penalty(data, controller, kl_penalty="kl")
        counts = handle.counts() if handle else None
    finally:
        if handle:
            handle.restore()
    return loss.detach(), logits.grad, data.batch["token_level_rewards"], metrics, controller.value, counts


def test_ppo_pieces_patched_vs_unpatched():
    loss, grad, rewards, metrics, coef, _ = _ppo_step(False)
    loss2, grad2, rewards2, metrics2, coef2, counts = _ppo_step(True)
    assert counts["verl.utils.torch_functional.logprobs_from_logits"] == (2, 0)
    assert counts["verl.utils.torch_functional.entropy_from_logits"] == (1, 0)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad2, grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(rewards2, rewards, atol=1e-6, rtol=1e-5)
    assert metrics2["actor/reward_kl_penalty"] == pytest.approx(metrics["actor/reward_kl_penalty"], rel=1e-5)
    assert coef2 == pytest.approx(coef, rel=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_aggregate_matches_installed_verl(mode):
    """kl_kernels.aggregate (a public O(N) helper) against the installed verl's agg_loss, so it
    cannot drift from the trainer again."""
    import kl_kernels
    from verl.trainer.ppo.core_algos import agg_loss

    values = torch.randn(6, 11, dtype=torch.float64)
    mask = (torch.rand(6, 11) > 0.4).double()
    mask[3] = 0  # a sequence with no valid token
    expected = agg_loss(values, mask, mode)
    torch.testing.assert_close(kl_kernels.aggregate(values, mask, mode), expected)
    if mode.startswith("seq-mean"):
        expected = agg_loss(values, mask, mode, global_batch_size=9, loss_scale_factor=7)
        ours = kl_kernels.aggregate(values, mask, mode, global_sequences=9,
                                    loss_scale_factor=7 if mode.endswith("norm") else None)
        torch.testing.assert_close(ours, expected)


def test_controller_follows_installed_verl():
    """kl_kernels.AdaptiveKLController against the installed verl's, negative KL included."""
    import kl_kernels
    from verl.trainer.ppo.core_algos import AdaptiveKLController

    ours, theirs = kl_kernels.AdaptiveKLController(0.05, 3.0, 1000), AdaptiveKLController(0.05, 3.0, 1000)
    for current_kl, n_steps in [(-0.02, 64), (0.5, 64), (7.0, 128), (3.1, 32), (-1e-3, 256)]:
        ours.update(current_kl, n_steps)
        theirs.update(current_kl, n_steps)
        assert ours.value == pytest.approx(theirs.value, rel=1e-12)


def _megatron_stand_in(group):
    """megatron-core (not installable here: no wheel in this machine's index) as far as verl's
    tensor_parallel module reads it: the tensor-parallel group. Megatron's cross entropy must not
    be called while patched."""
    import sys
    import types

    def not_while_patched(*args, **kwargs):
        raise AssertionError("megatron's vocab_parallel_cross_entropy was called although patched")

    parallel_state = types.ModuleType("megatron.core.parallel_state")
    parallel_state.get_tensor_model_parallel_group = lambda: group
    tensor_parallel = types.ModuleType("megatron.core.tensor_parallel")
    tensor_parallel.vocab_parallel_cross_entropy = not_while_patched
    core = types.ModuleType("megatron.core")
    core.parallel_state, core.tensor_parallel = parallel_state, tensor_parallel
    sys.modules.update({"megatron": types.ModuleType("megatron"), "megatron.core": core,
                        "megatron.core.parallel_state": parallel_state,
                        "megatron.core.tensor_parallel": tensor_parallel})
    return importlib.import_module("verl.utils.megatron.tensor_parallel")


def _tensor_parallel_worker(rank, world_size, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch._dynamo.config.disable = True  # verl's entropy torch.compile's a 2-line helper: eager here
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    tp = _megatron_stand_in(dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    vocab = 2 * 517  # Megatron's equal shards
    start, end = rank * 517, (rank + 1) * 517
    logits = (torch.randn(3, 11, vocab, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (3, 11), generator=g)
    weights = torch.randn(3, 11, generator=g)
    full = logits.double().requires_grad_()
    log_p = torch.log_softmax(full, -1)
    logp64, ent64 = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)

    # entropy: verl's own (on its Megatron group) against the patched one, values, dtype and gradient
    theirs_input = logits[..., start:end].clone().requires_grad_()
    theirs = tp.vocab_parallel_entropy(theirs_input)
    (theirs.float() * weights).sum().backward()
    their_grad = theirs_input.grad
    # verl's backward subtracts from the logits in place and adds back: in bf16 that does not round
    # trip, so its input is a fresh copy; ours must leave the caller's logits untouched
    shard = logits[..., start:end].clone().requires_grad_()
    with kl_verl.patch(quiet=True) as handle:
        ours = tp.vocab_parallel_entropy(shard)
        (ours.float() * weights).sum().backward()
        chunked = tp.vocab_parallel_entropy_with_chunking(shard.detach(), chunk_size=4)
        logp = tp.vocab_parallel_log_probs_from_logits(shard, labels)
    counts = handle.counts()
    for name in ("vocab_parallel_entropy", "vocab_parallel_entropy_with_chunking",
                 "vocab_parallel_log_probs_from_logits"):
        assert counts[f"verl.utils.megatron.tensor_parallel.{name}"] == (1, 0), counts
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == theirs.shape == (3, 11)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)  # verl's runs in bf16
    torch.testing.assert_close(ours.double(), ent64.detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(shard.grad.float(), their_grad.float(), rtol=5e-2, atol=2e-3)
    assert torch.equal(shard.detach(), logits[..., start:end])
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked.double(), ent64.detach(), rtol=1e-5, atol=1e-5)
    # log-probs: Megatron's -vocab_parallel_cross_entropy against float64, gradient to this rank's shard
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), logp64.detach(), rtol=1e-5, atol=1e-5)
    shard.grad = None
    (logp * weights).sum().backward()
    (logp64 * weights).sum().backward()
    torch.testing.assert_close(shard.grad.double(), full.grad[..., start:end].to(torch.bfloat16).double(),
                               rtol=1e-2, atol=1e-6)

    # the hidden-state head with dist_process_group: this rank's weight shard, hidden replicated
    module = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    hidden = torch.randn(33, 40, generator=g).requires_grad_()
    weight = (torch.randn(vocab, 40, generator=g) / 40 ** 0.5)
    weight_shard = weight[start:end].clone().requires_grad_()
    flat_labels = labels.reshape(-1)
    with kl_verl.patch(quiet=True) as handle:
        logp, entropy = module.linear_cross_entropy(hidden, weight_shard, flat_labels, 0.7, "none", dist.group.WORLD)
    assert handle.counts()["verl.utils.kernel.linear_cross_entropy.linear_cross_entropy"] == (1, 0)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.double().requires_grad_()
    log_p = torch.log_softmax((h64 @ w64.t()) / 0.7, -1)
    lp64, e64 = log_p.gather(-1, flat_labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
    (lp64.sum() + 0.5 * e64.sum()).backward()
    torch.testing.assert_close(logp.double(), lp64.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), e64.detach(), atol=1e-5, rtol=1e-5)
    hidden_grad = hidden.grad.clone()
    dist.all_reduce(hidden_grad)  # as verl: each rank's hidden gradient is its shard's contribution
    torch.testing.assert_close(hidden_grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight_shard.grad.double(), w64.grad[start:end], atol=1e-5, rtol=1e-4)
    dist.barrier()
    dist.destroy_process_group()


def test_megatron_vocab_parallel_functions_and_sharded_head():
    """verl's Megatron vocab-parallel entropy / log-probs and linear_cross_entropy(dist_process_group)
    patched, in 2 gloo processes: against verl's own entropy on the same group and float64."""
    import torch.multiprocessing as mp

    from kl_kernels.tools.bench_sharding import free_port

    mp.spawn(_tensor_parallel_worker, args=(2, free_port()), nprocs=2, join=True)
