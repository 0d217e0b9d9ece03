"""The reference (`torch`) backend: the plain-PyTorch statement of each op, always available.

It is the fallback for every other backend and the oracle their tests compare with, so it holds clarity and
numerical care and nothing else: low-precision inputs are computed in fp32 and cast back, masks use -inf,
never a large finite constant, and no path depends on the device or on compilation. Speed work for a device
is a backend of its own (`torch_cpu_backend.py` for the CPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import REFERENCE, register, register_backend

register_backend(REFERENCE, "plain PyTorch; the fallback and the oracle", lambda: None)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """fp16 and bf16 tensors in fp32; fp32 and fp64 ones as they are (fp64 keeps its precision)."""
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in tensors]


@register("layer_norm", REFERENCE)
def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    h = x if residual is None else x + residual
    hf, wf, bf = _fp32(h, weight, bias)
    y = F.layer_norm(hf, (hf.shape[-1],), wf, bf, eps).to(x.dtype)
    return y if residual is None else (y, h)


@register("causal_attention", REFERENCE)
def causal_attention(q, k, v):
    if q.dtype in _LOW_PRECISION:
        return causal_attention(*_fp32(q, k, v)).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def decode_mask(lengths: torch.Tensor, n_queries: int, cache_len: int) -> torch.Tensor:
    """[B, 1, Tq, S] bool: the i-th of the Tq newest tokens (at position lengths - Tq + i) sees keys <= its position."""
    query_pos = lengths[:, None] - n_queries + torch.arange(n_queries, device=lengths.device)
    key_pos = torch.arange(cache_len, device=lengths.device)
    return (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]


def append_kv(k_cache, v_cache, lengths, k_new, v_new) -> None:
    """Write k_new, v_new [B, H, Tq, D] into the caches at positions lengths - Tq .. lengths - 1 (no host sync)."""
    B, H, Tq, D = k_new.shape
    positions = lengths[:, None].long() - Tq + torch.arange(Tq, device=lengths.device)
    index = positions[:, None, :, None].expand(B, H, Tq, D)
    k_cache.scatter_(2, index, k_new)
    v_cache.scatter_(2, index, v_new)


@register("decode_attention", REFERENCE)
def decode_attention(q, k_cache, v_cache, lengths, k_new=None, v_new=None):
    """Every query against the whole cache, masked to its sequence's length and its own position."""
    if k_new is not None:
        append_kv(k_cache, v_cache, lengths, k_new, v_new)
    if q.dtype in _LOW_PRECISION:
        return decode_attention(*_fp32(q, k_cache, v_cache), lengths).to(q.dtype)
    # Entries past a sequence's length may hold anything, NaN included, and a masked score still multiplies
    # its value (0 * NaN = NaN): they are zeroed.
    S = k_cache.shape[2]
    valid = (torch.arange(S, device=q.device) < lengths[:, None])[:, None, :, None]
    k, v = torch.where(valid, k_cache, 0.0), torch.where(valid, v_cache, 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=decode_mask(lengths, q.shape[2], S))


@register("bias_gelu", REFERENCE)
def bias_gelu(x, bias):
    if x.dtype in _LOW_PRECISION:
        return bias_gelu(*_fp32(x, bias)).to(x.dtype)
    return F.gelu(x + bias, approximate="tanh")


