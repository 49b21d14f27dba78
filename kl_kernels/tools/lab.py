"""kl-lab: the k_kl guidance of the KL guide (docs/kl-lab.md), measured on a small model in minutes.

A known generative process (a sparse Markov chain over a small vocabulary, `Chain`) makes the
"language"; a small causal transformer (`TinyLM`) is pretrained on it in-process and becomes both
the frozen reference and the policy's start. The reward can be hacked: the proxy score counts a
bonus token, which the chain uses now and then but almost never twice in a row, so repeating it
raises the proxy while the true quality (the chain's log-likelihood of the text, per token, which
the experiment reports but never optimises) falls. RL then runs with this package's fused
`kl_penalty` (the `cpu` backend where built) in the loop:

- `ppo`: per-token KL reward r_t = -k_kl * log(P/P_ref) (`kl_rewards`: the score at the last valid
  token), reward-to-go with a per-position batch baseline, PPO's clipped ratio, 2 epochs per batch;
- `grpo`: group-normalised scores as advantages and k_kl * k3 KL in the loss instead of the reward.

A sweep of k_kl (fixed, plus the adaptive controller toward 3 nats per sequence) over seeds writes
every step to CSV; lab_report.py turns the runs into plots and a verdict per claim of the guide.
`kl-lab --quick` is the small version the tests run.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import time

import torch
import torch.nn.functional as F

import kl_kernels
from kl_kernels.tools.cli import HelpFormatter

MAX_LEN = 24  # generated tokens per response at most (EOS ends one earlier)
CONTENT = 30  # content tokens 0..29; 30 = EOS; 31 = BOS (input only)
EOS, BOS = CONTENT, CONTENT + 1
BONUS = 0  # the token the proxy reward counts


class Chain:
    """The known generative process: each state (BOS or a content token) has a few likely
    successors; EOS ends a response with probability 1/16 after a content token. The bonus token
    follows any token with probability 0.06, but itself with 0.002: repeating it is "bad language"."""

    def __init__(self, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        states = CONTENT + 2  # rows: content tokens, EOS (unused), BOS
        probs = torch.full((states, CONTENT + 1), 1e-3)
        for state in range(states):
            favoured = torch.randperm(CONTENT - 1, generator=g)[:4] + 1  # never the bonus token
            probs[state, favoured] += torch.rand(4, generator=g) + 0.5
        probs[:, BONUS] = 0.0
        probs[:, EOS] = 0.0
        probs /= probs.sum(-1, keepdim=True)
        probs *= 1 - 0.06 - 1 / 16
        probs[:, BONUS] = 0.06
        probs[:, EOS] = 1 / 16
        probs[BONUS, BONUS] = 0.002
        probs[BONUS] /= probs[BONUS].sum()
        probs[BOS, EOS] = 1e-4  # a response almost always has a token (never 0: an empty one is finite)
        probs[BOS] /= probs[BOS].sum()
        self.log_probs = probs.log()

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return generate(lambda prefix: self.log_probs[prefix[:, -1]].exp(), batch, generator)

    def quality(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch] mean log-likelihood per generated token under the chain (the true quality)."""
        prev, nxt = tokens[:, :-1].clamp(max=CONTENT + 1), tokens[:, 1:]
        ll = self.log_probs[prev, nxt.clamp(max=CONTENT)]
        return (ll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def generate(next_probs, batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, MAX_LEN + 1] sequences BOS x1 ... (EOS-padded after the first EOS), each next token
    drawn from next_probs(prefix [batch, t]) -> [batch, CONTENT + 1] probabilities."""
    tokens = torch.full((batch, MAX_LEN + 1), EOS, dtype=torch.long)
    tokens[:, 0] = BOS
    alive = torch.ones(batch, dtype=torch.bool)
    for t in range(1, MAX_LEN + 1):
        nxt = torch.multinomial(next_probs(tokens[:, :t]), 1, generator=generator).squeeze(1)
        tokens[:, t] = torch.where(alive, nxt, EOS)
        alive &= nxt != EOS
    return tokens


def response_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, MAX_LEN] float: 1 for each generated token up to and including the first EOS."""
    labels = tokens[:, 1:]
    ended_before = torch.cumsum((labels == EOS).long(), 1) - (labels == EOS).long()
    return (ended_before == 0).float()


class TinyLM(torch.nn.Module):
    """A causal transformer: token and position embeddings, `layers` pre-norm blocks, an LM head."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(CONTENT + 2, width)
        self.position = torch.nn.Embedding(MAX_LEN + 1, width)
        block = torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, CONTENT + 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, T] tokens -> [batch, T, CONTENT + 1] next-token logits."""
        T = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(T))
        causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
        return self.head(self.norm(self.blocks(x, mask=causal, is_causal=True)))

    @torch.no_grad()
    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return generate(lambda prefix: torch.softmax(self(prefix)[:, -1].float(), -1), batch, generator)


