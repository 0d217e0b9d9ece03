"""The `torch_cpu` backend: PyTorch arranged for the CPU's speed, in eager code. Always available.

Each implementation computes what the reference states, and takes only the inputs where the arrangement
pays, measured in benchmarks/results/: CPU tensors, eager code (torch.compile picks its own kernels), and for
the matmuls SPLIT_K_MIN_ROWS to SPLIT_K_MAX_ROWS rows, the rows of a batched decode step. Anything else it
refuses, by reason, and the reference runs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from . import reference
from .registry import register, register_backend

NAME = "torch_cpu"
register_backend(NAME, "PyTorch arranged for CPU speed: split-K matmuls, the LM head's transposed copy, "
                       "per-sequence decode attention", lambda: None)

# The rows the matmuls here take: 1.3-1.5x the reference at 4 and 8 rows on a 2-core Xeon; at one row BLAS's
# own matrix-vector product measured as fast (0.8-1.2x across runs), and past 8 its matrix product is.
SPLIT_K_MIN_ROWS, SPLIT_K_MAX_ROWS = 2, 8


def _eager_cpu(t: torch.Tensor) -> Optional[str]:
    if t.device.type != "cpu":
        return f"tensors on {t.device} (this backend runs CPU tensors)"
    if torch.compiler.is_compiling():
        return "compiled code (torch.compile picks its own kernels)"
    return None


def _few_rows(x: torch.Tensor, least: int = SPLIT_K_MIN_ROWS) -> Optional[str]:
    rows = x.numel() // max(x.shape[-1], 1)
    if not least <= rows <= SPLIT_K_MAX_ROWS:
        return f"{rows} rows (this pays for {least} to {SPLIT_K_MAX_ROWS}; BLAS alone is as fast otherwise)"
    return _eager_cpu(x)


# ---- linear and gelu_mlp: split-K matmuls for the few rows of a decode step ----


def _split_k_parts(rows: torch.Tensor, weight: torch.Tensor) -> int:
    """Slices of the inner dimension, one per thread, or 0 for one row or where they do not divide it evenly."""
    n = torch.get_num_threads()
    ok = rows.shape[0] >= SPLIT_K_MIN_ROWS and n > 1 and weight.shape[0] % n == 0 and weight.is_contiguous()
    return n if ok else 0


@register("linear", NAME, supports=lambda x, weight, bias=None: _few_rows(x))
def linear(x, weight, bias=None):
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


@register("gelu_mlp", NAME, supports=lambda x, *weights: _few_rows(x))
def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj):
    return linear(F.gelu(linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)


# ---- lm_head: x @ W with W [C, V] streams twice as fast as x @ W^T for a few rows ----

# The transposed copy of each head weight met in inference, by the weight tensor (dropped with it).
_TRANSPOSED = WeakIdKeyDictionary()


def _drop_copies(optimizer, args, kwargs) -> None:
    """After any optimizer step: a fused optimizer writes the weights without bumping their version counters."""
    _TRANSPOSED.clear()


register_optimizer_step_post_hook(_drop_copies)


def _lm_head_supports(x, weight) -> Optional[str]:
    reason = _few_rows(x, least=1)  # first: compiled code is refused before any question torch.compile cannot trace
    if reason:
        return reason
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "inputs that require grad (the transposed copy is for inference; training uses the weight itself)"
    if weight.is_inference():
        return "a weight made in inference mode (no version counter tells when it changes)"
    return None


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """weight.T, contiguous, remade whenever the weight may have changed: new storage (a move or cast; the
    storage is held weakly, so that its address cannot be reused while the copy lives) or an in-place write
    (its version counter); optimizer steps drop every copy (above)."""
    storage = weight.untyped_storage()
    key = (storage._cdata, weight.storage_offset(), weight.shape, weight.dtype, weight._version)
    held = _TRANSPOSED.get(weight)
    if held is None or held[1] != key:  # a freed storage cannot match: the weak reference pins its address
        held = (StorageWeakRef(storage), key, weight.detach().t().contiguous())
        _TRANSPOSED[weight] = held
    return held[2]


@register("lm_head", NAME, supports=_lm_head_supports)
def lm_head(x, weight):
    """x @ W with W [C, V] streams faster than x @ W^T for a few rows (one row: 3.8 against 5.8 ms a decode
    step of gpt2 on the 2-core Xeon, profiled in the model), and from two rows splits K as linear does: the
    copy, made once, pays from the first few tokens on."""
    return linear(x, _transposed(weight))


# ---- decode_attention: each sequence attends to its own prefix ----


def _decode_attention_supports(q, *args) -> Optional[str]:
    return _eager_cpu(q)


@register("decode_attention", NAME, supports=_decode_attention_supports)
def decode_attention(q, k_cache, v_cache, lengths, k_new=None, v_new=None):
    """The lengths are at hand on the CPU: each sequence attends to its own prefix and never touches the
    rest of the cache (10x faster than masking the whole cache, measured at B=4, cache 512)."""
    if k_new is not None:
        reference.append_kv(k_cache, v_cache, lengths, k_new, v_new)
    if q.dtype in reference._LOW_PRECISION:
        return decode_attention(*reference._fp32(q, k_cache, v_cache), lengths).to(q.dtype)
    return torch.cat([_attend_prefix(q[b:b + 1], k_cache[b:b + 1], v_cache[b:b + 1], n)
                      for b, n in enumerate(lengths.tolist())])


def _attend_prefix(q, k_cache, v_cache, length: int):
    """One sequence's Tq newest queries against its first `length` keys (causal among the new ones)."""
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    if q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v)
    mask = reference.decode_mask(torch.tensor([length], device=q.device), q.shape[2], length)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
