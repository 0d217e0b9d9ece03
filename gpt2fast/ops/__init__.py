"""The only door to a hot path: one function per op, one signature for every backend.

Each function checks its inputs (shapes, dtypes, devices, parameter ranges) once, here, so that no
backend ever sees an input it would silently get wrong, then runs the implementation the registry
picks (see `registry.py`).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from . import reference  # noqa: F401  (registers the reference backend)
from . import torch_cpu_backend  # noqa: F401  (registers the torch_cpu backend)
from . import triton_backend  # noqa: F401  (registers the triton backend; imports triton only when probed)
from . import native_backend  # noqa: F401  (registers the native backend; loads gpt2fast._C only when probed)
from .registry import (
    OPS,
    backends,
    get_backend,
    register,
    register_backend,
    resolve,
    select_from_environment,
    set_backend,
    use_backend,
)

select_from_environment()  # GPT2FAST_BACKEND, now that the built-in backends are registered

__all__ = [
    "OPS", "backends", "get_backend", "register", "register_backend", "set_backend", "use_backend",
    "layer_norm", "causal_attention", "decode_attention", "gelu_mlp", "bias_gelu", "sample", "linear",
    "lm_head", "quantized_linear", "linear_cross_entropy", "check_token_ids",
]


def _same_device_and_dtype(op: str, **tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    device, dtype = first.device, first.dtype
    for name, t in rest:
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {device}")
        if t.dtype != dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but {first_name} is {dtype}")
    if not first.is_floating_point():
        raise TypeError(f"{op}: expected floating-point tensors, got {dtype}")


def _shape(op: str, name: str, t: torch.Tensor, expected: tuple) -> None:
    if t.shape != expected:  # torch.Size is a tuple
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def _dispatch(op: str, like: torch.Tensor, *args, **kwargs):
    """Run `op` on the implementation the registry picks for these arguments, on the device of `like`."""
    return resolve(op, "cpu" if like.is_cpu else like.device.type, args, kwargs)(*args, **kwargs)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               residual: torch.Tensor | None = None):
    """LayerNorm over the last dim. With `residual`: h = x + residual, returns (LN(h), h)."""
    if residual is None:
        _same_device_and_dtype("layer_norm", x=x, weight=weight, bias=bias)
    else:
        _same_device_and_dtype("layer_norm", x=x, weight=weight, bias=bias, residual=residual)
    _shape("layer_norm", "weight", weight, (x.shape[-1],))
    _shape("layer_norm", "bias", bias, (x.shape[-1],))
    if residual is not None:
        _shape("layer_norm", "residual", residual, x.shape)
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")
    return _dispatch("layer_norm", x, x, weight, bias, eps, residual)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Prefill attention: q, k, v [B, H, T, D]; causal; scale 1/sqrt(D). Returns [B, H, T, D]."""
    _same_device_and_dtype("causal_attention", q=q, k=k, v=v)
    if q.dim() != 4:
        raise ValueError(f"causal_attention: q must be [B, H, T, D], got shape {tuple(q.shape)}")
    _shape("causal_attention", "k", k, q.shape)
    _shape("causal_attention", "v", v, q.shape)
    return _dispatch("causal_attention", q, q, k, v)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None, *,
                     lengths_checked: bool = False) -> torch.Tensor:
    """The Tq newest tokens of each sequence against its KV cache.

    q [B, H, Tq, D]; k_cache, v_cache [B, H, S, D]; lengths [B] integer: valid cache entries per sequence,
    the new tokens included, so the i-th query sits at position lengths - Tq + i and sees keys 0 .. that
    position. Returns [B, H, Tq, D].

    Without k_new and v_new the caches already hold the new tokens' keys and values. With them
    ([B, H, Tq, D] each), the call appends them: it writes them into the caches, in place, at positions
    lengths - Tq .. lengths - 1, and attends as if they had been there (a backend may fuse the write into
    the attention kernel, so that a decode step spends no launch on it).

    lengths_checked=True skips the check that every length is in [Tq, S], for a caller that keeps its
    lengths valid by construction: off the CPU the check is a few kernel launches, and a model would
    otherwise pay them in every layer of every decode step.
    """
    if (k_new is None) != (v_new is None):
        raise ValueError("decode_attention: pass both k_new and v_new, or neither")
    new = {} if k_new is None else dict(k_new=k_new, v_new=v_new)
    _same_device_and_dtype("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache, **new)
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"decode_attention: q and caches must be 4-D, got {tuple(q.shape)}, {tuple(k_cache.shape)}")
    B, H, Tq, D = q.shape
    S = k_cache.shape[2]
    _shape("decode_attention", "k_cache", k_cache, (B, H, S, D))
    _shape("decode_attention", "v_cache", v_cache, (B, H, S, D))
    _shape("decode_attention", "lengths", lengths, (B,))
    for name, t in new.items():
        _shape("decode_attention", name, t, q.shape)
    if lengths.dtype not in (torch.int32, torch.int64) or lengths.device != q.device:
        raise ValueError(f"decode_attention: lengths must be int32/int64 on {q.device}, "
                         f"got {lengths.dtype} on {lengths.device}")
    if Tq > S:
        raise ValueError(f"decode_attention: {Tq} queries do not fit a cache of {S} positions")
    if not lengths_checked:
        _check_lengths(lengths, Tq, S)
    return _dispatch("decode_attention", q, q, k_cache, v_cache, lengths, k_new, v_new)


def _require(ok: torch.Tensor, message: str) -> None:
    """ValueError(message) unless the bool tensor ok holds; off the CPU the check runs on the device,
    asynchronously, so that the decode loop never waits for the host, and so it does in compiled code, which
    cannot branch on a tensor's value (both raise a RuntimeError with the message)."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def _check_lengths(lengths: torch.Tensor, n_queries: int, capacity: int) -> None:
    got = f", got {lengths.tolist()}" if lengths.device.type == "cpu" else ""  # read only where no sync
    _require(((lengths >= n_queries) & (lengths <= capacity)).all(),
             f"decode_attention: every length must be in [Tq, S] = [{n_queries}, {capacity}]{got}")


def _check_logit_values(logits: torch.Tensor) -> None:
    """No NaN, and in every row a logit above -inf: checked here, so that no backend draws from such a row.

    Both from the rows' maxima, one pass over the logits: a row's max is NaN where the row holds a NaN (amax
    propagates NaN), and -inf only where the whole row is."""
    row_max = logits.amax(dim=-1)
    _require(~torch.isnan(row_max).any(), "sample: logits contain NaN")
    _require((row_max > -math.inf).all(), "sample: a row of logits is all -inf, so no token can be drawn")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation, as GPT-2) of x + bias; bias [F] broadcasts over x [..., F]."""
    _same_device_and_dtype("bias_gelu", x=x, bias=bias)
    _shape("bias_gelu", "bias", bias, (x.shape[-1],))
    return _dispatch("bias_gelu", x, x, bias)


def gelu_mlp(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor, w_proj: torch.Tensor,
             b_proj: torch.Tensor) -> torch.Tensor:
    """GPT-2's MLP: gelu_tanh(x @ w_fc + b_fc) @ w_proj + b_proj, weights [in, out] (HF's Conv1D layout)."""
    _same_device_and_dtype("gelu_mlp", x=x, w_fc=w_fc, b_fc=b_fc, w_proj=w_proj, b_proj=b_proj)
    C = x.shape[-1]
    F = w_fc.shape[-1]
    _shape("gelu_mlp", "w_fc", w_fc, (C, F))
    _shape("gelu_mlp", "b_fc", b_fc, (F,))
    _shape("gelu_mlp", "w_proj", w_proj, (F, C))
    _shape("gelu_mlp", "b_proj", b_proj, (C,))
    return _dispatch("gelu_mlp", x, x, w_fc, b_fc, w_proj, b_proj)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight (+ bias): x [..., in], weight [in, out] (HF's Conv1D layout), bias [out]."""
    _same_device_and_dtype("linear", x=x, weight=weight, **({} if bias is None else dict(bias=bias)))
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"linear: x must be [..., in] and weight [in, out], got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    _shape("linear", "weight", weight, (x.shape[-1], weight.shape[-1]))
    if bias is not None:
        _shape("linear", "bias", bias, (weight.shape[-1],))
    return _dispatch("linear", x, x, weight, bias)


def lm_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The logits x @ weight.T: x [..., C], weight [V, C] (the token embedding the head is tied to)."""
    _same_device_and_dtype("lm_head", x=x, weight=weight)
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"lm_head: x must be [..., C] and weight [V, C], got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    _shape("lm_head", "weight", weight, (weight.shape[0], x.shape[-1]))
    return _dispatch("lm_head", x, x, weight)


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T + bias with weights stored in low precision, computed in fp32.

    weight [out, in]: int8 (symmetric, one fp32 scale per output channel, `scale` [out] required) or bfloat16
    (`scale` optional). x [..., in] floating point, bias [out] in x's dtype or None. Activations and
    accumulation stay in fp32 (fp64 for fp64 x); the result is [..., out] in x's dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"quantized_linear: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if weight.dtype not in reference.QUANTIZED_WEIGHT_DTYPES:
        raise TypeError(f"quantized_linear: weight must be int8 or bfloat16, got {weight.dtype}")
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"quantized_linear: x must be [..., in] and weight [out, in], got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    _shape("quantized_linear", "weight", weight, (weight.shape[0], x.shape[-1]))
    if weight.dtype == torch.int8 and scale is None:
        raise ValueError("quantized_linear: int8 weights need their scale [out]")
    device = x.device
    for name, t in (("weight", weight), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"quantized_linear: {name} is on {t.device} but x is on {device}")
    if scale is not None:
        if scale.dtype != torch.float32:
            raise TypeError(f"quantized_linear: scale must be float32, got {scale.dtype}")
        _shape("quantized_linear", "scale", scale, (weight.shape[0],))
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(f"quantized_linear: bias is {bias.dtype} but x is {x.dtype}")
        _shape("quantized_linear", "bias", bias, (weight.shape[0],))
    return _dispatch("quantized_linear", x, x, weight, scale, bias)


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError naming the first id outside [0, vocab_size). It reads the values, so it waits for the device:
    eager code only (compiled code skips it; the embedding still bounds-checks there)."""
    if torch.compiler.is_compiling() or not ids.numel():
        return
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def as_number(value, integral: bool) -> int | float | None:
    """value as a Python int (integral) or float, or None where it is not one. Python and numpy numbers and
    0-d tensors are taken; a bool, which Python counts as an int, is a mistake in a numeric parameter."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and \
            not value.is_complex() and not (integral and value.is_floating_point()):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral if integral else numbers.Real):
        return None
    return int(value) if integral else float(value)


def sampling_params(temperature, top_k, top_p) -> tuple[float, int | None, float | None]:
    """The sampling parameters, checked, as Python numbers (numpy scalars and 0-d tensors are taken)."""
    t = as_number(temperature, integral=False)
    if t is None or not 0 <= t < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if np.float32(t) == 0:
        t = 0.0  # below fp32's range the scores' 0 / 0 would be NaN; sampling's limit as t -> 0 is greedy
    k = None if top_k is None else as_number(top_k, integral=True)
    if top_k is not None and (k is None or k < 0):
        raise ValueError(f"top_k must be an int >= 0 (0 or None: no top-k), got {top_k!r}")
    p = None if top_p is None else as_number(top_p, integral=False)
    if top_p is not None and (p is None or not 0 < p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 or None: no top-p), got {top_p!r}")
    return t, k, p


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row of logits [B, V] -> [B] int64.

    HF's warpers in HF's order: logits / temperature, then top-k (ties at the k-th value kept), then
    top-p (keeping at least one token). temperature 0 is greedy (argmax, lowest id on ties). A row
    with +inf logits draws evenly among its +inf entries.
    """
    temperature, top_k, top_p = sampling_params(temperature, top_k, top_p)
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ValueError(f"sample: logits must be [B, V] with V >= 1, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"sample: logits must be floating point, got {logits.dtype}")
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"sample: generator is on {generator.device} but logits are on {logits.device}")
    _check_logit_values(logits)
    return _dispatch("sample", logits, logits, temperature, top_k, top_p, generator)


REDUCTIONS = ("mean", "sum")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits x @ weight.T against targets, with no [N, V] logits held at once.

    x [..., C]; weight [V, C] (nn.Linear's layout, as GPT-2's tied wte); targets x.shape[:-1], int64, each in
    [0, V) or equal to ignore_index. Returns the mean ("mean") or the sum ("sum") of the losses of the rows
    whose target is not ignore_index: a 0-dim tensor, fp32 (fp64 for fp64 inputs), differentiable in x and
    weight. The mean over no valid target is 0, with zero gradients, where F.cross_entropy gives NaN: a batch
    that is all padding then leaves the weights as they are rather than turning them to NaN.
    """
    _same_device_and_dtype("linear_cross_entropy", x=x, weight=weight)
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"linear_cross_entropy: x must be [..., C] and weight [V, C] with V >= 1, got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    _shape("linear_cross_entropy", "weight", weight, (weight.shape[0], x.shape[-1]))
    _shape("linear_cross_entropy", "targets", targets, x.shape[:-1])
    if targets.dtype != torch.int64 or targets.device != x.device:
        raise ValueError(f"linear_cross_entropy: targets must be int64 on {x.device}, "
                         f"got {targets.dtype} on {targets.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"linear_cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    V = weight.shape[0]
    _require((((targets >= 0) & (targets < V)) | (targets == ignore_index)).all(),
             f"linear_cross_entropy: every target must be in [0, {V}) or equal ignore_index ({ignore_index})")
    return _dispatch("linear_cross_entropy", x, x, weight, targets, ignore_index, reduction)
