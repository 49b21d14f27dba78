"""kl_kernels.integrations.trl inside the installed TRL (pinned in requirements.txt): each patched
function against TRL's own and against float64, the calls patch() must hand back to TRL, and
GRPOTrainer end to end on a tiny random Llama, with and without patch()."""
import importlib

import pytest
import torch

from trainer_env import require

trl = require("trl")
utils = importlib.import_module("trl.trainer.utils")
from kl_kernels.integrations import trl as kl_trl  # noqa: E402


def _truth(logits, index, temperature=1.0):
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    return log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax(dtype, temperature):
    logits = (torch.randn(3, 37, 1271) * 3).to(dtype)
    index = torch.randint(0, 1271, (3, 37))
    row_mask = torch.rand(3, 37) > 0.3
    expected, _ = _truth(logits, index, temperature)
    theirs = utils.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
    with kl_trl.patch(quiet=True) as handle:
        ours = utils.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
        top_k = utils.selective_log_softmax(logits, torch.stack([index, index.flip(-1)], -1), temperature=temperature)
    assert handle.counts()["trl.trainer.utils.selective_log_softmax"] == (2, 0)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    assert torch.equal(ours[~row_mask], torch.zeros_like(ours[~row_mask]))
    our_error = (ours.double() - expected)[row_mask].abs().max()
    their_error = (theirs.double() - expected)[row_mask].abs().max()
    # float32 inside, rounded once: never worse than TRL's own (which rounds every step in bf16)
    assert our_error <= max(their_error, 1e-5)
    top_k_expected = torch.stack([expected, _truth(logits, index.flip(-1), temperature)[0]], -1)
    assert (top_k.double() - top_k_expected).abs().max() <= max(2 * their_error, 1e-5)


def test_gradients_match_trl():
    logits = torch.randn(2, 33, 517, requires_grad=True)
    index = torch.randint(0, 517, (2, 33))
    weights = torch.randn(2, 33)
    logp, entropy = utils.selective_log_softmax_and_entropy(logits, index, temperature=0.9)
    (logp * weights + entropy).sum().backward()
    theirs, logits.grad = logits.grad, None
    with kl_trl.patch(quiet=True) as handle:
        logp2, entropy2 = utils.selective_log_softmax_and_entropy(logits, index, temperature=0.9)
        (logp2 * weights + entropy2).sum().backward()
        ent_only = utils.entropy_from_logits(logits.detach())
        _, detached = utils.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=False)
    assert handle.counts()["trl.trainer.utils.selective_log_softmax_and_entropy"] == (2, 0)
    assert handle.counts()["trl.trainer.utils.entropy_from_logits"] == (1, 0)
    torch.testing.assert_close(logp2, logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy2, entropy, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent_only, utils.entropy_from_logits(logits.detach()), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad, theirs, atol=1e-6, rtol=1e-5)
    assert not detached.requires_grad


