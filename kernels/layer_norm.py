"""LayerNorm over the last dim with the residual add fused in: h = x + residual, y = LN(h) * weight + bias.

Forward: one program per row, the whole row in registers; statistics in fp32 whatever the input
dtype; mean and rstd saved for the backward. Backward, per row:
    dh = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)) + (the gradient reaching h directly)
and dweight = sum(dy * xhat), dbias = sum(dy) over the rows.
"""
import torch
import triton
import triton.language as tl

from .target import Target

MAX_WIDTH = 8192  # a whole row lives in one program's registers


@triton.jit
def _forward_kernel(X, R, H, Y, W, B, Mean, Rstd, stride_x, stride_r, stride_h, stride_y, N, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the storage dtype before normalising, so that y is exactly LN of the h returned.
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean = tl.sum(h, axis=0) / N
    # Masked lanes hold 0, so h - mean there is -mean: zero them or each adds mean^2 to the variance.
    centred = tl.where(mask, h - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (centred * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _backward_kernel(DY, DH, H, W, Mean, Rstd, DX, DW_partial, DB_partial,
                     stride_dy, stride_dh, stride_h, stride_dx, M, N,
                     HAS_DH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(pid, M, tl.num_programs(0)):
        r = tl.cast(row, tl.int64)
        h = tl.load(H + r * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + r)
        xhat = tl.where(mask, (h - tl.load(Mean + r)) * rstd, 0.0)
        wdy = w * dy  # 0 on masked lanes: w and dy load as 0 there
        dx = (wdy - (xhat * (tl.sum(xhat * wdy, axis=0) / N) + tl.sum(wdy, axis=0) / N)) * rstd
        if HAS_DH:
            dx += tl.load(DH + r * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_partial + pid * N + cols, dw, mask=mask)
    tl.store(DB_partial + pid * N + cols, db, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, width] with unit column stride (a copy only when t's layout does not allow a view)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_and_warps(N: int) -> tuple[int, int]:
    # The whole row in one block; about 256 elements per warp (4 warps at GPT-2's 768, 16 at 8192).
    block = triton.next_power_of_2(N)
    return block, min(max(block // 256, 1), 16)


def layer_norm_forward(x, weight, bias, eps, residual=None):
    """(y, h, mean, rstd): y and h (None without a residual) shaped like x; mean, rstd fp32 x.shape[:-1]."""
    N = x.shape[-1]
    if N > MAX_WIDTH:
        raise ValueError(f"layer_norm: width {N} exceeds the kernel's maximum {MAX_WIDTH}")
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if M > 0:
        block, warps = _block_and_warps(N)
        _forward_kernel[(M,)](  # one program per row
            x2, x2 if r2 is None else r2, y if h is None else h, y, weight.contiguous(), bias.contiguous(),
            mean, rstd, x2.stride(0), 0 if r2 is None else r2.stride(0), 0 if h is None else h.stride(0),
            y.stride(0), N, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps)
    return y.view(x.shape), None if h is None else h.view(x.shape), mean, rstd


def backward_program_count(M: int, target: Target) -> int:
    """The backward's programs for M rows on `target`: one per SM, at most one per row (and one for no
    rows, whose partial rows of zeros sum to dweight and dbias)."""
    return max(min(M, target.sm_count), 1)


def layer_norm_backward(grad_y, grad_h, h, weight, mean, rstd, target=None):
    """(dh, dweight, dbias) from the saved LayerNorm input h, mean and rstd; grad_h (or None) is the
    gradient reaching h directly, added to dh (which is then the grad of both x and residual). target: the
    machine to configure the launch for (default: that of h's device)."""
    N = h.shape[-1]
    h2, dy2 = _rows(h), _rows(grad_y)
    dh2 = None if grad_h is None else _rows(grad_h)
    M = h2.shape[0]
    dx = torch.empty((M, N), dtype=h.dtype, device=h.device)
    # One program per SM (a few on a CPU), each over every programs-th row, writing its partial
    # dweight/dbias row, summed below: deterministic, unlike atomics, whose order of adds varies from run
    # to run, and no contention of every program on the same N addresses.
    programs = backward_program_count(M, target or Target.of(h.device))
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=h.device)
    db_partial = torch.empty((programs, N), dtype=torch.float32, device=h.device)
    block, warps = _block_and_warps(N)
    _backward_kernel[(programs,)](
        dy2, dy2 if dh2 is None else dh2, h2, weight.contiguous(), mean, rstd, dx, dw_partial, db_partial,
        dy2.stride(0), 0 if dh2 is None else dh2.stride(0), h2.stride(0), dx.stride(0), M, N,
        HAS_DH=grad_h is not None, BLOCK=block, num_warps=warps)
    return dx.view(h.shape), dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)
