"""Flash-decoding: the Tq newest queries of each sequence against its KV cache, split along the cache.

The cache axis S is cut into chunks; one program per (batch*head, chunk) streams its chunk of K/V with
an online softmax for all Tq queries at once and writes a partial (running max, sum of exponentials,
unnormalised output) in fp32; a second kernel merges the chunks of each (batch, head, query):
    m = max_c m_c,  out = sum_c exp(m_c - m) acc_c / sum_c exp(m_c - m) l_c.
Only keys below a sequence's length are ever loaded (entries past it may hold NaN); a chunk wholly past
the length loads nothing and writes the neutral partial (m = -inf, l = 0, acc = 0), which weighs 0.

With K_new/V_new (APPEND), the Tq newest keys and values are read from them rather than from the cache,
in one extra tile after the loop, and the program whose chunk holds a new position also writes it into
the cache: the append costs no launch of its own, and no program reads an entry another one is writing.
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .target import Target, upcasts_dot_operands

MAX_QUERIES = 16  # the queries live in one tile of rows: decode appends a few tokens, not a prompt
HEAD_DIMS = (16, 32, 64, 128)  # the head dim is one tile of columns: a power of two, at most 128


@triton.jit
def _attend_tile(q, k, v, keys, loaded, last_key, m, l, acc, scale_log2e, FP32_DOT: tl.constexpr):
    """One tile of keys and values folded into the running (max, sum, output) of the online softmax; only
    the keys `loaded` count, each for the queries at or after its position."""
    if FP32_DOT:  # full-precision products (the default rounds fp32 to tf32)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(loaded[None, :] & (keys[None, :] <= last_key[:, None]), s * scale_log2e, -float("inf"))  # log2
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # A row that has seen no key yet keeps m = -inf; shifting by 0 then gives exp2(-inf) = 0, not NaN.
    shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.math.exp2(s - shift[:, None])
    alpha = tl.math.exp2(m - shift)
    l = l * alpha + tl.sum(p, axis=1)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _split_kernel(Q, K, V, K_new, V_new, Lengths, M_part, L_part, Acc_part,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                  stride_vb, stride_vh, stride_vs, stride_nkb, stride_nkh, stride_nkt,
                  stride_nvb, stride_nvh, stride_nvt, H, Tq, chunk, num_splits, scale_log2e,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
                  APPEND: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    length = tl.load(Lengths + b).to(tl.int32)
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    # Query i sits at position length - Tq + i and sees keys 0 .. that position; padding rows see none.
    last_key = tl.where(rows < Tq, length - Tq + rows, -1)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                mask=(rows < Tq)[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)  # <= start for a chunk wholly past the length: no iteration
    first_new = length - Tq
    cached_end = tl.minimum(end, first_new) if APPEND else end  # the new keys are not in the cache yet
    for n0 in range(start, cached_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        valid = keys < cached_end  # masks the loads: nothing at or past the length is read
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_ks + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vs + dims[None, :], mask=valid[:, None], other=0.0)
        m, l, acc = _attend_tile(q, k, v, keys, valid, last_key, m, l, acc, scale_log2e, FP32_DOT)
    if APPEND:
        # The new keys this chunk holds, positions [max(start, first_new), end): at most Tq <= 16 <= BLOCK_N,
        # so one tile. Read from K_new/V_new, and written to the cache by this program only.
        keys = tl.maximum(start, first_new) + tl.arange(0, BLOCK_N)
        fresh = keys < end
        t = (keys - first_new).to(tl.int64)
        k = tl.load(K_new + b * stride_nkb + h * stride_nkh + t[:, None] * stride_nkt + dims[None, :],
                    mask=fresh[:, None], other=0.0)
        v = tl.load(V_new + b * stride_nvb + h * stride_nvh + t[:, None] * stride_nvt + dims[None, :],
                    mask=fresh[:, None], other=0.0)
        tl.store(k_base + keys[:, None].to(tl.int64) * stride_ks + dims[None, :], k, mask=fresh[:, None])
        tl.store(v_base + keys[:, None].to(tl.int64) * stride_vs + dims[None, :], v, mask=fresh[:, None])
        m, l, acc = _attend_tile(q, k, v, keys, fresh, last_key, m, l, acc, scale_log2e, FP32_DOT)

    part = bh.to(tl.int64) * num_splits + split
    tl.store(M_part + part * BLOCK_M + rows, m)
    tl.store(L_part + part * BLOCK_M + rows, l)
    tl.store(Acc_part + (part * BLOCK_M + rows[:, None]) * D + dims[None, :], acc)


@triton.jit
def _combine_kernel(M_part, L_part, Acc_part, Out, stride_ob, stride_oh, stride_ot, H, num_splits,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    splits = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, D)
    parts = (bh * num_splits + splits) * BLOCK_M + row
    in_range = splits < num_splits
    m = tl.load(M_part + parts, mask=in_range, other=-float("inf"))
    m_max = tl.max(m, axis=0)  # finite: every query sees key 0, which some chunk holds
    w = tl.math.exp2(m - m_max)  # 0 for neutral partials and padding
    l = tl.sum(w * tl.load(L_part + parts, mask=in_range, other=0.0), axis=0)
    acc = tl.load(Acc_part + parts[:, None] * D + dims[None, :], mask=in_range[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / l
    b, h = bh // H, bh % H
    tl.store(Out + b * stride_ob + h * stride_oh + row * stride_ot + dims, out.to(Out.dtype.element_ty))


class CacheSplit(NamedTuple):
    splits: int  # chunks the cache is cut into, one program each per (batch, head)
    chunk: int  # keys per chunk, whole blocks
    block_n: int  # keys per step


def cache_split(heads: int, S: int, target: Target, num_splits: int | None = None) -> CacheSplit:
    """How a cache of S keys is cut for B*H = heads on `target`, into num_splits chunks or fewer (default:
    about two programs per SM when B*H alone would leave SMs idle, and no chunk under 64 keys)."""
    splits = num_splits or max(1, min(triton.cdiv(2 * target.sm_count, heads), triton.cdiv(S, 64)))
    chunk = triton.cdiv(S, splits)
    block_n = max(16, min(64, triton.next_power_of_2(chunk)))  # tl.dot takes tiles of 16 and up
    chunk = triton.cdiv(chunk, block_n) * block_n  # whole blocks per chunk
    return CacheSplit(triton.cdiv(S, chunk), chunk, block_n)


def _unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_attention_forward(q, k_cache, v_cache, lengths, k_new=None, v_new=None, num_splits=None, target=None):
    """[B, H, Tq, D] in q's dtype; num_splits is how many chunks S is cut into, at most (default: cache_split's
    choice for the target, by default the machine of q's device).

    With k_new, v_new [B, H, Tq, D], they are appended: written into the caches (in place) at positions
    lengths - Tq .. lengths - 1, which therefore need a unit stride along D as they are.
    """
    B, H, Tq, D = q.shape
    S = k_cache.shape[2]
    if Tq > MAX_QUERIES or D not in HEAD_DIMS:
        raise ValueError(f"decode_attention: Tq {Tq} (at most {MAX_QUERIES}) or head dim {D} (one of {HEAD_DIMS})")
    append = k_new is not None
    if append and (k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1):
        raise ValueError("decode_attention: appending needs caches with a unit stride along the head dim")
    q, k_cache, v_cache = (_unit_last_dim(t) for t in (q, k_cache, v_cache))
    k_new, v_new = (_unit_last_dim(t) for t in (k_new, v_new)) if append else (k_cache, v_cache)  # unread if not
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    splits, chunk, block_n = cache_split(B * H, S, target or Target.of(q.device), num_splits)
    block_m = 16  # Tq <= 16 queries, padded to tl.dot's smallest tile
    m_part = torch.empty((B * H, splits, block_m), dtype=torch.float32, device=q.device)
    l_part = torch.empty((B * H, splits, block_m), dtype=torch.float32, device=q.device)
    acc_part = torch.empty((B * H, splits, block_m, D), dtype=torch.float32, device=q.device)
    _split_kernel[(B * H, splits)](
        q, k_cache, v_cache, k_new, v_new, lengths, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2), H, Tq, chunk, splits,
        math.log2(math.e) / math.sqrt(D), D=D, BLOCK_M=block_m, BLOCK_N=block_n,
        FP32_DOT=q.dtype == torch.float32 or upcasts_dot_operands(q.dtype), APPEND=append,
        num_warps=4)
    _combine_kernel[(B * H, Tq)](  # one program per (batch*head, query): D outputs from `splits` partials
        m_part, l_part, acc_part, out, out.stride(0), out.stride(1), out.stride(2), H, splits,
        D=D, BLOCK_M=block_m, BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=1 if D <= 64 else 2)
    return out
