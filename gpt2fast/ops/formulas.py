"""What the fast backends' custom ops share: the fake (meta) functions of ops with the same outputs, and the
autograd formulas, each built around a backend's own backward op.

The `triton` ops (`gpt2fast::<op>_triton`) and the `cuda` ones (`gpt2fast::<op>_cuda`) of layer_norm,
bias_gelu and causal_attention have the same outputs: layer_norm returns (y, h, mean, rstd), h empty
without a residual (an output may not alias x); causal_attention returns (out, lse). linear_cross_entropy
(a triton op only, so far) returns (loss, dx, dweight), its gradients computed in the forward, so that its
formula needs no backward op.
"""
from __future__ import annotations

from typing import Callable

import torch


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