@register("gelu_mlp", REFERENCE)
def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj):
    return linear(F.gelu(linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)


@register("linear", REFERENCE)
def linear(x, weight, bias=None):
    return x @ weight if bias is None else torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(
        *x.shape[:-1], weight.shape[1])


@register("lm_head", REFERENCE)
def lm_head(x, weight):
    return F.linear(x, weight)


QUANTIZED_WEIGHT_DTYPES = (torch.int8, torch.bfloat16)


@register("quantized_linear", REFERENCE)
def quantized_linear(x, weight, scale=None, bias=None):
    """Dequantize, then matmul, in fp32 (fp64 for fp64 x): x @ (weight * scale[:, None]).T + bias."""
    compute = torch.promote_types(x.dtype, torch.float32)
    w = weight.to(compute) if scale is None else weight.to(compute) * scale.to(compute)[:, None]
    y = F.linear(x.to(compute), w, None if bias is None else bias.to(compute))
    return y.to(x.dtype)


# ---- sampling: HF's logits warpers (temperature, then top-k, then top-p), then one draw ----


def _resolve_posinf(logits: torch.Tensor) -> torch.Tensor:
    """Rows holding +inf put all their mass, evenly, on the +inf entries (the limit of softmax)."""
    posinf = logits == math.inf
    has_posinf = posinf.any(dim=-1, keepdim=True)
    inside = torch.where(posinf, 0.0, -math.inf)
    return torch.where(has_posinf, inside, logits)


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep every score >= the k-th largest (ties at the k-th value are all kept, as HF does)."""
    k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop the least likely tokens whose cumulative probability stays <= 1 - top_p; keep at least one.

    A stable ascending sort makes ties deterministic: among equal scores the lower id is dropped first.
    """
    sorted_scores, order = torch.sort(scores, dim=-1, stable=True)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def filtered_logits(logits, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """fp32 scores whose softmax is exactly the distribution `sample` draws from (temperature > 0)."""
    scores = _resolve_posinf(logits.float()) / temperature
    if top_k:
        scores = top_k_filter(scores, top_k)
    if top_p is not None and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    return scores


@register("sample", REFERENCE)
def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    logits = _resolve_posinf(logits.float())
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Softmax ignores a shift per row; shifting the max to 0 first means no temperature, however small,
    # can overflow the division to +inf.
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = filtered_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    # argmax of p / E with E ~ Exp(1) draws i with probability p_i: what torch.multinomial does for one
    # sample (the same ids from the same generator), without the host sync its input checks cost on CUDA,
    # so that a CUDA graph can capture it.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


# ---- linear_cross_entropy: the LM head and its loss, a chunk of rows at a time ----

# A chunk's logits hold at most max(x.numel(), MIN_CHUNK_LOGITS) elements: no more than x itself (Liger-Kernel's
# bound), yet never so few that a small batch is split, or that a GPU reads the whole weight for a handful of rows.
MIN_CHUNK_LOGITS = 2**24  # 64 MiB in fp32


def cross_entropy_chunk_rows(rows: int, width: int, vocab: int) -> int:
    """Rows per chunk of linear_cross_entropy (the triton launcher's too, as is cross_entropy_scale)."""
    return max(1, min(rows, max(rows * width, MIN_CHUNK_LOGITS) // vocab))


def cross_entropy_scale(valid: torch.Tensor, mean: bool, dtype: torch.dtype) -> torch.Tensor:
    """The loss's factor over the sum of the rows' losses: 1 / (number of valid targets), 1 when there are none
    (the mean over no target is 0), or 1 for a sum; a tensor, so that nothing waits for the device."""
    if not mean:
        return torch.ones((), dtype=dtype, device=valid.device)
    return 1 / valid.sum().clamp(min=1).to(dtype)


def chunked_linear_cross_entropy(x, weight, targets, ignore_index, mean, grad_x, grad_weight):
    """(loss, d loss / d x or None, d loss / d weight or None), a chunk of rows at a time, in fp32 for low
    precision inputs (fp64 for fp64 ones). Liger-Kernel's trick: each chunk's logits become their gradient,
    softmax - onehot, while the chunk is at hand, so the [N, V] logits never exist and no backward recomputes them."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    w = weight.to(compute)
    valid = t != ignore_index
    scale = cross_entropy_scale(valid, mean, compute)
    total = torch.zeros((), dtype=compute, device=x.device)
    dx = torch.empty(x2.shape, dtype=compute, device=x.device) if grad_x else None
    dw = torch.zeros_like(w) if grad_weight else None
    step = cross_entropy_chunk_rows(*x2.shape, w.shape[0])
    for start in range(0, x2.shape[0], step):
        rows = slice(start, start + step)
        xc, keep = x2[rows].to(compute), valid[rows]
        tc = torch.where(keep, t[rows], 0)  # any id in range: ignored rows' terms are zeroed below
        logp = (xc @ w.T).log_softmax(-1)
        total -= torch.where(keep, logp.gather(1, tc[:, None]).squeeze(1), 0).sum()
        if dx is None and dw is None:
            continue
        g = logp.exp_()
        g[torch.arange(len(tc), device=x.device), tc] -= 1
        g.mul_((keep * scale)[:, None])
        if dx is not None:
            torch.mm(g, w, out=dx[rows])
        if dw is not None:
            dw.addmm_(g.T, xc)
    return (total * scale, None if dx is None else dx.to(x.dtype).view(x.shape),
            None if dw is None else dw.to(weight.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients come out of the forward; the backward scales them by the loss's own gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, mean, grad_x, grad_weight):
        loss, dx, dw = chunked_linear_cross_entropy(x, weight, targets, ignore_index, mean, grad_x, grad_weight)
        ctx.save_for_backward(dx, dw)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad_loss, None if dw is None else dw * grad_loss,
                None, None, None, None, None)


@register("linear_cross_entropy", REFERENCE)
def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean"):
    # Read here: inside forward grad mode is always off, and ctx.needs_input_grad ignores torch.no_grad().
    grads = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction == "mean",
                                     grads and x.requires_grad, grads and weight.requires_grad)
