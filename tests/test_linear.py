"""ops.linear (x @ W + b, weights [in, out]) and ops.lm_head (x @ W^T, W the [V, C] token embedding) on every
backend against fp64, with the torch_cpu backend's own paths: split-K for a few rows, and the LM head's
transposed copy, remade whenever the weight changes."""
import math

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from gpt2fast.ops import registry, torch_cpu_backend
from gpt2fast.ops.torch_cpu_backend import ONEDNN_MAX_ROWS, ONEDNN_MIN_ROWS, SPLIT_K_MAX_ROWS, SPLIT_K_MIN_ROWS
from conftest import assert_close, randn


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# Rows from 1 (decode) past the split-K limit; inner widths divisible by 2 and 3 or not (then plain addmm).
SHAPES = [(1, 1, 768), (3, 1, 96), (2, 4, 102), (1, SPLIT_K_MAX_ROWS + 1, 96), (5, 77), (1, 1, 101), (1, 1600),
          (4, 16, 768), (ONEDNN_MAX_ROWS + 1, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_matches_fp64_on_every_path(backend, threads, shape, with_bias):
    K, N = shape[-1], 37
    x = randn(*shape, seed=1)
    w = randn(K, N, seed=2, scale=K ** -0.5)
    b = randn(N, seed=3) if with_bias else None
    with gpt2fast.use_backend(backend):
        y = ops.linear(x, w, b)
    expected = x.double() @ w.double() + (b.double() if with_bias else 0)
    assert y.shape == (*shape[:-1], N) and y.dtype == torch.float32
    assert_close(y, expected, scale=2)


def test_linear_gradients(backend, threads):
    x = randn(1, 2, 64, seed=4).requires_grad_()
    w = randn(64, 16, seed=5).requires_grad_()
    b = randn(16, seed=6).requires_grad_()
    with gpt2fast.use_backend(backend):
        ops.linear(x, w, b).square().sum().backward()
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    (xd @ wd + bd).square().sum().backward()
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        assert_close(got, want, scale=4)


@pytest.mark.parametrize("shape", [(1, 1, 768), (4, 1, 60), (2, 77, 64), (3, 1600)], ids=str)
@pytest.mark.parametrize("grad_mode", [False, True], ids=["inference", "grad"])
def test_lm_head_matches_fp64(backend, threads, shape, grad_mode):
    V = 1001
    x = randn(*shape, seed=7)
    w = randn(V, shape[-1], seed=8, scale=shape[-1] ** -0.5)
    with gpt2fast.use_backend(backend), torch.set_grad_enabled(grad_mode):
        y = ops.lm_head(x, w)
    assert y.shape == (*shape[:-1], V)
    assert_close(y, x.double() @ w.double().T, scale=2)


def test_lm_head_gradients(backend):
    x = randn(2, 3, 32, seed=9).requires_grad_()
    w = randn(50, 32, seed=10).requires_grad_()
    with gpt2fast.use_backend(backend):
        ops.lm_head(x, w).square().sum().backward()
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    (xd @ wd.T).square().sum().backward()
    assert_close(x.grad, xd.grad, scale=4)
    assert_close(w.grad, wd.grad, scale=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_and_lm_head_in_low_precision(backend, dtype):
    x = randn(1, 2, 64, seed=11, dtype=dtype)
    w, b, e = randn(64, 40, seed=12, dtype=dtype, scale=0.125), randn(40, seed=13, dtype=dtype), \
        randn(90, 64, seed=14, dtype=dtype, scale=0.125)
    with gpt2fast.use_backend(backend), torch.no_grad():
        y, logits = ops.linear(x, w, b), ops.lm_head(x, e)
    assert y.dtype == logits.dtype == dtype
    assert_close(y, x.double() @ w.double() + b.double(), scale=4)
    assert_close(logits, x.double() @ e.double().T, scale=4)


# ---- the torch_cpu backend: what it takes, and its LM head copy ----


def _runs_on_torch_cpu(op: str, *args) -> bool:
    with gpt2fast.use_backend("auto"):
        return registry.resolve(op, "cpu", args, {}) is ops.backends()["torch_cpu"].impls[op].fn


def test_torch_cpu_takes_the_rows_of_a_decode_step_only():
    w, e = randn(64, 16), randn(50, 64)
    assert _runs_on_torch_cpu("linear", randn(SPLIT_K_MAX_ROWS, 64), w)
    assert _runs_on_torch_cpu("linear", randn(SPLIT_K_MIN_ROWS, 64), w)
    assert not _runs_on_torch_cpu("linear", randn(SPLIT_K_MIN_ROWS - 1, 64), w)
    assert _runs_on_torch_cpu("linear", randn(ONEDNN_MIN_ROWS, 64), w)  # batched decoding: oneDNN, packed
    assert _runs_on_torch_cpu("linear", randn(ONEDNN_MAX_ROWS, 64), w)
    assert not _runs_on_torch_cpu("linear", randn(ONEDNN_MAX_ROWS + 1, 64), w)  # a prefill: MKL alone
    assert not _runs_on_torch_cpu("linear", randn(ONEDNN_MIN_ROWS, 64), w.clone().requires_grad_())  # training
    assert not _runs_on_torch_cpu("linear", randn(ONEDNN_MIN_ROWS, 64, dtype=torch.bfloat16), w.bfloat16())
    assert _runs_on_torch_cpu("lm_head", randn(1, 64), e)  # the packed copy pays from one row
    assert _runs_on_torch_cpu("lm_head", randn(ONEDNN_MAX_ROWS, 64), e)
    assert not _runs_on_torch_cpu("lm_head", randn(ONEDNN_MAX_ROWS + 1, 64), e)
    assert not _runs_on_torch_cpu("lm_head", randn(2, 64), e.requires_grad_())  # training uses the weight itself
    with torch.no_grad():
        assert _runs_on_torch_cpu("lm_head", randn(2, 64), e)
    with torch.inference_mode():
        inference_weight = randn(50, 64)
        assert not _runs_on_torch_cpu("lm_head", randn(2, 64), inference_weight)  # no version counter to watch
        assert not _runs_on_torch_cpu("linear", randn(ONEDNN_MIN_ROWS, 64), inference_weight.T)


# The kept copies, packed for oneDNN: the LM head's from one row, the linear weights' past split-K's rows.
ROWS = [1, ONEDNN_MIN_ROWS]


@pytest.fixture(params=ROWS, ids=lambda n: f"{n}rows")
def rows(request):
    return request.param


def _logits(x, w):
    with torch.no_grad():
        if x.dtype == torch.float32:  # (others run the reference)
            assert _runs_on_torch_cpu("lm_head", x, w)  # through the packed copy
        with gpt2fast.use_backend("torch_cpu"):
            return ops.lm_head(x, w)


def _expected(x, w):
    return x.double() @ w.detach().double().T


def test_lm_head_copy_follows_in_place_writes(rows):
    x, w = randn(rows, 32, seed=15), randn(40, 32, seed=16)
    assert_close(_logits(x, w), _expected(x, w))
    with torch.no_grad():
        w.mul_(-2)
    assert_close(_logits(x, w), _expected(x, w))


def test_packed_linear_weights_follow_in_place_writes():
    x, w, b = randn(ONEDNN_MIN_ROWS, 32, seed=15), randn(32, 24, seed=16), randn(24, seed=17)
    for _ in range(2):
        with torch.no_grad(), gpt2fast.use_backend("torch_cpu"):
            assert _runs_on_torch_cpu("linear", x, w)
            assert_close(ops.linear(x, w, b), x.double() @ w.double() + b.double())
            w.mul_(-2)


def test_a_square_weight_used_as_linear_and_as_lm_head_keeps_both_copies():
    """linear packs weight.T, the LM head the weight itself: neither may serve the other."""
    x, w = randn(ONEDNN_MIN_ROWS, 32, seed=26), randn(32, 32, seed=27)
    for _ in range(2):
        with torch.no_grad(), gpt2fast.use_backend("torch_cpu"):
            assert _runs_on_torch_cpu("linear", x, w) and _runs_on_torch_cpu("lm_head", x, w)
            assert_close(ops.linear(x, w), x.double() @ w.double())
            assert_close(ops.lm_head(x, w), x.double() @ w.double().T)


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])
def test_lm_head_copy_follows_optimizer_steps(fused, rows):
    """Fused AdamW on the CPU writes the weights without bumping their version counter."""
    x = randn(rows, 32, seed=17)
    w = torch.nn.Parameter(randn(40, 32, seed=18))
    optimizer = torch.optim.AdamW([w], lr=0.1, fused=fused)
    assert_close(_logits(x, w), _expected(x, w))
    w.grad = randn(40, 32, seed=19)
    version = w._version
    optimizer.step()
    assert fused == (w._version == version)  # the case the step hook exists for
    assert_close(_logits(x, w), _expected(x, w))


def test_lm_head_copy_follows_a_cast_and_back(rows):
    """A module's .to() gives the same Parameter new storage, which may land where the old one was."""
    x = randn(rows, 32, seed=20)
    layer = torch.nn.Embedding(40, 32)
    w = layer.weight
    assert_close(_logits(x, w), _expected(x, w))
    for dtype in (torch.float64, torch.float32):
        layer.to(dtype)
        with torch.no_grad():
            layer.weight.add_(1.0)
        assert_close(_logits(x.to(dtype), w), _expected(x, w), dtype=torch.float32)


def test_lm_head_copy_follows_new_data(rows):
    x, w = randn(rows, 32, seed=21), torch.nn.Parameter(randn(40, 32, seed=22))
    assert_close(_logits(x, w), _expected(x, w))
    w.data = randn(40, 32, seed=23)
    assert_close(_logits(x, w), _expected(x, w))


def test_lm_head_copy_goes_with_its_weight(rows):
    x, w = randn(rows, 32, seed=24), randn(40, 32, seed=25)
    _logits(x, w)
    assert w in torch_cpu_backend._COPIES
    held = len(torch_cpu_backend._COPIES)
    del w
    assert len(torch_cpu_backend._COPIES) == held - 1


def test_torch_cpu_decode_attention_reads_only_each_prefix():
    """Past each sequence's length the cache holds NaN: a path that read it would return NaN."""
    B, H, S, D = 3, 2, 9, 8
    q = randn(B, H, 1, D, seed=26)
    k, v = randn(B, H, S, D, seed=27), randn(B, H, S, D, seed=28)
    lengths = torch.tensor([1, 9, 4])
    for b, n in enumerate(lengths.tolist()):
        k[b, :, n:], v[b, :, n:] = math.nan, math.nan
    with gpt2fast.use_backend("torch_cpu"):
        got = ops.decode_attention(q, k, v, lengths)
    expected = ops.backends()["torch"].impls["decode_attention"].fn(q.double(), k.double(), v.double(), lengths)
    assert_close(got, expected)
