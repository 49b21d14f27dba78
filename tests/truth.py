"""Float64 formulas of docs/contract.md, written plainly and independently of the package's code.

Everything here is unchunked, unfused eager PyTorch in float64 with autograd: the truth that
every backend is compared with.
"""
import torch


def per_token_temperature(temperature, labels_shape, cu_seqlens=None):
    if not isinstance(temperature, torch.Tensor):
        return torch.full(labels_shape, float(temperature), dtype=torch.float64)
    temperature = temperature.double()
    n = 1
    for size in labels_shape:
        n *= size
    if cu_seqlens is not None and temperature.dim() == 1 and temperature.numel() == len(cu_seqlens) - 1 != n:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        return torch.repeat_interleave(temperature, lengths)
    return temperature.expand(labels_shape).clone()


def row_stats(logits, labels, temperature, ignore_index=-100):
    """logp, entropy and log-softmax of every row, float64, differentiable."""
    z = logits.double() / temperature.unsqueeze(-1)
    log_p = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    logp = torch.where(valid, log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    p = log_p.exp()
    entropy = torch.where(valid, -(p * log_p).sum(-1), 0.0)
    return logp, entropy, log_p


def estimator_value(name, logp, ref_logp, log_ratio_clamp=None, kl_clamp=None, full=None):
    plus = name.endswith("+")
    base = {"kl": "k1", "mse": "k2"}.get(name.rstrip("+"), name.rstrip("+"))
    if base == "low_var_kl":
        base = "k3"
        log_ratio_clamp = 20.0 if log_ratio_clamp is None else log_ratio_clamp
        kl_clamp = 10.0 if kl_clamp is None else kl_clamp
    if base == "full":
        value = full
    else:
        r = ref_logp - logp
        if log_ratio_clamp is not None:
            r = r.clamp(-log_ratio_clamp, log_ratio_clamp)
        d = -r
        value = {"k1": lambda: d, "abs": lambda: d.abs(), "k2": lambda: d * d / 2,
                 "k3": lambda: torch.exp(-d) + d - 1}[base]()
    if kl_clamp is not None:
        value = value.clamp(-kl_clamp, kl_clamp)
    if plus:
        k2 = (logp - ref_logp) ** 2 / 2
        value = value.detach() + k2 - k2.detach()
    return value


def kl_penalty(logits, labels, *, ref_logits=None, ref_logprobs=None, mask=None, cu_seqlens=None,
               kl_coef=0.1, estimator="k1", temperature=1.0, log_ratio_clamp=None, kl_clamp=None,
               ignore_index=-100):
    """Returns a dict of the KLPenaltyOutput fields (docs/contract.md section 2) in float64."""
    temp = per_token_temperature(temperature, labels.shape, cu_seqlens)
    logp, entropy, log_p = row_stats(logits, labels, temp, ignore_index)
    valid = labels != ignore_index
    full = None
    if ref_logits is not None:
        ref_logp, _, log_q = row_stats(ref_logits.detach(), labels, temp, ignore_index)
        full = torch.where(valid, (log_p.exp() * (log_p - log_q)).sum(-1), 0.0)
    else:
        ref_logp = torch.where(valid, ref_logprobs.double(), 0.0)
    if mask is not None:
        valid = valid & (mask != 0)
    kl = torch.where(valid, estimator_value(estimator, logp, ref_logp, log_ratio_clamp, kl_clamp, full), 0.0)
    if logits.dim() == 3:
        kl_sum, counts = kl.sum(-1), valid.double().sum(-1)
    else:
        bounds = [0, labels.numel()] if cu_seqlens is None else cu_seqlens.tolist()
        kl_sum = torch.stack([kl[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]) if len(bounds) > 1 \
            else kl.new_zeros(0)
        counts = torch.tensor([float(valid[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])], dtype=torch.float64)
    kl_mean = torch.where(counts > 0, kl_sum / counts.clamp(min=1), 0.0)
    return dict(logprobs=logp, ref_logprobs=ref_logp, kl=kl, penalty=-kl_coef * kl, kl_sum=kl_sum,
                kl_mean=kl_mean, entropy=entropy)
