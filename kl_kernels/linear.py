"""Label log-probs and entropy straight from hidden states (SPEC section 9): logits are made one tile
of tokens at a time, consumed by a backend's fused row pass, and dropped; never [N, V].

Forward, per tile of rows: z = hidden_tile @ weight^T (+ bias) in the input dtype (a BLAS matmul
with float accumulation, as F.linear), the model's logit transform g (logit_scale, then Gemma's
softcap c * tanh(z / c)), then the backend's fused_kl_fwd on the tile. Backward, per tile: the same
z recomputed, the backend's fused_kl_bwd written over it in place (dlogits), g's derivative, then
grad_hidden_tile = dlogits @ weight and grad_weight += dlogits^T @ hidden_tile in float32. Tiles
come from the shapes and a memory budget only, in a fixed order: results are bitwise reproducible.

integrations.trl and integrations.verl serve the trainers' hidden-state heads (TRL's
ChunkedLogProbFunction, verl's linear_cross_entropy) with it.
"""
from __future__ import annotations

import numbers

import torch

from . import validation as check
from .dispatch import select_backend
from .ops import first_order_only
from .reference import compute_dtype

TILE_BYTES = 64 << 20  # the logits tile and its gradient: what one tile may hold at a time


def _rows_per_tile(vocab: int, element_bytes: int, tile_bytes: int) -> int:
    # the tile (input dtype), its float32 transform when g is not the identity, and the
    # backward's gradient over it: about three tile-sized buffers
    return max(1, tile_bytes // max(1, 3 * vocab * max(element_bytes, 4)))


def _logits_tile(hidden_tile, weight, bias, logit_scale, softcap):
    """g(hidden_tile @ weight^T + bias) and, with a softcap, tanh of the scaled logits (its derivative
    is 1 - tanh^2). The identity transform keeps the input dtype (no float32 copy of the tile)."""
    z = torch.nn.functional.linear(hidden_tile, weight, bias)
    if softcap is None and logit_scale == 1.0:
        return z, None
    z = z.float()
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is None:
        return z, None
    tanh = torch.tanh(z.div_(softcap))
    return tanh * softcap, tanh


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index,
                need_entropy, rows):
        n_tokens = hidden.shape[0]
        dtype = compute_dtype(hidden.dtype)
        logp = hidden.new_empty((n_tokens,), dtype=dtype)
        entropy = hidden.new_empty((n_tokens if need_entropy else 0,), dtype=dtype)
        lse = hidden.new_empty((n_tokens,), dtype=dtype)
        for n0 in range(0, n_tokens, rows):
            n1 = min(n0 + rows, n_tokens)
            z, _ = _logits_tile(hidden[n0:n1], weight, bias, logit_scale, softcap)
            tile_logp, _, tile_entropy, _, tile_lse, _ = impl.fused_kl_fwd(
                z.unsqueeze(0), labels[n0:n1], None, _rows(temperature, n0, n1), ignore_index, need_entropy, False)
            logp[n0:n1], lse[n0:n1] = tile_logp, tile_lse
            if need_entropy:
                entropy[n0:n1] = tile_entropy
        ctx.set_materialize_grads(False)
        ctx.impl, ctx.logit_scale, ctx.softcap, ctx.ignore_index, ctx.rows = impl, logit_scale, softcap, ignore_index, rows
        ctx.scalar_temperature = None if isinstance(temperature, torch.Tensor) else temperature
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy,
                              temperature if isinstance(temperature, torch.Tensor) else None)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        first_order_only()
        hidden, weight, bias, labels, lse, entropy, tensor_temperature = ctx.saved_tensors
        temperature = tensor_temperature if tensor_temperature is not None else ctx.scalar_temperature
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[1:4]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 11
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for n0 in range(0, hidden.shape[0], ctx.rows):
            n1 = min(n0 + ctx.rows, hidden.shape[0])
            hidden_tile = hidden[n0:n1]
            z, tanh = _logits_tile(hidden_tile, weight, bias, ctx.logit_scale, ctx.softcap)
            dz = ctx.impl.fused_kl_bwd(
                _rows(grad_logp, n0, n1), _rows(grad_entropy, n0, n1), None, z.unsqueeze(0), labels[n0:n1], None,
                _rows(temperature, n0, n1), ctx.ignore_index, lse[n0:n1], None,
                entropy[n0:n1] if entropy.numel() else None, None, True)
            dz = z if dz is None else dz.view(z.shape)  # the in-place op returns nothing: z holds dlogits
            if tanh is not None:
                dz = dz * (1.0 - tanh * tanh)
            if ctx.logit_scale != 1.0:
                dz = dz * ctx.logit_scale
            dz = dz.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[n0:n1] = dz @ weight
            if grad_weight is not None:
                grad_weight += (dz.t() @ hidden_tile).float()
            if grad_bias is not None:
                grad_bias += dz.float().sum(0)
        return (None, _cast(grad_hidden, hidden), _cast(grad_weight, weight), _cast(grad_bias, bias),
                None, None, None, None, None, None, None)