def pretrain(chain: Chain, width: int, seed: int, steps: int) -> TinyLM:
    """The reference model: next-token cross-entropy on fresh samples of the chain."""
    torch.manual_seed(seed)
    model = TinyLM(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = chain.sample(128, g)
        mask = response_mask(tokens)
        labels = tokens[:, 1:].masked_fill(mask == 0, -100)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@dataclasses.dataclass
class RunConfig:
    variant: str = "ppo"  # "ppo" (KL in the reward) or "grpo" (k3 KL in the loss)
    kl_coef: float = 0.1
    adaptive: bool = False  # AdaptiveKLController toward TARGET_KL per sequence, starting at kl_coef
    seed: int = 0
    width: int = 64
    reward_scale: float = 1.0
    steps: int = 100
    batch: int = 64
    lr: float = 1e-3


TARGET_KL = 3.0  # per sequence: the guide's worked target for adaptive control
GROUP = 8  # grpo: samples per group


def proxy_score(tokens: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The hackable reward: scale x the count of the bonus token, over MAX_LEN / 4 (4 bonus tokens
    in a response earn `scale`)."""
    return scale * ((tokens[:, 1:] == BONUS).float() * mask).sum(-1) / (MAX_LEN / 4)


def run(config: RunConfig, reference: TinyLM, chain: Chain, backend=None):
    """One RL run from the reference; yields one dict of figures per step (step 0: before any update)."""
    torch.manual_seed(config.seed)
    policy = TinyLM(config.width)
    policy.load_state_dict(reference.state_dict())
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    controller = (kl_kernels.AdaptiveKLController(config.kl_coef, TARGET_KL, horizon=500) if config.adaptive
                  else kl_kernels.FixedKLController(config.kl_coef))
    g = torch.Generator().manual_seed(10_000 + config.seed)
    for step in range(config.steps + 1):
        policy.eval()
        tokens = policy.sample(config.batch, g)
        mask = response_mask(tokens)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        score = proxy_score(tokens, mask, config.reward_scale)
        with torch.no_grad():
            ref_logits = reference(inputs)
            logits = policy(inputs)
            # the exact KL per token for the record; the estimator the algorithm uses below
            exact = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, estimator="full",
                                          backend=backend)
        kl_coef = float(controller.value)
        figures = dict(step=step, proxy=float(score.mean()), quality=float(chain.quality(tokens, mask).mean()),
                       kl_token=float((exact.kl.sum() / mask.sum())), kl_seq=float(exact.kl_sum.mean()),
                       kl_coef=kl_coef, length=float(mask.sum(-1).mean()))
        figures["advice"] = kl_kernels.diagnose(kl_coef=kl_coef, kl_per_token=figures["kl_token"],
                                                kl_per_sequence=figures["kl_seq"]).advice
        yield figures
        if step == config.steps:
            break
        controller.update(figures["kl_seq"], n_steps=config.batch)
        policy.train()
        if config.variant == "ppo":
            _ppo_update(policy, optimizer, inputs, labels, mask, score, logits, ref_logits, kl_coef, backend)
        else:
            _grpo_update(policy, optimizer, inputs, labels, mask, score, logits, ref_logits, kl_coef, backend)


def _clipped_policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -kl_kernels.aggregate(surrogate, mask, "token-mean")


def _ppo_update(policy, optimizer, inputs, labels, mask, score, logits, ref_logits, kl_coef, backend, epochs=2):
    """PPO with the guide's per-token KL reward (k1 = log P/P_ref) and the score at the last token."""
    sampled = kl_kernels.kl_penalty(logits, labels, ref_logits=ref_logits, mask=mask, kl_coef=kl_coef,
                                    estimator="k1", backend=backend)
    rewards = kl_kernels.kl_rewards(score, sampled.kl, mask, kl_coef)
    returns = rewards.flip(1).cumsum(1).flip(1) * mask  # reward to go, undiscounted
    baseline = returns.sum(0) / mask.sum(0).clamp(min=1)  # per position, over the batch
    advantages = (returns - baseline) * mask
    advantages = advantages / (advantages.pow(2).sum() / mask.sum()).sqrt().clamp(min=1e-6)
    for _ in range(epochs):
        logp = kl_kernels.token_logprobs(policy(inputs), labels.masked_fill(mask == 0, -100), backend=backend)
        loss = _clipped_policy_loss(logp, sampled.logprobs, advantages, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _grpo_update(policy, optimizer, inputs, labels, mask, score, logits, ref_logits, kl_coef, backend, epochs=2):
    """GRPO: scores normalised within groups of GROUP samples as the advantage of every token, and
    kl_coef x the k3 estimate of KL(policy || reference) in the loss (not in the reward)."""
    old_logp = kl_kernels.token_logprobs(logits, labels.masked_fill(mask == 0, -100), backend=backend)
    groups = score.view(-1, GROUP)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    advantages = advantages.expand_as(mask) * mask
    for _ in range(epochs):
        out = kl_kernels.kl_penalty(policy(inputs), labels, ref_logits=ref_logits, mask=mask, estimator="k3",
                                    backend=backend)
        loss = _clipped_policy_loss(out.logprobs, old_logp, advantages, mask) \
            + kl_coef * kl_kernels.aggregate(out.kl, mask, "token-mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


KL_COEFS = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def plan(quick: bool):
    """The runs of the sweep: (group, RunConfig). quick: the three k_kl the tests check, one seed."""
    if quick:
        return [("sweep", RunConfig(kl_coef=k, steps=50)) for k in (0.0, 0.1, 10.0)]
    runs = []
    for seed in range(3):
        runs += [("sweep", RunConfig(kl_coef=k, seed=seed)) for k in KL_COEFS]
        runs.append(("sweep", RunConfig(kl_coef=0.1, adaptive=True, seed=seed)))
    for seed in range(2):
        runs += [("grpo", RunConfig(variant="grpo", kl_coef=k, seed=seed)) for k in KL_COEFS]
        # the guide's rules of thumb: a wider model, a 4x stronger reward (the middle of the range)
        for k in (0.003, 0.01, 0.03, 0.1, 0.3):
            runs.append(("width", RunConfig(kl_coef=k, width=128, seed=seed)))
            runs.append(("reward", RunConfig(kl_coef=k, reward_scale=4.0, seed=seed)))
    return runs


FIELDS = ("group", "variant", "adaptive", "seed", "width", "reward_scale", "kl_coef_start", "step", "proxy", "quality",
          "kl_token", "kl_seq", "kl_coef", "length", "advice")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kl-lab", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 values of k_kl (0, 0.1, 10), one seed, 50 steps: about 40 s on one core")
    parser.add_argument("--out", default="kl-lab-results", help="folder for steps.csv, the plots and report.md")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="reference model's training steps")
    parser.add_argument("--backend", default=None, help="kl_kernels backend (automatic when not given: cpu when built)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (matplotlib not needed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the model's ops are too small to share, and on a busy machine "
                             "every op of a 2-thread run waits for a descheduled thread (docs/kl-lab.md)")
    parser.add_argument("--from", dest="from_csv", metavar="CSV",
                        help="no runs: the report and plots of a previous steps.csv")
    args = parser.parse_args(argv)
    if not args.no_plots:
        # matplotlib stays optional (the library never needs it), so say so now, not after the runs
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("the plots need matplotlib (pip install matplotlib, or kl_kernels[bench]); "
                         "or pass --no-plots for the CSV and the report alone")
    os.makedirs(args.out, exist_ok=True)
    if args.from_csv:
        return _write_report(read_steps(args.from_csv), args, quick=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _experiment(args)
    finally:
        torch.set_num_threads(threads)


def _experiment(args):
    """Every run of the plan, steps.csv after each, then the report."""
    chain = Chain()
    started = time.perf_counter()
    references = {}
    rows = []
    for group, config in plan(args.quick):
        if config.width not in references:
            references[config.width] = pretrain(chain, config.width, seed=1, steps=args.pretrain_steps)
        for figures in run(config, references[config.width], chain, backend=args.backend):
            rows.append(dict(group=group, variant=config.variant, adaptive=config.adaptive, seed=config.seed,
                             width=config.width, reward_scale=config.reward_scale, kl_coef_start=config.kl_coef,
                             **figures))
        last = rows[-1]
        print(f"{group:<6} {config.variant:<4} k={config.kl_coef:<6g}{' adaptive' if config.adaptive else '':<9} "
              f"seed {config.seed} width {config.width} scale {config.reward_scale:g}: proxy {last['proxy']:.3f} "
              f"quality {last['quality']:.3f} KL/token {last['kl_token']:.4f} KL/seq {last['kl_seq']:.2f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        write_steps(rows, os.path.join(args.out, "steps.csv"))  # every run's steps kept as soon as they exist
    _write_report(rows, args, quick=args.quick)
    print(f"# {len(rows)} steps in {time.perf_counter() - started:.0f} s; written to {args.out}/")
    return 0


def write_steps(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({name: round(value, 5) if isinstance(value, float) else value for name, value in row.items()}
                         for row in rows)


def read_steps(path):
    """The rows of a steps.csv, typed as run() yields them."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for name in ("kl_coef_start", "proxy", "quality", "kl_token", "kl_seq", "kl_coef", "length", "reward_scale"):
            row[name] = float(row[name])
        for name in ("seed", "width", "step"):
            row[name] = int(row[name])
        row["adaptive"] = row["adaptive"] == "True"
    return rows


def _write_report(rows, args, quick):
    from . import lab_report

    report = lab_report.report(rows, quick=quick)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    print(report)
    if not args.no_plots:
        lab_report.plots(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
