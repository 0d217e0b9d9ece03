"""The triton backend's quantized_linear (kernels/quantized_linear.py): every element written and right for int8
and bf16 weights, with and without scale and bias, at odd sizes; strided inputs; dispatch and refusals; the
custom op. Without CUDA it runs in triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
import logging

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from gpt2fast.ops import reference
from gpt2fast.ops import triton_backend as tb
from conftest import assert_close, fallback_records, randn
from test_triton_backend import DEVICE, needs_triton

pytestmark = needs_triton

# (x's shape, N): M = 1, 3, 16 and 65 (row blocks of 16, 16, 16 and 64, the second of one row), leading
# batch dims, 17 rows (a block of 32); K = 77 and 300 (one partial K step, then three, the last of 44), N = 33
# and 130 (64-column blocks, the last of 1 or 2).
SHAPES = [((1, 77), 33), ((3, 77), 33), ((16, 77), 33), ((65, 77), 33), ((2, 3, 77), 33), ((17, 300), 130)]
# weight dtype and whether it has a scale: int8 needs one, bf16 may have one
WEIGHTS = {"int8": (torch.int8, True), "bf16-scaled": (torch.bfloat16, True), "bf16": (torch.bfloat16, False)}


def quantized_weights(N, K, kind, seed=0):
    """(weight [N, K], scale [N] or None), dequantizing to about N(0, 1/K) so that outputs stay O(1); int8
    weights anywhere in [-127, 127], scales positive and all different."""
    dtype, scaled = WEIGHTS[kind]
    g = torch.Generator().manual_seed(seed)
    std = max(K, 1) ** -0.5
    scale = (0.5 + torch.rand(N, generator=g)) * std
    if dtype == torch.int8:  # uniform on [-127, 127]: a standard deviation of 73
        return torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE), (scale / 73).to(DEVICE)
    if scaled:
        return randn(N, K, dtype=torch.bfloat16, device=DEVICE, seed=seed + 1), scale.to(DEVICE)
    return randn(N, K, dtype=torch.bfloat16, device=DEVICE, seed=seed + 1, scale=std), None


def make_inputs(shape, N, kind, with_bias, dtype=torch.float32, seed=0):
    x = randn(*shape, dtype=dtype, device=DEVICE, seed=seed)
    weight, scale = quantized_weights(N, shape[-1], kind, seed + 1)
    bias = randn(N, dtype=dtype, device=DEVICE, seed=seed + 3) if with_bias else None
    return x, weight, scale, bias


def naive_quantized_linear(x, weight, scale, bias):
    w = weight.double() if scale is None else weight.double() * scale.double()[:, None]
    return x.double() @ w.T + (0 if bias is None else bias.double())


# ---- every element written, right ----


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("shape,N", SHAPES, ids=str)
def test_writes_every_output_and_matches_naive(poisoned_empty, dtype, shape, N, kind, with_bias):
    x, weight, scale, bias = make_inputs(shape, N, kind, with_bias, dtype)
    y = tb.quantized_linear_op(x, weight, scale, bias)
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    assert_close(y, naive_quantized_linear(x, weight, scale, bias), scale=2)  # NaN anywhere fails here


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_gpt2_width_at_batch_1(poisoned_empty, kind):
    """GPT-2's fused QKV projection for one token: K = 768 in six steps, 2304 outputs in 36 column blocks."""
    x, weight, scale, bias = make_inputs((1, 1, 768), 2304, kind, with_bias=True, seed=5)
    assert_close(tb.quantized_linear_op(x, weight, scale, bias), naive_quantized_linear(x, weight, scale, bias),
                 scale=2)


def test_strided_inputs(poisoned_empty):
    """x a transposed view, and the weight stored [K, N] and handed over transposed."""
    x = randn(77, 5, device=DEVICE, seed=6).T
    weight, scale = quantized_weights(33, 77, "int8", seed=7)
    weight = weight.T.contiguous().T
    assert weight.stride() == (1, 33)
    bias = randn(33, device=DEVICE, seed=8)
    assert_close(tb.quantized_linear_op(x, weight, scale, bias), naive_quantized_linear(x, weight, scale, bias))


def test_no_rows():
    x, weight, scale, bias = make_inputs((2, 0, 77), 33, "int8", with_bias=True)
    assert tb.quantized_linear_op(x, weight, scale, bias).shape == (2, 0, 33)