def test_calls_handed_back_to_trl():
    logits, index = torch.randn(2, 5, 64), torch.randint(0, 64, (2, 5))
    with kl_trl.patch(quiet=True) as handle:
        # a tensor temperature is not a plain number: TRL decides what it means
        out = utils.selective_log_softmax(logits, index, temperature=torch.tensor(2.0))
        with pytest.raises(ValueError, match="temperature"):  # TRL's own error, unchanged
            utils.selective_log_softmax(logits, index, temperature=0.0)
        # integer logits: the fused path does not serve them, TRL's own code raises its own error
        with pytest.raises(Exception) as patched_error:
            utils.entropy_from_logits(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(Exception) as unpatched_error:
        utils.entropy_from_logits(torch.ones(2, 3, dtype=torch.int64))
    assert type(patched_error.value) is type(unpatched_error.value)
    assert handle.counts()["trl.trainer.utils.selective_log_softmax"] == (0, 2)
    torch.testing.assert_close(out, utils.selective_log_softmax(logits, index, temperature=torch.tensor(2.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprob_function(dtype):
    """TRL's hidden-state head: values and gradients of hidden, weight and bias, with Gemma's softcap
    and a logit scale, against TRL's own ChunkedLogProbFunction and float64."""
    n, h, v = 67, 48, 1031
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (torch.randn(v, h) / h ** 0.5).to(dtype).requires_grad_()
    bias = torch.randn(v).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    args = (hidden, weight, bias, targets, 0.8, 256, 3.0, 0.5, ("log_probs", "entropy"))
    g_logp, g_ent = torch.randn(n), torch.randn(n)

    def run(function):
        logp, entropy, *rest = function.apply(*args)
        assert rest == [None, None, None]
        (logp * g_logp + entropy * g_ent).sum().backward()
        grads = [t.grad.clone() for t in (hidden, weight, bias)]
        for t in (hidden, weight, bias):
            t.grad = None
        return logp.detach(), entropy.detach(), grads

    theirs = run(utils._ChunkedLogProbFunction)
    with kl_trl.patch(quiet=True) as handle:
        ours = run(utils._ChunkedLogProbFunction)
        # an output the fused path does not compute goes to TRL's own function
        utils._ChunkedLogProbFunction.apply(*args[:-1], ("log_probs", "is_top1"))
    assert handle.counts()["trl.trainer.utils._ChunkedLogProbFunction"] == (1, 1)
    # float64 truth of the same head
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    z = 3.0 * torch.tanh(0.5 * torch.nn.functional.linear(h64, w64, b64) / 3.0) / 0.8
    log_p = torch.log_softmax(z, -1)
    logp64 = log_p.gather(-1, targets[:, None]).squeeze(-1)
    ent64 = -(log_p.exp() * log_p).sum(-1)
    (logp64 * g_logp.double() + ent64 * g_ent.double()).sum().backward()
    truth = (logp64.detach(), ent64.detach(), [h64.grad, w64.grad, b64.grad])
    for ours_t, theirs_t, true_t in zip([*ours[:2], *ours[2]], [*theirs[:2], *theirs[2]], [*truth[:2], *truth[2]]):
        assert ours_t.dtype == theirs_t.dtype
        our_error = (ours_t.double() - true_t).abs().max()
        their_error = (theirs_t.double() - true_t).abs().max()
        assert our_error <= 2 * their_error + 1e-5, (our_error, their_error)


def _tiny_llama(tmp_path):
    """A tiny random Llama saved under tmp_path, its word-level tokenizer and 16 prompts."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "a b c d e f g h i j k l m n o p".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>", padding_side="left")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model_dir = str(tmp_path / "model")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = Dataset.from_dict({"prompt": ["a b c", "d e f", "g h i", "j k l"] * 4})
    return model_dir, tokenizer, prompts


def _train_grpo(tmp_path, model_dir, tokenizer, prompts, patched, check=None, **config):
    """GRPOTrainer on the tiny Llama (beta 0.1: a reference model too) on CPU, its settings updated by config:
    (the log history, and when patched (counts, fallback reasons)); check(trainer) before training."""
    torch.manual_seed(0)
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=6, max_steps=3, beta=0.1, report_to="none", use_cpu=True, logging_steps=1,
                    seed=0, save_strategy="no", learning_rate=1e-3) | config
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                              args=trl.GRPOConfig(**settings), train_dataset=prompts, processing_class=tokenizer)
    if check is not None:
        check(trainer)
    if not patched:
        trainer.train()
        return trainer.state.log_history, None
    with kl_trl.patch(quiet=True) as handle:
        trainer.train()
    return trainer.state.log_history, (handle.counts(), handle.fallback_reasons())


def test_grpo_end_to_end(tmp_path):
    """GRPOTrainer (beta > 0, so a reference model too) on a tiny random Llama built here, 3 steps
    on CPU: with patch() the fused head serves every policy and reference pass, and the logged
    metrics agree with the unpatched run within 1e-4 relative."""
    model_dir, tokenizer, prompts = _tiny_llama(tmp_path)

    def train(patched, bf16=False):
        return _train_grpo(tmp_path, model_dir, tokenizer, prompts, patched, bf16=bf16)

    plain, _ = train(False)
    fused, (counts, reasons) = train(True)
    # one policy pass and one reference pass per step, all on the fused head
    assert counts["trl.trainer.utils._ChunkedLogProbFunction"][0] >= 6, reasons
    assert counts["trl.trainer.utils._ChunkedLogProbFunction"][1] == 0
    steps = [(a, b) for a, b in zip(plain, fused) if "loss" in a]
    assert len(steps) == 3
    # The first step (before any update) within 1e-4; later steps within 1%: Adam's first steps move
    # every weight by about lr whatever its gradient's size, so the gradients' last bits (a few ulp
    # between any two float32 log-softmax kernels) steer the weights whose gradient is ~0, and the
    # runs drift apart (measured: kl, the policy's drift from the reference, 0.45% apart and
    # grad_norm 0.02% at step 3, once the CPU kernel's exp changed by under 1 ulp).
    for step, (a, b) in enumerate(steps):
        for key in ("loss", "kl", "entropy", "reward", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4 if step == 0 else 1e-2, abs=1e-7), (step, key)
    assert steps[-1][1]["kl"] > 0  # the policy moved: the KL term is live
    # transformers' default on a CPU with bf16: TRL's head runs its tiles under bf16 autocast, and so
    # does the replacement (no fallback)
    _, (counts, reasons) = train(True, bf16=True)
    assert counts["trl.trainer.utils._ChunkedLogProbFunction"] == (6, 0), reasons


def test_grpo_ratio_at_learning_rate_zero(tmp_path, capsys):
    """The verl-6280 situation in TRL: GRPO at learning rate 0, so the importance ratio of every token
    is 1 in exact arithmetic. The old log-probs are computed over the whole generation batch (4
    sequences at once, as a trainer with a larger log-prob micro-batch does), the training ones one
    sequence at a time. Patched, the fused head gives every token the same log-prob both times; the
    fraction of tokens whose ratio != 1 is printed for both runs (the model body's matmuls may still
    differ between batch sizes: here they did not)."""
    model_dir, tokenizer, prompts = _tiny_llama(tmp_path)

    class Probe(trl.GRPOTrainer):
        # the old log-probs (no grad) over the whole generation batch; the training pass as TRL chunks it
        def _get_per_token_logps_and_entropies(self, model, input_ids, *args, batch_size=None, **kwargs):
            if not torch.is_grad_enabled():
                batch_size = input_ids.size(0)
            out = super()._get_per_token_logps_and_entropies(model, input_ids, *args, batch_size=batch_size, **kwargs)
            self.last_logps = out[0]
            return out

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            mask = inputs["completion_mask"].bool()
            old = inputs["old_per_token_logps"]
            self.tokens += int(mask.sum())
            self.differing += int(((self.last_logps.detach() != old) & mask).sum())
            return loss

    def run(patched):
        torch.manual_seed(0)
        args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, steps_per_generation=4,
                              num_generations=2, max_completion_length=12, max_steps=8, beta=0.0, report_to="none",
                              use_cpu=True, logging_steps=1, seed=0, save_strategy="no", learning_rate=0.0)
        trainer = Probe(model=model_dir, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                        args=args, train_dataset=prompts, processing_class=tokenizer)
        trainer.tokens = trainer.differing = 0
        if patched:
            with kl_trl.patch(quiet=True):
                trainer.train()
        else:
            trainer.train()
        return trainer.differing, trainer.tokens

    plain, fused = run(False), run(True)
    with capsys.disabled():
        print(f"\nGRPO at lr 0, old log-probs over 4 sequences, new over 1: tokens with ratio != 1: "
              f"unpatched {plain[0]} of {plain[1]}, patched {fused[0]} of {fused[1]}")
    assert fused[1] > 0 and fused[0] == 0


def test_chunked_logprob_under_autocast():
    """bf16 autocast (transformers' CPU default with bf16=True): TRL projects in bf16; so does the
    replacement, and the float32 parameters get float32 gradients."""
    n, h, v = 40, 32, 517
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h ** 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, entropy, *_ = utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0,
                                                                   ("log_probs", "entropy"))
        (logp.sum() + entropy.sum()).backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        return logp.detach(), entropy.detach(), grads

    theirs = run()
    with kl_trl.patch(quiet=True) as handle:
        ours = run()
    assert handle.counts()["trl.trainer.utils._ChunkedLogProbFunction"] == (1, 0)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    assert ours[2][1].dtype == torch.float32
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=1e-4)
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # bf16 tiles on both sides


def test_fp32_logits_from_the_bf16_head():
    """patch(logits_dtype=torch.float32) (issue 37): TRL's head on bf16 weights and hidden states keeps
    float32 logits, the numbers TRL's own cast_lm_head_to_fp32 computes at the same weights (its float32
    head on the upcast values: bf16 products are exact in float32) to float32 rounding, without a
    float32 copy of the head; unpatched, TRL's bf16 tiles are far coarser. Gradients stay bf16."""
    n, h, v = 53, 64, 1031
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).bfloat16()
    targets = torch.randint(0, v, (n,), generator=g)

    def run(h_in, w_in):
        h_in = h_in.clone().requires_grad_()
        logp, entropy, *_ = utils._ChunkedLogProbFunction.apply(h_in, w_in, None, targets, 0.9, 256, None, 1.0,
                                                               ("log_probs", "entropy"))
        (logp.sum() + entropy.sum()).backward()
        return logp.detach().double(), entropy.detach().double(), h_in.grad

    fp32_head = run(hidden.float(), weight.float())  # what cast_lm_head_to_fp32 computes
    bf16_head = run(hidden, weight)
    with kl_trl.patch(quiet=True, logits_dtype=torch.float32) as handle:
        ours = run(hidden, weight)
    assert handle.counts()["trl.trainer.utils._ChunkedLogProbFunction"] == (1, 0)
    for k in (0, 1):
        ours_error = (ours[k] - fp32_head[k]).abs().max().item()
        assert ours_error < 2e-5, ours_error
        assert (bf16_head[k] - fp32_head[k]).abs().max().item() > 20 * ours_error
    assert ours[2].dtype == torch.bfloat16
    torch.testing.assert_close(ours[2].float(), fp32_head[2], atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="logits_dtype"):
        kl_trl.patch(quiet=True, logits_dtype=torch.bfloat16)


def test_grpo_with_trls_fp32_lm_head(tmp_path):
    """GRPOConfig(cast_lm_head_to_fp32=True, bf16=True): TRL makes the head float32 and upcasts the hidden
    states; the fused head serves every pass as that float32 head, and the first step's metrics agree with
    the unpatched run."""
    model_dir, tokenizer, prompts = _tiny_llama(tmp_path)

    def train(patched):
        def check(trainer):
            assert trainer.model.lm_head.weight.dtype == torch.float32

        return _train_grpo(tmp_path, model_dir, tokenizer, prompts, patched, check, max_steps=2, bf16=True,
                           cast_lm_head_to_fp32=True)

    plain, _ = train(False)
    fused, (counts, reasons) = train(True)
    assert counts["trl.trainer.utils._ChunkedLogProbFunction"] == (4, 0), reasons
    first = [(a, b) for a, b in zip(plain, fused) if "loss" in a][0]
    for key in ("loss", "kl", "entropy", "grad_norm"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-3, abs=1e-6), key
