"""GPT-2's MLP, y = gelu_tanh(x @ w_fc + b_fc) @ w_proj + b_proj (weights [in, out]), as two tiled
Triton matmuls with fused epilogues: the first adds b_fc and applies the GELU (storing its accumulator
pre = x @ w_fc, before the bias, too when a backward will need it), the second adds b_proj.

Each program computes one [BLOCK_M, BLOCK_N] output tile, accumulating in fp32 over K with tl.dot;
programs run in groups of GROUP_M row tiles down each column of tiles, so that a group reads the same
weight columns while they are still in L2. Masks take M, N and K that are not multiples of the blocks.

The backward, the one both fast backends share (gpt2fast/ops/custom_ops.py), runs torch matmuls for the input
and weight gradients and `bias_gelu`'s backward kernel for the GELU, which adds b_fc to pre itself.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bias_gelu import _sigmoid
from .target import Target, upcasts_dot_operands


@triton.jit
def _matmul_kernel(A, W, Bias, C, Pre, M, N, K, stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_pm,
                   GELU: tl.constexpr, STORE_PRE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)  # the last group may hold fewer row tiles
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = (rows < M)[:, None]
    col_ok = (cols < N)[None, :]
    a_ptrs = A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = W + ks[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=row_ok & (ks[None, :] < K - k), other=0.0)
        w = tl.load(w_ptrs, mask=(ks[:, None] < K - k) & col_ok, other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask = row_ok & col_ok
    row_offsets = rows.to(tl.int64)[:, None]
    if STORE_PRE:
        tl.store(Pre + row_offsets * stride_pm + cols[None, :], acc.to(Pre.dtype.element_ty), mask=mask)
    acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GELU:  # z * sigmoid(2u), as in bias_gelu.py
        acc = acc * _sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    tl.store(C + row_offsets * stride_cm + cols[None, :], acc.to(C.dtype.element_ty), mask=mask)


class LaunchConfig(NamedTuple):
    blocks: tuple[int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K)
    precision: str  # tl.dot's input_precision


def launch_config(dtype: torch.dtype, M: int, target: Target) -> LaunchConfig:
    """The matmul kernel's blocks and precision for M rows of `dtype` on `target`."""
    # 64x128 tiles with K steps of 32 (Triton's tutorial choice, tensor-core friendly, fits shared memory
    # with pipelining); 16 rows (tl.dot's minimum) when decoding a few rows, so no work is masked away.
    blocks = (16 if M <= 16 else 64), 128, 32
    # fp32 follows torch's matmul setting: exact fp32 products unless TF32 is allowed.
    return LaunchConfig(blocks, "tf32" if dtype == torch.float32 and target.tf32 else "ieee")


def _matmul(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, gelu: bool, store_pre: bool, target: Target):
    """(bias + a @ w, then GELU if asked; a @ w without the bias, or None) for a [M, K], w [K, N] any strides."""
    M, K = a.shape
    N = w.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    pre = torch.empty((M, N), dtype=a.dtype, device=a.device) if store_pre else None
    if M > 0:
        (block_m, block_n, block_k), precision = launch_config(a.dtype, M, target)
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        _matmul_kernel[grid](a, w, bias.contiguous(), out, out if pre is None else pre, M, N, K,
                             a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0),
                             0 if pre is None else pre.stride(0), GELU=gelu, STORE_PRE=store_pre,
                             PRECISION=precision, UPCAST=upcasts_dot_operands(a.dtype), BLOCK_M=block_m,
                             BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
    return out, pre


def gelu_mlp_forward(x, w_fc, b_fc, w_proj, b_proj, save_pre: bool, target=None):
    """(y, act, pre): y like x; act = gelu_tanh(pre + b_fc) and pre = x @ w_fc, both [..., F] in x's
    dtype; pre is None unless save_pre (for the backward). target: the machine to configure the launches
    for (default: that of x's device)."""
    lead = x.shape[:-1]
    target = target or Target.of(x.device)
    act, pre = _matmul(x.reshape(-1, x.shape[-1]), w_fc, b_fc, gelu=True, store_pre=save_pre, target=target)
    y, _ = _matmul(act, w_proj, b_proj, gelu=False, store_pre=False, target=target)
    F = w_fc.shape[1]
    return y.view(x.shape), act.view(*lead, F), None if pre is None else pre.view(*lead, F)

