"""Causal (prefill) attention, softmax(q k^T / sqrt(D), causal) v, flash-attention style: no T x T matrix.

Forward: one program per (batch*head, query block) streams the key/value blocks up to the diagonal with
an online softmax in log2 units (running max m, sum of exponentials l, fp32 accumulator rescaled by
exp2(m_old - m_new) whenever the max grows). Key blocks wholly above the diagonal are never loaded, and
only the diagonal ones are masked. It writes the output and each row's log-sum-exp (natural log) of its
scaled scores, lse, which lets the backward recompute P = exp(s - lse) without the running statistics.

Backward (FlashAttention-2), with s = scale q k^T and dP = dO V^T:
    delta_i = sum_d dO_id O_id  (= sum_j P_ij dP_ij),  dS = P * (dP - delta)
    dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K
A first kernel computes delta; then one program per key block walks the query blocks from the diagonal
down for dK and dV, and one program per query block walks the key blocks up to the diagonal for dQ.
Each program owns the rows it writes: no atomics, and the same sums in the same order on every run.
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .target import Target, upcasts_dot_operands

HEAD_DIMS = (16, 32, 64, 128)  # the head dim is one tile of columns: a power of two, at most 128


@triton.jit
def _head(base, bh, H, stride_b, stride_h):
    """The [T, D] matrix of one (batch, head); int64 offsets, as B * stride_b may pass 2^31."""
    return base + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _load_rows(base, rows, stride_t, T, D: tl.constexpr, MASKED: tl.constexpr):
    """A [len(rows), D] tile; rows at or past T read as 0 when MASKED (unmasked tiles lie wholly below T)."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_t + tl.arange(0, D)[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=(rows < T)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _forward_steps(q, k_base, v_base, stride_kt, stride_vt, rows, m, l, acc, start, end, T, scale_log2e,
                   ON_DIAGONAL: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, stride_kt, T, D, ON_DIAGONAL)
        v = _load_rows(v_base, keys, stride_vt, T, D, ON_DIAGONAL)
        s = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * scale_log2e  # log2 units
        if ON_DIAGONAL:
            s = tl.where(keys[None, :] <= rows[:, None], s, -float("inf"))
        # Finite: the first block a row meets holds a key it sees (key 0, or its block's first row).
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m = m_new
    return m, l, acc