# ---- dispatch ----


@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "grad"])
def test_ops_run_the_kernel_and_agree_with_the_reference(grad_enabled, monkeypatch):
    """Under use_backend("triton") ops.quantized_linear runs the kernel (grad mode on or off: nothing requires
    grad) and matches the reference backend."""
    x, weight, scale, bias = make_inputs((2, 3, 77), 33, "int8", with_bias=True, seed=9)
    calls = []
    monkeypatch.setattr(tb, "quantized_linear_op", lambda *a, _op=tb.quantized_linear_op: calls.append(1) or _op(*a))
    with torch.set_grad_enabled(grad_enabled), gpt2fast.use_backend("triton"):
        y = ops.quantized_linear(x, weight, scale, bias)
    assert calls == [1]
    torch.testing.assert_close(y, reference.quantized_linear(x, weight, scale, bias), rtol=1e-5, atol=1e-5)


def test_inputs_requiring_grad_run_the_kernel_without_grad_mode(monkeypatch):
    x, weight, scale, bias = make_inputs((3, 77), 33, "bf16-scaled", with_bias=True, seed=10)
    x.requires_grad_()
    calls = []
    monkeypatch.setattr(tb, "quantized_linear_op", lambda *a, _op=tb.quantized_linear_op: calls.append(1) or _op(*a))
    with torch.no_grad(), gpt2fast.use_backend("triton"):
        y = ops.quantized_linear(x, weight, scale, bias)
    assert calls == [1]
    assert_close(y, naive_quantized_linear(x.detach(), weight, scale, bias))


REFUSALS = {
    "x-grad": (dict(grad="x"), "inputs that require grad"),
    "weight-grad": (dict(grad="weight"), "inputs that require grad"),
    "scale-grad": (dict(grad="scale"), "inputs that require grad"),
    "float64": (dict(dtype=torch.float64), "dtype torch.float64"),
    "width0": (dict(K=0), "width 0"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_inputs_get_the_reference_and_one_log_line(case, fresh_log, monkeypatch, caplog):
    changes, reason = REFUSALS[case]
    monkeypatch.setattr(tb, "quantized_linear_op", lambda *a: pytest.fail("the kernel ran on an input it refuses"))
    kind = "bf16-scaled" if changes.get("grad") == "weight" else "int8"  # an int8 tensor cannot require grad
    x, weight, scale, bias = make_inputs((3, changes.get("K", 77)), 33, kind, True, changes.get("dtype", torch.float32))
    if "grad" in changes:
        dict(x=x, weight=weight, scale=scale)[changes["grad"]].requires_grad_()
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        for _ in range(2):
            y = ops.quantized_linear(x, weight, scale, bias)
            assert_close(y.detach(), naive_quantized_linear(x.detach(), weight.detach(), scale.detach(), bias))
    records = fallback_records(caplog)
    assert len(records) == 1 and "quantized_linear" in records[0] and reason in records[0], records


def test_cpu_tensors_are_refused_unless_interpreting(fresh_log, monkeypatch, caplog):
    monkeypatch.setattr(tb, "_interpreted", False)
    monkeypatch.setattr(tb, "quantized_linear_op", lambda *a: pytest.fail("the kernel ran on CPU tensors"))
    x, weight, scale, bias = (t.cpu() for t in make_inputs((3, 77), 33, "int8", with_bias=True))
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        assert_close(ops.quantized_linear(x, weight, scale, bias), naive_quantized_linear(x, weight, scale, bias))
    records = fallback_records(caplog)
    assert len(records) == 1 and "tensors on cpu: Triton runs CUDA tensors" in records[0], records


# ---- the custom op ----


@pytest.mark.parametrize("kind,with_bias", [("int8", True), ("bf16", False)], ids=["int8-bias", "bf16-plain"])
def test_custom_op_passes_opcheck(kind, with_bias):
    torch.library.opcheck(tb.quantized_linear_op, make_inputs((2, 3, 77), 33, kind, with_bias))  # schema, fake


def test_torch_compile_fullgraph_traces_the_custom_op():
    args = make_inputs((2, 77), 33, "int8", with_bias=True)
    eager = tb.quantized_linear(*args)
    torch.testing.assert_close(torch.compile(tb.quantized_linear, fullgraph=True)(*args), eager)
