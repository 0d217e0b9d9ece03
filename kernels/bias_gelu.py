"""y = gelu_tanh(x + bias), the MLP's epilogue, and its backward (dx, dbias); math in fp32.

gelu_tanh(z) = 0.5 z (1 + tanh(u)) with u = sqrt(2/pi) (z + 0.044715 z^3), which equals z * sigmoid(2u):
one exp, and no tanh (which Triton lacks outside libdevice). Its derivative is
s + z s (1 - s) 2u' with s = sigmoid(2u), u' = sqrt(2/pi) (1 + 3 * 0.044715 z^2).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tile(X, B, stride_x, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows, columns, mask, row offsets (int64) and z = x + bias in fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    row_offsets = rows.to(tl.int64)[:, None]
    x = tl.load(X + row_offsets * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = x + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return cols, mask, row_offsets, z


@triton.jit
def _sigmoid(t):
    e = tl.exp(-tl.abs(t))  # never overflows, unlike exp(-t) for large negative t
    return tl.where(t >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _forward_kernel(X, B, Y, stride_x, stride_y, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols, mask, row_offsets, z = _tile(X, B, stride_x, M, N, BLOCK_M, BLOCK_N)
    y = z * _sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))  # 2 * sqrt(2/pi)
    tl.store(Y + row_offsets * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(DY, X, B, DX, DB_partial, stride_dy, stride_x, stride_dx, M, N,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols, mask, row_offsets, z = _tile(X, B, stride_x, M, N, BLOCK_M, BLOCK_N)
    s = _sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    slope = s + z * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * z * z)  # 3 * 0.044715
    dy = tl.load(DY + row_offsets * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dz = dy * slope  # 0 on masked lanes: dy loads as 0 there
    tl.store(DX + row_offsets * stride_dx + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
    tl.store(DB_partial + tl.program_id(0) * N + cols, tl.sum(dz, axis=0), mask=cols < N)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, width] with unit column stride (a copy only when t's layout does not allow a view)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiles(M: int, N: int) -> tuple[int, int, tuple[int, int]]:
    # Tiles of 4096 elements, at most 128 columns wide (coalesced rows; the bias loads once per tile).
    block_n = min(triton.next_power_of_2(N), 128)
    block_m = 4096 // block_n
    return block_m, block_n, (triton.cdiv(M, block_m), triton.cdiv(N, block_n))


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    N = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0:
        block_m, block_n, grid = _tiles(M, N)
        _forward_kernel[grid](x2, bias.contiguous(), y, x2.stride(0), y.stride(0), M, N,
                              BLOCK_M=block_m, BLOCK_N=block_n)
    return y.view(x.shape)


def bias_gelu_backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor):
    """(dx, dbias); dbias sums one partial row per row of tiles, reduced after (deterministic, no atomics)."""
    N = x.shape[-1]
    x2, dy2 = _rows(x), _rows(grad_y)
    M = x2.shape[0]
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m, block_n, grid = _tiles(M, N)
    db_partial = torch.empty((grid[0], N), dtype=torch.float32, device=x.device)
    if M > 0:
        _backward_kernel[grid](dy2, x2, bias.contiguous(), dx, db_partial, dy2.stride(0), x2.stride(0),
                               dx.stride(0), M, N, BLOCK_M=block_m, BLOCK_N=block_n)
    return dx.view(x.shape), db_partial.sum(0).to(bias.dtype)
