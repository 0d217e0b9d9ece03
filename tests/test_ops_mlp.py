"""ops.bias_gelu and ops.gelu_mlp against x @ W + b (weights [in, out]) and the tanh GELU formula, in fp64."""
import math

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from conftest import assert_close, randn


def naive_gelu_tanh(x):
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def naive_linear(x, weight, bias):
    return x.double() @ weight.double() + bias.double()


def naive_gelu_mlp(x, w_fc, b_fc, w_proj, b_proj):
    return naive_linear(naive_gelu_tanh(naive_linear(x, w_fc, b_fc)), w_proj, b_proj)


def mlp_weights(C, F_, dtype, device, seed=0, requires_grad=False):
    """Weights scaled by 1/sqrt(fan-in) so every activation stays O(1) whatever the width."""
    tensors = (randn(C, F_, dtype=dtype, device=device, seed=seed, scale=C ** -0.5),
               randn(F_, dtype=dtype, device=device, seed=seed + 1, scale=0.5),
               randn(F_, C, dtype=dtype, device=device, seed=seed + 2, scale=F_ ** -0.5),
               randn(C, dtype=dtype, device=device, seed=seed + 3, scale=0.5))
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


# x shapes [..., C] with the hidden width F = 4C as in GPT-2, plus odd ones; B*T small at wide widths.
MLP_SHAPES = [((1, 1, 768), 3072), ((2, 77, 64), 256), ((2, 3, 1000), 4000), ((3, 1, 1600), 6400),
              ((5, 48), 100), ((4, 33), 17)]
BIAS_GELU_SHAPES = [(1, 1, 768), (3, 77, 100), (2, 5, 1536), (1, 3, 6400), (4, 17)]


@pytest.mark.parametrize("shape", BIAS_GELU_SHAPES, ids=str)
def test_bias_gelu_matches_naive(backend, device, dtype, shape):
    # Range [-6, 6] or so: GELU's negative tail, its minimum near -0.75 and its linear part.
    x = randn(*shape, dtype=dtype, device=device, seed=1, scale=2.5)
    bias = randn(shape[-1], dtype=dtype, device=device, seed=2)
    with gpt2fast.use_backend(backend):
        y = ops.bias_gelu(x, bias)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, naive_gelu_tanh(x.double() + bias.double()), scale=2)


def test_bias_gelu_is_the_tanh_approximation(backend, device):
    """At x = -3 the tanh and erf GELUs differ by ~4e-4: far above fp32 error."""
    x = torch.full((2, 64), -3.0, device=device)
    bias = torch.zeros(64, device=device)
    with gpt2fast.use_backend(backend):
        y = ops.bias_gelu(x, bias)
    exact_erf = -3.0 * 0.5 * (1 + math.erf(-3.0 / math.sqrt(2)))
    assert_close(y, naive_gelu_tanh(x))
    assert (y.double() - exact_erf).abs().min() > 1e-4


@pytest.mark.parametrize("shape,hidden", MLP_SHAPES, ids=str)
def test_gelu_mlp_matches_naive(backend, device, dtype, shape, hidden):
    x = randn(*shape, dtype=dtype, device=device, seed=4)
    weights = mlp_weights(shape[-1], hidden, dtype, device, seed=5)
    with gpt2fast.use_backend(backend):
        y = ops.gelu_mlp(x, *weights)
    assert y.dtype == dtype and y.shape == x.shape
    # Two matmuls, each summing thousands of rounded products: a few ulps of the output's scale.
    assert_close(y, naive_gelu_mlp(x, *weights), scale=3)


@pytest.mark.parametrize("shape,hidden", [MLP_SHAPES[1], MLP_SHAPES[2], MLP_SHAPES[5]], ids=str)
def test_gelu_mlp_equals_linear_bias_gelu_linear(backend, device, dtype, shape, hidden):
    x = randn(*shape, dtype=dtype, device=device, seed=6)
    w_fc, b_fc, w_proj, b_proj = mlp_weights(shape[-1], hidden, dtype, device, seed=7)
    with gpt2fast.use_backend(backend):
        fused = ops.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj)
        composed = ops.bias_gelu(x @ w_fc, b_fc) @ w_proj + b_proj
    # The composition rounds its hidden activations to dtype; a fused kernel may keep them in fp32.
    assert_close(fused, composed.double(), scale=3)


def test_gelu_mlp_non_contiguous_input(backend, device):
    x = randn(77, 2, 64, device=device, seed=8).transpose(0, 1)
    w_fc, b_fc, w_proj, b_proj = mlp_weights(64, 256, torch.float32, device, seed=9)
    w_fc = w_fc.T.contiguous().T  # column-major: a transposed view, as of an nn.Linear weight
    assert not (x.is_contiguous() or w_fc.is_contiguous())
    with gpt2fast.use_backend(backend):
        y = ops.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj)
    assert_close(y, naive_gelu_mlp(x, w_fc, b_fc, w_proj, b_proj), scale=3)


@pytest.mark.parametrize("shape,hidden", [((2, 5, 64), 256), ((1, 3, 1000), 2000)], ids=str)
def test_gelu_mlp_backward_matches_naive(backend, device, shape, hidden):
    x = randn(*shape, device=device, seed=10).requires_grad_()
    weights = mlp_weights(shape[-1], hidden, torch.float32, device, seed=11, requires_grad=True)
    grad_y = randn(*shape, device=device, seed=12)
    with gpt2fast.use_backend(backend):
        loss = (ops.gelu_mlp(x, *weights) * grad_y).sum()
    grads = torch.autograd.grad(loss, (x, *weights))

    leaves64 = [t.detach().double().requires_grad_() for t in (x, *weights)]
    loss64 = (naive_gelu_mlp(*leaves64) * grad_y.double()).sum()
    expected = torch.autograd.grad(loss64, leaves64)
    for name, got, want in zip(["x", "w_fc", "b_fc", "w_proj", "b_proj"], grads, expected):
        assert_close(got, want, scale=4, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("C", [768, 1600])
def test_gelu_mlp_gpt2_shapes_on_gpu(backend, dtype, C):
    x = randn(4, 1024, C, dtype=dtype, device="cuda", seed=13)
    weights = mlp_weights(C, 4 * C, dtype, "cuda", seed=14)
    with gpt2fast.use_backend(backend):
        y = ops.gelu_mlp(x, *weights)
    assert_close(y, naive_gelu_mlp(x, *weights), scale=3)
