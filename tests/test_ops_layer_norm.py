"""ops.layer_norm against explicit fp64 mean/variance math, forward and backward, on every backend."""
import pytest
import torch

import gpt2fast
from gpt2fast import ops
from conftest import assert_close, randn

# Widths that are not powers of two included on purpose: a kernel that lets masked lanes into the
# mean or the variance fails there (inputs have a non-zero mean so that such a bug shows).
SHAPES = [(1, 1, 768), (3, 77, 100), (2, 5, 1000), (1, 7, 1536), (4, 3, 1600), (2, 1, 17), (5, 1000)]


def naive_layer_norm(h, weight, bias, eps):
    h, weight, bias = h.double(), weight.double(), bias.double()
    mean = h.sum(-1, keepdim=True) / h.shape[-1]
    var = ((h - mean) ** 2).sum(-1, keepdim=True) / h.shape[-1]
    return (h - mean) / torch.sqrt(var + eps) * weight + bias


def make_inputs(shape, dtype, device, seed=0, requires_grad=False):
    C = shape[-1]
    x = randn(*shape, dtype=dtype, device=device, seed=seed, scale=2.0, shift=3.0)
    residual = randn(*shape, dtype=dtype, device=device, seed=seed + 1, shift=-1.0)
    weight = randn(C, dtype=dtype, device=device, seed=seed + 2, scale=0.1, shift=1.0)
    bias = randn(C, dtype=dtype, device=device, seed=seed + 3, scale=0.1)
    tensors = (x, residual, weight, bias)
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_naive(backend, device, dtype, shape):
    x, _, weight, bias = make_inputs(shape, dtype, device)
    with gpt2fast.use_backend(backend):
        y = ops.layer_norm(x, weight, bias, 1e-5)
    assert y.dtype == dtype and y.device == x.device
    assert_close(y, naive_layer_norm(x, weight, bias, 1e-5))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_with_residual_returns_normalised_sum_and_sum(backend, device, dtype, shape):
    x, residual, weight, bias = make_inputs(shape, dtype, device)
    with gpt2fast.use_backend(backend):
        y, h = ops.layer_norm(x, weight, bias, 1e-5, residual=residual)
    exact_h = x.double() + residual.double()
    assert y.dtype == h.dtype == dtype
    assert_close(h, exact_h)
    assert_close(y, naive_layer_norm(exact_h, weight, bias, 1e-5))


@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-5])
def test_layer_norm_honours_eps(backend, device, eps):
    # Variance 1e-4: eps dominates or vanishes depending on its value, so an ignored eps shows.
    x = randn(3, 5, 1000, device=device, seed=7, scale=1e-2, shift=0.05)
    weight = randn(1000, device=device, seed=8, scale=0.1, shift=1.0)
    bias = randn(1000, device=device, seed=9, scale=0.1)
    with gpt2fast.use_backend(backend):
        y = ops.layer_norm(x, weight, bias, eps)
        y_default = ops.layer_norm(x, weight, bias, 1e-5)
    assert_close(y, naive_layer_norm(x, weight, bias, eps))
    if eps != 1e-5:
        assert (y - y_default).abs().max() > 0.05


def test_layer_norm_non_contiguous_input(backend, device):
    x = randn(77, 3, 1000, device=device, seed=3, scale=2.0, shift=1.0).transpose(0, 1)
    residual = randn(3, 1000, 77, device=device, seed=4).transpose(1, 2)
    weight = randn(2000, device=device, seed=5, shift=1.0)[::2]
    bias = randn(1000, device=device, seed=6)
    assert not (x.is_contiguous() or residual.is_contiguous() or weight.is_contiguous())
    with gpt2fast.use_backend(backend):
        y, h = ops.layer_norm(x, weight, bias, 1e-5, residual=residual)
    exact_h = x.double() + residual.double()
    assert_close(h, exact_h)
    assert_close(y, naive_layer_norm(exact_h, weight, bias, 1e-5))


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(2, 77, 100), (1, 3, 1600)], ids=str)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_layer_norm_backward_matches_naive(backend, device, grad_dtype, shape, with_residual):
    x, residual, weight, bias = make_inputs(shape, grad_dtype, device, seed=11, requires_grad=True)
    grad_y = randn(*shape, dtype=grad_dtype, device=device, seed=20)
    grad_h = randn(*shape, dtype=grad_dtype, device=device, seed=21)
    leaves = [x, weight, bias] + ([residual] if with_residual else [])

    with gpt2fast.use_backend(backend):
        if with_residual:
            y, h = ops.layer_norm(x, weight, bias, 1e-5, residual=residual)
            loss = (y * grad_y).sum() + (h * grad_h).sum()
        else:
            loss = (ops.layer_norm(x, weight, bias, 1e-5) * grad_y).sum()
    grads = torch.autograd.grad(loss, leaves)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, b64 = leaves64[:3]
    h64 = x64 + leaves64[3] if with_residual else x64
    loss64 = (naive_layer_norm(h64, w64, b64, 1e-5) * grad_y.double()).sum()
    if with_residual:
        loss64 = loss64 + (h64 * grad_h.double()).sum()
    expected = torch.autograd.grad(loss64, leaves64)

    rows = x.numel() // shape[-1]
    for name, got, want in zip(["x", "weight", "bias", "residual"], grads, expected):
        assert got.dtype == grad_dtype, name
        # weight and bias gradients sum over every row, so their error grows with the row count.
        scale = (2 * rows ** 0.5) if name in ("weight", "bias") else 2
        assert_close(got, want, scale=scale, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 1024, 768), (4, 1024, 1600)], ids=str)
def test_layer_norm_gpt2_shapes_on_gpu(backend, dtype, shape):
    x, residual, weight, bias = make_inputs(shape, dtype, "cuda")
    with gpt2fast.use_backend(backend):
        y, h = ops.layer_norm(x, weight, bias, 1e-5, residual=residual)
    exact_h = x.double() + residual.double()
    assert_close(h, exact_h)
    assert_close(y, naive_layer_norm(exact_h, weight, bias, 1e-5))
