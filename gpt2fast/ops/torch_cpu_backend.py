"""The `torch_cpu` backend: PyTorch arranged for the CPU's speed, in eager code. Always available.

Each implementation computes what the reference states, and takes only the inputs where the arrangement
pays, measured in benchmarks/results/: CPU tensors, eager code (torch.compile picks its own kernels), and for
the matmuls the rows of a decode step: SPLIT_K_MIN_ROWS to SPLIT_K_MAX_ROWS rows split the inner dimension
across the threads, and from ONEDNN_MIN_ROWS to ONEDNN_MAX_ROWS rows (batched decoding; the LM head from one
row) oneDNN multiplies by a copy of the weight packed for it, kept for inference. Anything else it refuses,
by reason, and the reference runs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from . import reference
from .registry import register, register_backend

NAME = "torch_cpu"
register_backend(NAME, "PyTorch arranged for CPU speed: split-K matmuls for a few rows, oneDNN on packed weights "
                       "for batched decoding and the LM head, per-sequence decode attention", lambda: None)

# The rows the matmuls here take: 1.3-1.5x the reference at 4 and 8 rows on a 2-core Xeon; at one row BLAS's
# own matrix-vector product measured as fast (0.8-1.2x across runs), and past 8 its matrix product is.
SPLIT_K_MIN_ROWS, SPLIT_K_MAX_ROWS = 2, 8
# Batched decoding (16 to 64 sequences a step): oneDNN on a packed weight, 1.3-1.5x the reference at 16 rows and
# 1.1-1.2x at 64 on the 2-core Xeon (GPT-2's linear, MLP and LM head shapes); at 256 rows, 0.94x: MKL alone.
ONEDNN_MIN_ROWS, ONEDNN_MAX_ROWS = SPLIT_K_MAX_ROWS + 1, 64
ONEDNN_ROWS_HINT = 16  # the rows the packed layout is chosen for


def _eager_cpu(t: torch.Tensor) -> Optional[str]:
    if t.device.type != "cpu":
        return f"tensors on {t.device} (this backend runs CPU tensors)"
    if torch.compiler.is_compiling():
        return "compiled code (torch.compile picks its own kernels)"
    return None


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _inference_copy_reason(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why a copy of `weight` made once and kept (packed for oneDNN) may not stand for it here, or None."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "inputs that require grad (a weight's kept copy is for inference; training uses the weight itself)"
    if weight.is_inference():
        return "a weight made in inference mode (no version counter tells when it changes)"
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return f"a weight of type {type(weight).__name__} (a tensor subclass computes its own way)"
    return None


def _onednn_reason(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    if x.dtype != torch.float32:
        return f"{x.dtype} inputs (the packed path is measured for float32)"
    if not torch.backends.mkldnn.is_available():
        return "a torch built without oneDNN"
    return _inference_copy_reason(x, weight)


def _matmul_reason(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why neither arrangement takes x @ weight, or None."""
    reason = _eager_cpu(x)  # first: compiled code is refused before any question torch.compile cannot trace
    if reason:
        return reason
    rows = _rows(x)
    if SPLIT_K_MIN_ROWS <= rows <= SPLIT_K_MAX_ROWS:
        return None
    if ONEDNN_MIN_ROWS <= rows <= ONEDNN_MAX_ROWS:
        return _onednn_reason(x, weight)
    return (f"{rows} rows (this pays for {SPLIT_K_MIN_ROWS} to {SPLIT_K_MAX_ROWS}, and for {ONEDNN_MIN_ROWS} to "
            f"{ONEDNN_MAX_ROWS} in inference; BLAS alone is as fast otherwise)")


# ---- copies of a weight kept for inference, packed for oneDNN ----

# weight -> {kind: (weak reference to its storage, key, copy)}, dropped with the weight. One weight may serve as
# a linear's [in, out] and as an LM head's [out, in] (a square one): each kind is its own copy.
_COPIES = WeakIdKeyDictionary()


def _drop_copies(optimizer, args, kwargs) -> None:
    """After any optimizer step: a fused optimizer writes the weights without bumping their version counters."""
    _COPIES.clear()


register_optimizer_step_post_hook(_drop_copies)


def _kept_copy(weight: torch.Tensor, kind: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """make(weight), made once and remade whenever the weight may have changed: new storage (a move or cast;
    the storage is held weakly, so that its address cannot be reused while the copy lives) or an in-place
    write (its version counter); optimizer steps drop every copy (above)."""
    storage = weight.untyped_storage()
    key = (storage._cdata, weight.storage_offset(), weight.shape, weight.stride(), weight.dtype, weight._version)
    copies = _COPIES.setdefault(weight, {})
    held = copies.get(kind)
    if held is None or held[1] != key:  # a freed storage cannot match: the weak reference pins its address
        held = (StorageWeakRef(storage), key, make(weight.detach()))
        copies[kind] = held
    return held[2]


def _packed(weight_out_in: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight_out_in.contiguous(), ONEDNN_ROWS_HINT)


def _onednn_linear(x, packed, bias, gelu: bool = False):
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "gelu" if gelu else "none", [],
                                           "tanh" if gelu else "")
    return y.view(*x.shape[:-1], packed.shape[0])


