"""kl-lab's report: each claim of the KL guide held or not held on the lab's runs, with the numbers,
and the plots (lab.py makes the runs)."""
from __future__ import annotations

import math
import os
import statistics


TAIL = 10  # a run's final figures: the mean of its last TAIL steps
HACKED = 0.3  # nats/token of true quality lost: the text has degraded
KEPT = 0.1  # nats/token lost at most: language ability kept


def _final(steps, name):
    return statistics.fmean(s[name] for s in steps[-TAIL:])


def _runs(rows):
    """(group, variant, adaptive, width, reward_scale, k at start, seed) -> that run's steps, in order."""
    runs = {}
    for row in rows:
        key = (row["group"], row["variant"], row["adaptive"], row["width"], row["reward_scale"], row["kl_coef_start"],
               row["seed"])
        runs.setdefault(key, []).append(row)
    return runs


def summarise(rows, group="sweep", variant="ppo", width=64, scale=1.0, adaptive=False):
    """k at start -> final figures averaged over seeds, plus 'reference' (every run's step 0)."""
    table, start = {}, []
    for (g, v, a, w, s, k, _), steps in _runs(rows).items():
        if (g, v, a, w, s) != (group, variant, adaptive, width, scale):
            continue
        start.append(steps[0])
        table.setdefault(k, []).append({name: _final(steps, name) for name in ("proxy", "quality", "kl_token",
                                                                               "kl_seq", "kl_coef")}
                                       | {"advice": steps[-1]["advice"]})
    out = {k: {name: statistics.fmean(r[name] for r in runs) for name in runs[0] if name != "advice"}
           | {"advice": [r["advice"] for r in runs], "seeds": len(runs)} for k, runs in sorted(table.items())}
    if start:
        out["reference"] = {name: statistics.fmean(s[name] for s in start) for name in ("proxy", "quality")}
    return out


def _sweet_k(summary):
    """The smallest k whose run kept the language (quality within KEPT of the reference)."""
    ref = summary["reference"]["quality"]
    kept = [k for k in summary if k != "reference" and ref - summary[k]["quality"] <= KEPT]
    return min(kept) if kept else math.inf  # none kept it: the k needed lies above those tried


def _falls(kl, ks):
    """Non-increasing in k up to noise: where the brake holds the policy near the reference, KL sits
    at the floor of optimiser drift (~0.01-0.02 nats/token here) and neighbours differ by noise."""
    return all(kl[a] >= kl[b] - max(0.005, 0.2 * kl[b]) for a, b in zip(ks, ks[1:]))


def _verdict(ok):
    return "held" if ok else "not held"