@triton.jit
def _forward_kernel(Q, K, V, Out, Lse, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, H, T, scale_log2e,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    # The last query blocks first: they have the most keys to see, and the light ones fill in behind.
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(_head(Q, bh, H, stride_qb, stride_qh), rows, stride_qt, T, D, True)
    k_base = _head(K, bh, H, stride_kb, stride_kh)
    v_base = _head(V, bh, H, stride_vb, stride_vh)
    m = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    # Below the diagonal every key precedes every query of the block (and T): nothing to mask.
    m, l, acc = _forward_steps(q, k_base, v_base, stride_kt, stride_vt, rows, m, l, acc, 0, start_m, T,
                               scale_log2e, False, D, BLOCK_N, PRECISION, UPCAST)
    m, l, acc = _forward_steps(q, k_base, v_base, stride_kt, stride_vt, rows, m, l, acc, start_m,
                               tl.minimum(start_m + BLOCK_M, T), T, scale_log2e, True, D, BLOCK_N, PRECISION, UPCAST)
    out_ptrs = _head(Out, bh, H, stride_ob, stride_oh) + rows[:, None].to(tl.int64) * stride_ot
    tl.store(out_ptrs + tl.arange(0, D)[None, :], (acc / l[:, None]).to(Out.dtype.element_ty), mask=(rows < T)[:, None])
    lse = m * 0.6931471805599453 + tl.log(l)  # m is in log2 units: times ln 2
    tl.store(Lse + bh.to(tl.int64) * T + rows, lse, mask=rows < T)


@triton.jit
def _delta_kernel(Out, DO, Delta, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt, H, T,
                  D: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(_head(Out, bh, H, stride_ob, stride_oh), rows, stride_ot, T, D, True).to(tl.float32)
    do = _load_rows(_head(DO, bh, H, stride_db, stride_dh), rows, stride_dt, T, D, True).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + rows, tl.sum(o * do, axis=1), mask=rows < T)


@triton.jit
def _row_stats(Lse, Delta, bh, rows, T):
    """(lse in log2 units, delta) of these query rows; 0 past T, where dO loads as 0 too, so that padding
    rows add nothing to any gradient."""
    in_range = rows < T
    offsets = bh.to(tl.int64) * T + rows
    lse = tl.load(Lse + offsets, mask=in_range, other=0.0) * 1.4426950408889634  # log2(e)
    return lse, tl.load(Delta + offsets, mask=in_range, other=0.0)


@triton.jit
def _dkdv_steps(k, v, q_base, do_base, stride_qt, stride_dt, Lse, Delta, bh, keys, dk, dv, start, end, T,
                scale_log2e, ON_DIAGONAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, stride_qt, T, D, True)  # the last query block may pass T
        do = _load_rows(do_base, rows, stride_dt, T, D, True)
        lse, delta = _row_stats(Lse, Delta, bh, rows, T)
        p_t = tl.math.exp2(_dot(k, tl.trans(q), None, PRECISION, UPCAST) * scale_log2e - lse[None, :])
        if ON_DIAGONAL:  # masked after exp2: a select, so an overflowed score above the diagonal never spreads
            p_t = tl.where(rows[None, :] >= keys[:, None], p_t, 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        dp_t = _dot(v, tl.trans(do), None, PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh,
                 stride_kt, stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt, H, T, scale,
                 scale_log2e, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N  # the first key blocks first: the most query blocks see them
    keys = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(_head(K, bh, H, stride_kb, stride_kh), keys, stride_kt, T, D, True)
    v = _load_rows(_head(V, bh, H, stride_vb, stride_vh), keys, stride_vt, T, D, True)
    q_base = _head(Q, bh, H, stride_qb, stride_qh)
    do_base = _head(DO, bh, H, stride_db, stride_dh)
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dk, dv = _dkdv_steps(k, v, q_base, do_base, stride_qt, stride_dt, Lse, Delta, bh, keys, dk, dv, start_n,
                         tl.minimum(start_n + BLOCK_N, T), T, scale_log2e, True, D, BLOCK_M, PRECISION, UPCAST)
    # Below the diagonal every query follows every key of the block: no causal mask.
    dk, dv = _dkdv_steps(k, v, q_base, do_base, stride_qt, stride_dt, Lse, Delta, bh, keys, dk, dv,
                         start_n + BLOCK_N, T, T, scale_log2e, False, D, BLOCK_M, PRECISION, UPCAST)
    offsets = bh.to(tl.int64) * T * D + keys[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
    tl.store(DK + offsets, (dk * scale).to(DK.dtype.element_ty), mask=(keys < T)[:, None])
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=(keys < T)[:, None])


@triton.jit
def _dq_steps(q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, dq, start, end, T, scale_log2e,
              ON_DIAGONAL: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, stride_kt, T, D, ON_DIAGONAL)
        v = _load_rows(v_base, keys, stride_vt, T, D, ON_DIAGONAL)
        p = tl.math.exp2(_dot(q, tl.trans(k), None, PRECISION, UPCAST) * scale_log2e - lse[:, None])
        if ON_DIAGONAL:  # masked after exp2, as in _dkdv_steps
            p = tl.where(keys[None, :] <= rows[:, None], p, 0.0)
        ds = p * (_dot(do, tl.trans(v), None, PRECISION, UPCAST) - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, Lse, Delta, DQ, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt, H, T, scale, scale_log2e,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # the heaviest blocks first, as forward
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(_head(Q, bh, H, stride_qb, stride_qh), rows, stride_qt, T, D, True)
    do = _load_rows(_head(DO, bh, H, stride_db, stride_dh), rows, stride_dt, T, D, True)
    lse, delta = _row_stats(Lse, Delta, bh, rows, T)
    k_base = _head(K, bh, H, stride_kb, stride_kh)
    v_base = _head(V, bh, H, stride_vb, stride_vh)
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    dq = _dq_steps(q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, dq, 0, start_m, T, scale_log2e,
                   False, D, BLOCK_N, PRECISION, UPCAST)
    dq = _dq_steps(q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, dq, start_m,
                   tl.minimum(start_m + BLOCK_M, T), T, scale_log2e, True, D, BLOCK_N, PRECISION, UPCAST)
    offsets = bh.to(tl.int64) * T * D + rows[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
    tl.store(DQ + offsets, (dq * scale).to(DQ.dtype.element_ty), mask=(rows < T)[:, None])


class LaunchConfig(NamedTuple):
    tiles: tuple[int, int]  # (rows one program owns, rows it steps through per iteration); the second divides the first
    precision: str  # tl.dot's input_precision
    num_warps: int


def launch_config(dtype: torch.dtype, D: int, backward: bool, target: Target) -> LaunchConfig:
    """The forward's or the backward's tiles and options for head dim D on `target` (the delta kernel's are
    its own: it only streams O and dO)."""
    # fp32 follows torch's matmul setting: exact fp32 products unless TF32 is allowed.
    precision = "tf32" if dtype == torch.float32 and target.tf32 else "ieee"
    # Tensor-core tiles, as in Triton's fused-attention tutorial: 128 x 64 forward, 128 x 32 backward (four
    # [128, D] tiles live there). Exact fp32 products run on the FMA units, whose operands spill heavily at
    # those sizes (ptxas, sm_80 and sm_90): 32 x 16 for them, and under the interpreter, so that short
    # sequences span many blocks.
    if target.interpreter or (dtype == torch.float32 and precision == "ieee"):
        tiles = (32, 16)
    else:
        tiles = (128, 32) if backward else (128, 64)
    # 8 warps where 4 spill registers (the backward, and D = 128; ptxas, sm_80 and sm_90); num_stages is
    # Triton's default (3 on sm_80 and up), to be tuned on a GPU.
    return LaunchConfig(tiles, precision, num_warps=8 if backward or D > 64 else 4)


def _kernel_options(dtype: torch.dtype, D: int, config: LaunchConfig) -> dict:
    return dict(D=D, PRECISION=config.precision, UPCAST=upcasts_dot_operands(dtype), num_warps=config.num_warps)


def _unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q: torch.Tensor) -> None:
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"causal_attention: head dim {q.shape[3]} (the kernel takes one of {HEAD_DIMS})")


def causal_attention_forward(q, k, v, tiles=None, target=None):
    """(out [B, H, T, D] in q's dtype, lse [B, H, T] fp32: each query's natural-log log-sum-exp of its
    scaled scores); q, k, v of any strides. tiles: (query rows per program, key rows per step), powers of
    two from 16, the first a multiple of the second; default: launch_config's for the dtype and the target
    (default: the machine of q's device)."""
    _check(q)
    B, H, T, D = q.shape
    q, k, v = (_unit_last_dim(t) for t in (q, k, v))
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    config = launch_config(q.dtype, D, backward=False, target=target or Target.of(q.device))
    block_m, block_n = tiles or config.tiles
    _forward_kernel[(B * H, triton.cdiv(T, block_m))](  # one program per (batch*head, query block)
        q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], H, T,
        math.log2(math.e) / math.sqrt(D), BLOCK_M=block_m, BLOCK_N=block_n, **_kernel_options(q.dtype, D, config))
    return out, lse


def causal_attention_backward(grad_out, q, k, v, out, lse, tiles=None, target=None):
    """(dq, dk, dv) in q's dtype, from the forward's out and lse; tiles: (rows per program, rows per step),
    as the forward's, the rows per program being keys for dK and dV and queries for dQ; target as the
    forward's."""
    _check(q)
    B, H, T, D = q.shape
    grad_out, q, k, v, out = (_unit_last_dim(t) for t in (grad_out, q, k, v, out))
    dq, dk, dv = (torch.empty((B, H, T, D), dtype=q.dtype, device=q.device) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    delta_rows = 4096 // D  # tiles of 4096 elements: the kernel only streams O and dO
    _delta_kernel[(B * H, triton.cdiv(T, delta_rows))](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], H, T, D=D, BLOCK_M=delta_rows)
    config = launch_config(q.dtype, D, backward=True, target=target or Target.of(q.device))
    big, small = tiles or config.tiles
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    scale = 1.0 / math.sqrt(D)
    options = _kernel_options(q.dtype, D, config)
    _dkdv_kernel[(B * H, triton.cdiv(T, big))](  # one program per (batch*head, key block)
        q, k, v, grad_out, lse, delta, dk, dv, *strides, H, T, scale, scale * math.log2(math.e),
        BLOCK_N=big, BLOCK_M=small, **options)
    _dq_kernel[(B * H, triton.cdiv(T, big))](  # one program per (batch*head, query block)
        q, k, v, grad_out, lse, delta, dq, *strides, H, T, scale, scale * math.log2(math.e),
        BLOCK_M=big, BLOCK_N=small, **options)
    return dq, dk, dv
