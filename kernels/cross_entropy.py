"""The cross-entropy of rows of logits, and in place their gradient: the kernel of Liger-Kernel's fused linear
cross-entropy. The triton backend runs it inside the ops layer's chunk loop (gpt2fast/ops/custom_ops.py's
linear_cross_entropy_chunks): torch's matmul makes a chunk of logits x @ weight.T, this kernel turns each row
into its loss and overwrites the row with d loss / d logits = (softmax - onehot) * scale, and two more matmuls
take that to the gradients of x and weight, so that the [N, V] logits never exist.

Kernel: one program per row, over V in tiles, in fp32 whatever the input dtype: an online max and sum of
exponentials gives the log-sum-exp (pass 1), then each tile of logits is replaced by its gradient (pass 2).
"""
import torch
import triton
import triton.language as tl

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


def cross_entropy_rows(logits, targets, scale, ignore_index, write_grad):
    """The loss of every row of logits [n, V] (fp32 [n]); with write_grad, the rows become their gradient."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    _cross_entropy_kernel[(n,)](  # one program per row
        logits, targets, loss, scale, logits.stride(0), V, ignore_index,
        WRITE_GRAD=write_grad, BLOCK=min(triton.next_power_of_2(V), MAX_BLOCK), num_warps=8)
    return loss