def report(rows, quick=False):
    ppo = summarise(rows)
    ref = ppo["reference"]
    ks = [k for k in ppo if k != "reference"]
    lines = ["# kl-lab: the KL guide's claims on a small model", "",
             f"Reference model: proxy {ref['proxy']:.3f}, true quality {ref['quality']:.3f} nats/token. Final "
             f"figures: mean of the last {TAIL} steps, averaged over seeds; PPO with the per-token KL reward.", "",
             "| k_kl | seeds | proxy | quality | KL/token | KL/seq | final diagnose() advice |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for k in ks:
        f = ppo[k]
        lines.append(f"| {k:g} | {f['seeds']} | {f['proxy']:.3f} | {f['quality']:.3f} | {f['kl_token']:.4f} | "
                     f"{f['kl_seq']:.2f} | {', '.join(f['advice'])} |")
    lines += ["", "| claim of the guide | verdict here | numbers |", "| --- | --- | --- |"]
    claims = []
    gain = {k: ppo[k]["proxy"] - ref["proxy"] for k in ks}
    loss = {k: ref["quality"] - ppo[k]["quality"] for k in ks}
    kl = {k: ppo[k]["kl_token"] for k in ks}
    ordered = sorted(ks)
    claims.append(("KL falls as k_kl rises (the brake works), within noise", _falls(kl, ordered),
                   ", ".join(f"k={k:g}: {kl[k]:.4f}" for k in ordered)))
    low = [k for k in ks if k < 0.01]
    if low:
        hacked = all(loss[k] > HACKED and gain[k] > 0 for k in low)
        claims.append(("k_kl below 0.01: no brake, reward hacking, language degrades", hacked,
                       "; ".join(f"k={k:g}: proxy {gain[k]:+.3f}, quality {-loss[k]:+.3f}" for k in low)))
    loose = [k for k in ks if 0.01 <= k < 0.05]
    sweet = [k for k in ks if 0.05 <= k <= 0.2]
    if loose and sweet:
        ok = all(gain[k] > gain[s] for k in loose for s in sweet) and any(loss[k] > HACKED for k in loose)
        claims.append(("0.01-0.1, loose: more exploration than the sweet spot, risk of losing control", ok,
                       "; ".join(f"k={k:g}: proxy {gain[k]:+.3f}, quality {-loss[k]:+.3f}" for k in loose)))
    top_gain = max(gain.values())
    if sweet and low:
        ok = all(gain[k] > 0.1 * top_gain and loss[k] <= KEPT for k in sweet)
        claims.append(("0.05-0.2, the sweet spot: improves the reward, keeps language ability", ok,
                       "; ".join(f"k={k:g}: proxy {gain[k]:+.3f} ({gain[k] / top_gain:.0%} of the largest gain), "
                                 f"quality {-loss[k]:+.3f}" for k in sweet)))
    frozen = [k for k in ks if k > 1 - 1e-9]
    if frozen:  # no reward gained, the policy barely moved (KL below the guide's healthy ceiling)
        ok = all(gain[k] < 0.1 * top_gain and kl[k] < 0.05 for k in frozen)
        claims.append(("1-10: almost frozen, PPO is wasted", ok,
                       "; ".join(f"k={k:g}: proxy {gain[k]:+.3f}, KL/token {kl[k]:.4f}" for k in frozen)))
    for k in sweet:
        ok = 0.01 <= kl[k] <= 0.05 and 1 <= ppo[k]["kl_seq"] <= 6
        claims.append((f"healthy KL at the sweet spot (k={k:g}): 0.01-0.05 per token, 1-6 per sequence", ok,
                       f"{kl[k]:.4f} per token, {ppo[k]['kl_seq']:.2f} per sequence"))
    adaptive = summarise(rows, adaptive=True)
    for k, f in adaptive.items():
        if k != "reference":
            ok = 0.5 * 3.0 <= f["kl_seq"] <= 1.5 * 3.0
            claims.append(("adaptive control reaches the target KL (3 per sequence)", ok,
                           f"start k={k:g}, final k={f['kl_coef']:.3f}, KL/seq {f['kl_seq']:.2f}, proxy "
                           f"+{f['proxy'] - adaptive['reference']['proxy']:.3f}, quality "
                           f"-{adaptive['reference']['quality'] - f['quality']:.3f}"))
    if 0.0 in ks and top_gain > 0:
        # the guide's reading: the k at which one token's KL penalty (k x its log-ratio) costs the whole reward
        upper = gain[0.0] / max(kl[0.0], 1e-9)
        above = [k for k in ks if k >= upper]
        ok = bool(above) and all(gain[k] < 0.1 * top_gain for k in above)
        claims.append(("worked example: k ~ reward / typical log-ratio is an upper extreme", ok,
                       f"k=0 gains {gain[0.0]:.3f} at {kl[0.0]:.3f} nats/token: k_upper ~ {upper:.3g}; runs at or "
                       "above it: " + (", ".join(f"k={k:g} +{gain[k]:.3f}" for k in above) or "none")))
    for group, what, rule in (("width", "a wider model (width 128 vs 64)", "smaller"),
                              ("reward", "a 4x stronger reward", "larger")):
        other = summarise(rows, group=group, width=128 if group == "width" else 64,
                          scale=4.0 if group == "reward" else 1.0)
        if len(other) > 1 and len(ks) > 3:
            base, moved = _sweet_k(ppo), _sweet_k(other)
            ok = moved <= base if rule == "smaller" else moved >= base
            tried = max(k for k in other if k != "reference")
            claims.append((f"rule of thumb: {what} -> {rule} k_kl", ok,
                           f"smallest k keeping quality within {KEPT} nats/token: {base:g} (base) vs "
                           + (f"{moved:g}" if moved < math.inf else f"none up to {tried:g} (so larger)")))
    grpo = summarise(rows, variant="grpo", group="grpo")
    gks = sorted(k for k in grpo if k != "reference")
    if len(gks) > 2:
        ok = _falls({k: grpo[k]["kl_token"] for k in gks}, gks)
        claims.append(("GRPO (k3 KL in the loss): KL falls as k_kl rises too", ok,
                       ", ".join(f"k={k:g}: {grpo[k]['kl_token']:.4f}" for k in gks)))
    right = total = 0
    for k in ks:
        want = "raise" if loss[k] > HACKED else "lower" if gain[k] < 0.1 * top_gain and kl[k] < 0.05 else None
        if want:
            total += len(ppo[k]["advice"])
            right += sum(a == want for a in ppo[k]["advice"])
    if total:
        claims.append(("diagnose() steers right: 'raise' on hacked runs, 'lower' on frozen ones",
                       right == total, f"{right} of {total} final advices"))
    kept = [k for k in ks if gain[k] > 0.1 * top_gain and loss[k] <= KEPT]
    if kept:
        advices = [a for k in kept for a in ppo[k]["advice"]]
        claims.append(("diagnose() says 'keep' where the run improved and kept its language (the sweet spot "
                       "found here)", all(a == "keep" for a in advices),
                       f"k={', '.join(f'{k:g}' for k in kept)}: advice {', '.join(advices)}"))
    for claim, ok, numbers in claims:
        lines.append(f"| {claim} | {_verdict(ok)} | {numbers} |")
    if quick:
        lines += ["", "(--quick: three values of k_kl, one seed, 50 steps; the full sweep is `kl-lab`.)"]
    return "\n".join(lines) + "\n"


BANDS = ((0.0, 0.01, "no brake", "#f4cccc"), (0.01, 0.05, "loose", "#fff2cc"), (0.05, 0.2, "sweet spot", "#d9ead3"),
         (0.2, 1.0, "tight", "#cfe2f3"), (1.0, 10.0, "frozen", "#d9d2e9"))


def plots(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for (group, variant, adaptive, width, scale, k, _), steps in _runs(rows).items():
        if (group, variant, width, scale) == ("sweep", "ppo", 64, 1.0):
            curves.setdefault((k, adaptive), []).append(steps)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, ((k, adaptive), runs) in enumerate(sorted(curves.items())):
        label = f"adaptive (start {k:g})" if adaptive else f"k={k:g}"
        for axis, name in zip(axes, ("proxy", "quality", "kl_token")):
            n = min(len(r) for r in runs)
            mean = [statistics.fmean(r[t][name] for r in runs) for t in range(n)]
            axis.plot(range(n), mean, color=f"C{i % 10}", linestyle="--" if adaptive else "-", label=label)
    for axis, title in zip(axes, ("proxy reward (bonus-token count)", "true quality (nats/token)",
                                  "KL per token (exact)")):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("RL step")
        axis.grid(True, alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=1e-3)
    axes[2].axhspan(0.01, 0.05, color="#d9ead3", alpha=0.6, label="healthy per token")
    axes[0].legend(fontsize=7, ncol=2)
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)

    ppo = summarise(rows)
    ks = sorted(k for k in ppo if k != "reference")
    x = [max(k, 1e-3) for k in ks]  # k = 0 drawn at 1e-3 on the log axis
    fig, (ax_quality, ax_kl) = plt.subplots(1, 2, figsize=(12, 4.2))
    for axis in (ax_quality, ax_kl):
        for lo, hi, name, colour in BANDS:
            axis.axvspan(max(lo, 1e-3), hi, color=colour, alpha=0.7, label=name)
        axis.set_xscale("log")
        axis.set_xlabel("k_kl (k = 0 drawn at 0.001)")
        axis.grid(True, alpha=0.3)
    ax_quality.plot(x, [ppo[k]["quality"] for k in ks], "o-", color="black", label="final true quality")
    ax_quality.axhline(ppo["reference"]["quality"], color="grey", linestyle=":", label="reference")
    ax_quality.set_ylabel("nats/token")
    twin = ax_quality.twinx()
    twin.plot(x, [ppo[k]["proxy"] for k in ks], "s--", color="C3", label="final proxy reward")
    twin.set_ylabel("proxy reward", color="C3")
    ax_kl.plot(x, [ppo[k]["kl_token"] for k in ks], "o-", color="black", label="final KL per token")
    ax_kl.axhspan(0.01, 0.05, color="grey", alpha=0.3, label="healthy per token")
    ax_kl.set_yscale("symlog", linthresh=1e-3)
    ax_kl.set_ylabel("KL per token (nats)")
    ax_quality.legend(fontsize=7, loc="lower right")
    ax_kl.legend(fontsize=7, loc="upper right")
    fig.suptitle("kl-lab: final figures against k_kl, the guide's bands shaded", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "final.png"), dpi=100)