def _rows(value, n0, n1):
    return value[n0:n1] if isinstance(value, torch.Tensor) and value.dim() else value


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


def _check_linear(hidden, weight, bias, labels, arg_prefix=""):
    check.floating(hidden, f"{arg_prefix}hidden")
    check.floating(weight, f"{arg_prefix}weight")
    if weight.dim() != 2:
        raise ValueError(f"{arg_prefix}weight must be [V, H] (lm_head.weight), got shape {tuple(weight.shape)}")
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{arg_prefix}hidden must be [..., H] with H = {arg_prefix}weight.shape[1] = "
                         f"{weight.shape[1]}, got shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{arg_prefix}weight must have a non-empty vocabulary dim, got shape {tuple(weight.shape)}")
    if bias is not None:
        check.floating(bias, f"{arg_prefix}bias")
        check.shape(bias, (weight.shape[0],), f"{arg_prefix}bias", f"[V] = [{weight.shape[0]}]")
    check.shape(labels, hidden.shape[:-1], "labels", f"{arg_prefix}hidden's shape without the hidden dim")
    check.same_device(hidden.device, **{f"{arg_prefix}weight": weight, f"{arg_prefix}bias": bias, "labels": labels})


def _check_transform(logit_scale, softcap):
    for arg, value in (("logit_scale", logit_scale), ("softcap", softcap)):
        if value is None and arg == "softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (abs(float(value)) < float("inf")):
            raise ValueError(f"{arg} must be a finite float, got {value!r}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    return float(logit_scale), None if softcap is None else float(softcap)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                          ignore_index=-100, return_entropy=False, validate=True, process_group=None, backend=None,
                          tile_bytes=TILE_BYTES):
    """token_logprobs of z = g(hidden @ weight^T + bias) without materialising z (SPEC section 9).

    hidden [..., H] (leading dims as labels), weight [V, H], bias [V]; returns float32 [...] log-probs
    (and entropy with return_entropy). Gradients reach hidden, weight and bias in their dtypes.
    tile_bytes bounds the logits tile and its gradient (about rows x V x 12 bytes)."""
    from .api import _temperature

    check.integer(labels, "labels")
    _check_linear(hidden, weight, bias, labels)
    if process_group is not None:
        raise NotImplementedError("process_group (a tensor-parallel vocabulary) is not served by "
                                  "linear_token_logprobs yet; pass the full weight")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"weight and bias must have hidden's dtype {hidden.dtype} (as F.linear), got "
                        f"{weight.dtype}{'' if bias is None else ' / ' + str(bias.dtype)}")
    logit_scale, softcap = _check_transform(logit_scale, softcap)
    if isinstance(tile_bytes, bool) or not isinstance(tile_bytes, numbers.Integral) or tile_bytes <= 0:
        raise ValueError(f"tile_bytes must be a positive int, got {tile_bytes!r}")
    ignore_index = check.ignore_index(ignore_index)
    vocab = weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    temp = _temperature(temperature, labels.shape, hidden.device, dtype, validate)
    if validate:
        check.label_values(labels, vocab, ignore_index)
    tile_dtype = hidden.dtype if softcap is None and logit_scale == 1.0 else torch.float32
    chosen = select_backend(backend, hidden.device, (tile_dtype,))
    rows = _rows_per_tile(vocab, hidden.element_size(), tile_bytes)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logp, entropy = LinearLogprobsFunction.apply(
        chosen.impl, flat_hidden, weight, bias, labels.reshape(-1).to(torch.int64).contiguous(), temp, logit_scale,
        softcap, ignore_index, bool(return_entropy), rows)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp
