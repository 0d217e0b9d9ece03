"""y = x @ (weight * scale[:, None]).T + bias with weights stored in low precision (int8 with one fp32 scale
per output channel, or bfloat16 with an optional one): the matmul of weight-only-quantized decoding; math in fp32.

Each program computes one [BLOCK_M, BLOCK_N] output tile, stepping along K through BLOCK_K columns of x and
of its BLOCK_N weight rows. The weights cross memory in their storage dtype, which is the point (decoding
reads every weight once per token, and is bound by those bytes), and widen to fp32 in registers; tl.dot
then multiplies exactly in fp32 (never TF32), as the reference does. The scale belongs to an output column,
so it multiplies the accumulator once after the K loop rather than every weight; then the bias. Masks take
M, N and K that are not multiples of the blocks. Forward only: decoding is inference.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(X, W, Scale, Bias, Y, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
                    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = (rows < M)[:, None]
    col_ok = (cols < N)[None, :]
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = W + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] of w.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok & (ks[None, :] < K - k), other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=(ks[:, None] < K - k) & col_ok, other=0).to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_SCALE:
        acc *= tl.load(Scale + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok & col_ok)


def blocks(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for M rows of x."""
    # Rows: tl.dot's minimum of 16, growing to 64 with M so that few are padding (decoding has 1 to 64).
    # 64 columns: more programs to share out an H100's 132 SMs when M is small (still only 12 at N = 768).
    # K steps of 128: each weight row's step is one 128-byte line in int8, and fp32 tiles fit shared memory.
    return min(max(triton.next_power_of_2(M), 16), 64), 64, 128


def quantized_linear_forward(x: torch.Tensor, weight: torch.Tensor, scale, bias) -> torch.Tensor:
    """[..., N] in x's dtype, for x [..., K] and weight [N, K] of any strides; scale fp32 [N] and bias [N] in x's
    dtype, each or None."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        block_m, block_n, block_k = blocks(M)
        # Row tiles vary fastest, so the programs that read the same weight rows run together (one fetch from
        # memory, the rest from L2).
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _forward_kernel[grid](x2, weight, y if scale is None else scale.contiguous(),
                              y if bias is None else bias.contiguous(), y, M, N, K, x2.stride(0), x2.stride(1),
                              weight.stride(0), weight.stride(1), y.stride(0), HAS_SCALE=scale is not None,
                              HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.view(*x.shape[:-1], N)
