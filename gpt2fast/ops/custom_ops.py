"""The pieces the backends' torch.library custom ops share: fake (meta) functions, autograd formulas (each
built around a backend's own backward op), and the chunk loop of linear_cross_entropy.

The `triton` ops (`gpt2fast::<op>_triton`) and the `native` ones (`gpt2fast::<op>_native`) of an op have the
same outputs: layer_norm returns (y, h, mean, rstd), h empty without a residual (an output may not alias x);
causal_attention returns (out, lse); gelu_mlp returns (y, act, pre), pre = x @ w_fc without b_fc (so that
the bias_gelu backward op, which adds its bias, takes it as it takes any input); linear_cross_entropy returns
(loss, dx, dweight), its gradients computed in the forward, so that its formula needs no backward op.
"""
from __future__ import annotations

from typing import Callable

import torch

from .reference import cross_entropy_chunk_rows, cross_entropy_scale


def layer_norm_fake(x, weight, bias, eps, residual):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(0 if residual is None else x.shape), stats, torch.empty_like(stats)


def layer_norm_backward_fake(grad_y, grad_h, h, weight, mean, rstd):
    return h.new_empty(h.shape), torch.empty_like(weight), torch.empty_like(weight)


def bias_gelu_fake(x, bias):
    return x.new_empty(x.shape)


def bias_gelu_backward_fake(grad_y, x, bias):
    return x.new_empty(x.shape), torch.empty_like(bias)


def causal_attention_fake(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def gelu_mlp_fake(x, w_fc, b_fc, w_proj, b_proj, save_pre=True):
    """(y, act, pre); pre is an empty tensor where the op was asked not to keep it (save_pre=False)."""
    hidden = x.new_empty(*x.shape[:-1], w_fc.shape[1])
    return x.new_empty(x.shape), hidden, torch.empty_like(hidden) if save_pre else x.new_empty(0)


def layer_norm_autograd(backward_op: Callable) -> tuple[Callable, Callable]:
    """(backward, setup_context) for a layer_norm op; backward_op(grad_y, grad_h, h, weight, mean, rstd)
    returns (dh, dweight, dbias), h being the normalised input (x + residual, or x)."""

    def setup_context(ctx, inputs, output):
        x, weight, _, _, residual = inputs
        _, h, mean, rstd = output
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)

    def backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
        h, weight, mean, rstd = ctx.saved_tensors
        grad_h = grad_h if ctx.has_residual else None  # else the grad of the empty placeholder output
        dh, dweight, dbias = backward_op(grad_y, grad_h, h, weight, mean, rstd)
        return dh, dweight, dbias, None, dh if ctx.has_residual else None

    return backward, setup_context


def bias_gelu_autograd(backward_op: Callable) -> tuple[Callable, Callable]:
    """(backward, setup_context) for a bias_gelu op; backward_op(grad_y, x, bias) returns (dx, dbias)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_y):
        return backward_op(grad_y, *ctx.saved_tensors)

    return backward, setup_context


def gelu_mlp_autograd(bias_gelu_backward_op: Callable) -> tuple[Callable, Callable]:
    """(backward, setup_context) for a gelu_mlp op (x, w_fc, b_fc, w_proj, b_proj, *flags) -> (y, act, pre):
    torch matmuls for the matmuls' gradients, and bias_gelu_backward_op(grad_y, x, bias) -> (dx, dbias) for d pre
    from d act: pre holds no b_fc, so the op adds it, and the bias gradient it returns, the column sums of
    d pre, is db_fc. An empty pre (the forward did not keep it) is recomputed."""

    def setup_context(ctx, inputs, output):
        x, w_fc, b_fc, w_proj = inputs[:4]
        _, act, pre = output
        ctx.flags = len(inputs) - 5  # non-tensor inputs after b_proj, whose gradients are None
        ctx.save_for_backward(x, w_fc, b_fc, w_proj, act, pre)

    def backward(ctx, grad_y, _grad_act, _grad_pre):
        x, w_fc, b_fc, w_proj, act, pre = ctx.saved_tensors
        C, F = w_fc.shape
        dy, x2, act2 = grad_y.reshape(-1, C), x.reshape(-1, C), act.reshape(-1, F)
        if pre.numel() == 0 and act.numel() > 0:
            pre = x2 @ w_fc
        d_pre, db_fc = bias_gelu_backward_op(dy @ w_proj.T, pre.reshape(-1, F), b_fc)
        return (d_pre @ w_fc.T).view(x.shape), x2.T @ d_pre, db_fc, act2.T @ dy, dy.sum(0), *(None,) * ctx.flags

    return backward, setup_context


def linear_cross_entropy_fake(x, weight, targets, ignore_index, mean, grad_x, grad_weight):
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape if grad_x else 0),
            weight.new_empty(weight.shape if grad_weight else 0))


def linear_cross_entropy_autograd() -> tuple[Callable, Callable]:
    """(backward, setup_context) for a linear_cross_entropy op (x, weight, targets, ignore_index, mean, grad_x,
    grad_weight) -> (loss, dx, dweight), whose forward already computes the loss's gradients (those asked for;
    the others are empty): the backward only scales them by the gradient reaching the loss."""

    def setup_context(ctx, inputs, output):
        ctx.grad_x, ctx.grad_weight = inputs[5:]
        ctx.save_for_backward(*output[1:])

    def backward(ctx, grad_loss, _grad_dx, _grad_dweight):
        dx, dweight = ctx.saved_tensors
        return (dx * grad_loss if ctx.grad_x else None, dweight * grad_loss if ctx.grad_weight else None,
                None, None, None, None, None)

    return backward, setup_context


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b into the fp32 accumulator: in place for fp32 operands; for low precision ones through their
    product in their dtype (addmm takes one dtype; an fp32 copy of them would cost more)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def linear_cross_entropy_chunks(x, weight, targets, ignore_index, mean, grad_x, grad_weight, rows_kernel):
    """(loss, d loss / d x or None, d loss / d weight or None), a chunk of rows at a time: torch's matmul makes
    the chunk's logits in the input dtype, rows_kernel(logits, targets, scale, ignore_index, write_grad) turns
    them into the rows' losses (fp32) and, in place, their gradients, and two more matmuls carry those to x
    and weight. loss: fp32 0-dim, the mean (mean=True) or sum over rows whose target is not ignore_index (0
    when there are none); the gradients in the inputs' dtypes, the weight's accumulated in fp32."""
    x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1).contiguous()
    (N, C), V = x2.shape, weight.shape[0]
    scale = cross_entropy_scale(t != ignore_index, mean, torch.float32)
    dx = torch.empty((N, C), dtype=x.dtype, device=x.device) if grad_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grad_weight else None
    step = cross_entropy_chunk_rows(N, C, V)
    losses = []
    for start in range(0, N, step):
        rows = slice(start, start + step)
        xc = x2[rows]
        logits = xc @ weight.T
        losses.append(rows_kernel(logits, t[rows], scale, ignore_index, grad_x or grad_weight))
        if dx is not None:
            torch.mm(logits, weight, out=dx[rows])
        if dw is not None:
            _add_matmul(dw, logits.T, xc)
    loss = torch.cat(losses).sum() if losses else x.new_zeros((), dtype=torch.float32)
    return (loss * scale, None if dx is None else dx.view(x.shape), None if dw is None else dw.to(weight.dtype))
