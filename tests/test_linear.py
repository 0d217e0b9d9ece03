"""ops.linear: x @ W + b with weights [in, out], including its split-K path for a few rows on a CPU."""
import pytest
import torch

from gpt2fast import ops
from gpt2fast.ops.reference import SPLIT_K_MAX_ROWS
from conftest import assert_close, randn


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# Rows from 1 (decode) past the split-K limit; inner widths divisible by 2 and 3 or not (then plain addmm).
@pytest.mark.parametrize("shape", [(1, 1, 768), (3, 1, 96), (2, 4, 102), (1, SPLIT_K_MAX_ROWS + 1, 96), (5, 77),
                                   (1, 1, 101)], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_matches_fp64_on_every_path(threads, shape, with_bias):
    K, N = shape[-1], 37
    x = randn(*shape, seed=1)
    w = randn(K, N, seed=2, scale=K ** -0.5)
    b = randn(N, seed=3) if with_bias else None
    y = ops.linear(x, w, b)
    expected = x.double() @ w.double() + (b.double() if with_bias else 0)
    assert y.shape == (*shape[:-1], N) and y.dtype == torch.float32
    assert_close(y, expected, scale=2)


def test_linear_gradients_on_the_split_path(threads):
    x = randn(1, 2, 64, seed=4).requires_grad_()
    w = randn(64, 16, seed=5).requires_grad_()
    b = randn(16, seed=6).requires_grad_()
    ops.linear(x, w, b).square().sum().backward()
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    (xd @ wd + bd).square().sum().backward()
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        assert_close(got, want, scale=4)
