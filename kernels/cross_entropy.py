"""The LM head and its cross-entropy, a chunk of rows at a time (Liger-Kernel's fused linear cross-entropy).

For each chunk of rows, torch's matmul makes the logits x @ weight.T in the input dtype; the kernel turns each
row into its loss and overwrites the row, in place, with d loss / d logits = (softmax - onehot) * scale; two
more matmuls take that to the gradients of x and weight. The [N, V] logits never exist, and the backward only
scales the gradients by the gradient reaching the loss.

Kernel: one program per row, over V in tiles, in fp32 whatever the input dtype: an online max and sum of
exponentials gives the log-sum-exp (pass 1), then each tile of logits is replaced by its gradient (pass 2).
"""
import torch
import triton
import triton.language as tl

from gpt2fast.ops.reference import cross_entropy_chunk_rows, cross_entropy_scale

MAX_BLOCK = 4096  # a tile of V: 16 fp32 values per thread at 8 warps


@triton.jit
def _cross_entropy_kernel(Logits, Targets, Loss, Scale, stride_row, V, ignore_index,
                          WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_row
    target = tl.load(Targets + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK):
        # Masked lanes are -inf, so exp gives them 0; every tile holds a valid lane, so m is finite after the first.
        z = tl.load(logits + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    target_logit = tl.load(logits + target, mask=valid, other=0.0).to(tl.float32)  # read before pass 2 overwrites it
    tl.store(Loss + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        row_scale = tl.where(valid, tl.load(Scale), 0.0)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            z = tl.load(logits + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(start + cols == target, 1.0, 0.0)
            tl.store(logits + start + cols, (g * row_scale).to(Logits.dtype.element_ty), mask=mask)


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b into the fp32 accumulator: in place for fp32 operands; for low precision ones through their
    product in their dtype (addmm takes one dtype; an fp32 copy of them would cost more)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def linear_cross_entropy_forward(x, weight, targets, ignore_index, mean, grad_x, grad_weight):
    """(loss, d loss / d x or None, d loss / d weight or None). loss: fp32 0-dim, the mean (mean=True) or sum of
    the losses of rows whose target is not ignore_index (0 when there are none); the gradients in the inputs'
    dtypes, the weight's accumulated over the chunks in fp32."""
    x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1).contiguous()
    (N, C), V = x2.shape, weight.shape[0]
    scale = cross_entropy_scale(t != ignore_index, mean, torch.float32)
    loss_rows = torch.empty(N, dtype=torch.float32, device=x.device)
    dx = torch.empty((N, C), dtype=x.dtype, device=x.device) if grad_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grad_weight else None
    block = min(triton.next_power_of_2(V), MAX_BLOCK)
    step = cross_entropy_chunk_rows(N, C, V)
    for start in range(0, N, step):
        rows = slice(start, start + step)
        xc = x2[rows]
        logits = xc @ weight.T
        _cross_entropy_kernel[(xc.shape[0],)](  # one program per row of the chunk
            logits, t[rows], loss_rows[rows], scale, logits.stride(0), V, ignore_index,
            WRITE_GRAD=grad_x or grad_weight, BLOCK=block, num_warps=8)
        if dx is not None:
            torch.mm(logits, weight, out=dx[rows])
        if dw is not None:
            _add_matmul(dw, logits.T, xc)
    return (loss_rows.sum() * scale, None if dx is None else dx.view(x.shape),
            None if dw is None else dw.to(weight.dtype))