# ---- linear and gelu_mlp ----


def _split_k_parts(rows: torch.Tensor, weight: torch.Tensor) -> int:
    """Slices of the inner dimension, one per thread, or 0 for one row or where they do not divide it evenly."""
    n = torch.get_num_threads()
    ok = rows.shape[0] >= SPLIT_K_MIN_ROWS and n > 1 and weight.shape[0] % n == 0 and weight.is_contiguous()
    return n if ok else 0


def _split_k(x, weight, bias=None):
    """For a few rows, BLAS streams the weight from one core (about 20 GB/s measured on a 2-core EPYC).
    Splitting the inner dimension into one slice per thread and summing the partial products (one bmm)
    streams it from all of them: a GPT-2 decode step went from 29 to 22 ms."""
    rows = x.reshape(-1, x.shape[-1])
    n = _split_k_parts(rows, weight)
    if n == 0:
        return reference.linear(x, weight, bias)
    K, N = weight.shape
    y = torch.bmm(rows.view(-1, n, K // n).transpose(0, 1), weight.view(n, K // n, N)).sum(0)
    y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], N)


def _packed_conv1d(weight: torch.Tensor) -> torch.Tensor:
    return _kept_copy(weight, "packed transposed", lambda w: _packed(w.t()))  # [in, out] -> packed [out, in]


@register("linear", NAME, supports=lambda x, weight, bias=None: _matmul_reason(x, weight))
def linear(x, weight, bias=None):
    if _rows(x) <= SPLIT_K_MAX_ROWS:
        return _split_k(x, weight, bias)
    return _onednn_linear(x, _packed_conv1d(weight), bias)


@register("gelu_mlp", NAME, supports=lambda x, w_fc, *weights: _matmul_reason(x, w_fc))
def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj):
    if _rows(x) <= SPLIT_K_MAX_ROWS:
        return _split_k(F.gelu(_split_k(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)
    h = _onednn_linear(x, _packed_conv1d(w_fc), b_fc, gelu=True)  # the GELU fused into oneDNN's matmul
    return _onednn_linear(h, _packed_conv1d(w_proj), b_proj)


# ---- lm_head: the logits of a decode step's rows, by oneDNN on wte packed ----


def _lm_head_supports(x, weight) -> Optional[str]:
    reason = _eager_cpu(x)  # first: compiled code is refused before any question torch.compile cannot trace
    if reason:
        return reason
    if not 1 <= _rows(x) <= ONEDNN_MAX_ROWS:
        return f"{_rows(x)} rows (this pays for 1 to {ONEDNN_MAX_ROWS}, a decode step's; BLAS alone is as fast otherwise)"
    return _onednn_reason(x, weight)


@register("lm_head", NAME, supports=_lm_head_supports)
def lm_head(x, weight):
    """oneDNN on a packed copy of wte, made once: 1.8-1.9x F.linear at 4 and 8 rows on the 2-core Xeon, 1.3-1.5x
    at 16, as fast at one row (where the transposed copy this replaced was no faster either)."""
    return _onednn_linear(x, _kept_copy(weight, "packed", _packed), None)


# ---- decode_attention: each sequence attends to its own prefix ----


def _decode_attention_supports(q, *args) -> Optional[str]:
    return _eager_cpu(q)


@register("decode_attention", NAME, supports=_decode_attention_supports)
def decode_attention(q, k_cache, v_cache, lengths, k_new=None, v_new=None):
    """The lengths are at hand on the CPU: each sequence attends to its own prefix and never touches the
    rest of the cache (10x faster than masking the whole cache, measured at B=4, cache 512); sequences of one
    length, all at once (a loop over 64 of them took a fifth of a decode step of gpt2 at batch 64)."""
    sizes = lengths.tolist()
    one_length = len(set(sizes)) == 1  # the sequences of a batch decoded together keep one length
    if k_new is not None:
        if one_length:  # the same positions in every sequence: a slice copy, no index tensor and scatter
            end, start = sizes[0], sizes[0] - k_new.shape[2]
            k_cache[:, :, start:end], v_cache[:, :, start:end] = k_new, v_new
        else:
            reference.append_kv(k_cache, v_cache, lengths, k_new, v_new)
    if q.dtype in reference._LOW_PRECISION:
        return decode_attention(*reference._fp32(q, k_cache, v_cache), lengths).to(q.dtype)
    if one_length:  # one call for all
        return _attend_prefix(q, k_cache, v_cache, sizes[0])
    return torch.cat([_attend_prefix(q[b:b + 1], k_cache[b:b + 1], v_cache[b:b + 1], n)
                      for b, n in enumerate(sizes)])


def _attend_prefix(q, k_cache, v_cache, length: int):
    """The Tq newest queries of sequences of one length against their first `length` keys (causal among the
    new ones)."""
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    if q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v)
    mask = reference.decode_mask(torch.tensor([length], device=q.device), q.shape[2], length)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
