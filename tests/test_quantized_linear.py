"""ops.quantized_linear (x @ (weight * scale[:, None]).T + bias, weights stored int8 or bf16) on every backend
against fp64 math on the dequantized weights; the C++ CPU kernel in each of its builds (AMX, AVX-512, AVX2,
portable) that this CPU runs, writing into a poisoned output; the checks of the op's inputs.

tests/test_triton_quantized_linear.py has the Triton kernel's own cases."""
import logging

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from conftest import assert_close, fallback_records, randn

NATIVE = ops.backends()["native"].unavailable_reason() is None


def int8_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) + 0.5) / (127 * k ** 0.5)  # outputs of O(1) for x of O(1)
    return q, scale


def bf16_weight(n, k, seed, with_scale):
    w = randn(n, k, seed=seed, scale=k ** -0.5).to(torch.bfloat16)
    return w, (randn(n, seed=seed + 1).abs() + 0.5) if with_scale else None


WEIGHTS = {
    "int8": lambda n, k, seed: int8_weight(n, k, seed),
    "bf16": lambda n, k, seed: bf16_weight(n, k, seed, with_scale=False),
    "bf16_scaled": lambda n, k, seed: bf16_weight(n, k, seed, with_scale=True),
}


def expected(x, weight, scale, bias):
    w = weight.double() if scale is None else weight.double() * scale.double()[:, None]
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


# (x shape, out features): one row (decode) to many; widths 77 (no full vector), 768, 1600 (gpt2-xl)
SHAPES = [((1, 768), 33), ((3, 77), 130), ((16, 1600), 37), ((65, 768), 9), ((2, 5, 96), 64), ((1, 1, 1600), 4)]


@pytest.mark.parametrize("shape,n", SHAPES, ids=str)
@pytest.mark.parametrize("scheme", WEIGHTS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_matches_fp64_on_every_backend(backend, shape, n, scheme, with_bias):
    x = randn(*shape, seed=1)
    weight, scale = WEIGHTS[scheme](n, shape[-1], 2)
    bias = randn(n, seed=3) if with_bias else None
    with gpt2fast.use_backend(backend):
        y = ops.quantized_linear(x, weight, scale, bias)
    assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
    assert_close(y, expected(x, weight, scale, bias), scale=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_other_activation_dtypes_compute_in_fp32_or_better(backend, dtype):
    x = randn(4, 96, seed=4, dtype=dtype)
    weight, scale = int8_weight(20, 96, 5)
    bias = randn(20, seed=6, dtype=dtype)
    with gpt2fast.use_backend(backend):
        y = ops.quantized_linear(x, weight, scale, bias)
    assert y.dtype == dtype
    assert_close(y, expected(x, weight, scale, bias), scale=2)


def isas():
    if not NATIVE:
        return []
    from gpt2fast import _C
    return _C.quantized_linear_isas()


# The kernel's own cases: few rows (its dot-product form) and many (its broadcast form, x transposed, or on AMX
# its tile forms: int8 weights read in place by the int8 tiles, x in four 8-bit parts; bf16 weights staged for
# the bf16 tiles, x in three bf16 parts): 13 rows of width 1600 (one group of rows, padded; K in whole chunks of
# both tile forms, so int8 tiles read the weights in place), 16 of width 77 (one group, a single chunk of K, the
# last one short: the int8 tiles read a zero-padded copy), 28 of 1600 (two groups; 20 weight rows, not whole
# tiles: one tile in place, one copied), 64 of 300 by 97 (a block of outputs and one row past it; four groups of
# rows), 100 of 768 (seven groups, the last padded).
BUILD_SHAPES = [((1, 768), 2304), ((7, 77), 67), ((13, 1600), 20), ((16, 77), 100), ((28, 1600), 20),
                ((64, 300), 97), ((100, 768), 30)]
# The kernel also reads fp32 weights (in place, where a tile's weight rows are whole), which the op refuses.
BUILD_WEIGHTS = {**WEIGHTS, "fp32": lambda n, k, seed: (randn(n, k, seed=seed, scale=k ** -0.5), None)}


def many_rows_form(isa, weight):
    if isa == "amx" and weight != "fp32":
        return "amx-int8" if weight == "int8" else "amx-bf16"
    return {"portable": "dot", "avx2": "broadcast", "avx512": "broadcast", "amx": "broadcast"}[isa]


@pytest.mark.skipif(not NATIVE, reason="native backend unavailable")
@pytest.mark.parametrize("weight", ["int8", "bf16", "fp32"])
def test_the_build_cases_take_every_form_of_every_build(weight):
    from gpt2fast import _C
    for isa in isas():
        many = many_rows_form(isa, weight)
        forms = {_C.quantized_linear_form(shape[0], isa, weight) for shape, _ in BUILD_SHAPES}
        assert forms == {"dot", many}, isa


@pytest.mark.skipif(not NATIVE, reason="native backend unavailable")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("scheme", BUILD_WEIGHTS)
@pytest.mark.parametrize("shape,n", BUILD_SHAPES, ids=str)
def test_every_cpu_build_writes_every_output(shape, n, scheme, threads):
    """Each build this CPU runs, the output poisoned with NaN first; rows shared among 1 to 3 threads."""
    x = randn(*shape, seed=7)
    weight, scale = BUILD_WEIGHTS[scheme](n, shape[-1], 8)
    bias = randn(n, seed=9)
    want = expected(x, weight, scale, bias)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for isa in isas():
            out = torch.full((*shape[:-1], n), float("nan"))
            torch.ops.gpt2fast.quantized_linear_out_native(x, weight, scale, bias, out, isa)
            assert_close(out, want, scale=2, msg=lambda m, isa=isa: f"{isa}: {m}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not NATIVE, reason="native backend unavailable")
@pytest.mark.parametrize("scheme", ["int8", "bf16"])
@pytest.mark.parametrize("rows", [3, 24], ids=["few_rows", "many_rows"])
def test_every_cpu_build_carries_inf_and_nan_in_x_as_fp32_does(rows, scheme):
    """An inf or a NaN in a row of x makes that row's outputs what fp32 math makes them (inf times a weight: an
    inf of the product's sign, NaN where the weight is 0; NaN: NaN) and leaves the other rows alone: the tile
    forms' split of x into parts must not spread them."""
    x = randn(rows, 64, seed=10)
    x[1, 5], x[2, 9] = float("inf"), float("nan")
    weight, scale = WEIGHTS[scheme](40, 64, 11)
    weight[:, 5] = torch.where(torch.arange(40) % 2 == 0, 3, -3).to(weight.dtype)
    weight[0, 5] = 0
    w = weight.float() if scale is None else weight.float() * scale[:, None]
    want = x @ w.T
    assert want[1, 0].isnan() and want[1, 1:].isinf().all() and want[2].isnan().all()
    finite = torch.ones(rows, dtype=torch.bool)
    finite[1:3] = False
    for isa in isas():
        out = torch.full((rows, 40), 7.0)
        torch.ops.gpt2fast.quantized_linear_out_native(x, weight, scale, None, out, isa)
        torch.testing.assert_close(out[1:3], want[1:3], equal_nan=True, msg=lambda m, isa=isa: f"{isa}: {m}")
        assert_close(out[finite], expected(x[finite], weight, scale, None), scale=2,
                     msg=lambda m, isa=isa: f"{isa}: {m}")


@pytest.mark.skipif(not NATIVE, reason="native backend unavailable")
@pytest.mark.parametrize("scheme", ["int8", "bf16"])
def test_every_cpu_build_keeps_fp32_accuracy_for_rows_of_any_magnitude(scheme):
    """Rows of x from 1e-30 to 1e30 in size, a row of zeros, and rows whose values span 1e-4 to 1e4 (GPT-2's
    outlier features): each output within fp32's error of fp64 math, measured against the sum of the magnitudes
    of its products (the int8 tiles scale each row by its own power of two and cut it into 8-bit parts)."""
    torch.manual_seed(12)
    rows, k = 24, 256
    x = torch.randn(rows, k)
    magnitudes = torch.logspace(-30, 30, rows - 4)
    x[: rows - 4] *= magnitudes[:, None]
    x[rows - 4] = 0
    x[rows - 3:] *= torch.logspace(-4, 4, k)[torch.randperm(k)]
    weight, scale = WEIGHTS[scheme](40, k, 13)
    w = weight.double() if scale is None else weight.double() * scale.double()[:, None]
    want = x.double() @ w.T
    bound = x.double().abs() @ w.abs().T  # sum of |x w| per output
    for isa in isas():
        out = torch.full((rows, 40), float("nan"))
        torch.ops.gpt2fast.quantized_linear_out_native(x, weight, scale, None, out, isa)
        assert torch.isfinite(out).all(), isa
        error = (out.double() - want).abs()
        assert (error <= 1e-6 * bound + 1e-45).all(), (isa, (error / bound.clamp_min(1e-300)).max().item())


@pytest.mark.skipif(not NATIVE, reason="native backend unavailable")
def test_the_cpu_kernel_refuses_a_build_this_cpu_lacks():
    x, (weight, scale) = randn(1, 16), int8_weight(4, 16, 1)
    with pytest.raises(RuntimeError, match="isa must be one this CPU runs"):
        torch.ops.gpt2fast.quantized_linear_out_native(x, weight, scale, None, torch.empty(1, 4), "neon")


@pytest.mark.skipif(not NATIVE, reason="native backend unavailable")
def test_the_cpu_kernel_takes_rows_up_to_its_limit_and_refuses_more(caplog, fresh_log):
    """Up to 128 rows (a decode step, a short prompt), or 1024 where its AMX form runs; past that the reference."""
    nb = ops.native_backend
    limit = nb.QUANTIZED_AMX_MAX_ROWS if nb.QUANTIZED_AMX else nb.QUANTIZED_MAX_ROWS
    weight, scale = int8_weight(24, 32, 14)
    for rows, native in ((limit, True), (limit + 1, False)):
        x = randn(rows, 32, seed=15)
        taken = ops.registry.resolve("quantized_linear", "cpu", (x, weight, scale, None), {})
        assert (taken is nb.quantized_linear) == native, rows
        with caplog.at_level(logging.INFO, logger="gpt2fast"), gpt2fast.use_backend("native"):
            assert_close(ops.quantized_linear(x, weight, scale), expected(x, weight, scale, None), scale=2)
    assert f"{limit + 1} rows (the CPU kernel is for a decode step's" in " ".join(fallback_records(caplog))


@pytest.mark.skipif(not NATIVE, reason="native backend unavailable")
def test_gpt2fast_cpu_isa_picks_the_build_a_call_without_one_runs(monkeypatch):
    x, (weight, scale) = randn(24, 96, seed=12), int8_weight(40, 96, 13)
    for isa in isas():
        want = torch.empty(24, 40)
        torch.ops.gpt2fast.quantized_linear_out_native(x, weight, scale, None, want, isa)
        monkeypatch.setenv("GPT2FAST_CPU_ISA", isa)
        assert torch.equal(torch.ops.gpt2fast.quantized_linear_native(x, weight, scale, None), want), isa
    monkeypatch.setenv("GPT2FAST_CPU_ISA", "neon")
    with pytest.raises(RuntimeError, match="GPT2FAST_CPU_ISA must name a build this CPU runs .*'neon'"):
        torch.ops.gpt2fast.quantized_linear_native(x, weight, scale, None)


@pytest.mark.skipif(not NATIVE, reason="native backend unavailable")
def test_auto_runs_the_cpu_kernel_and_falls_back_by_reason(caplog, fresh_log):
    x, (weight, scale) = randn(2, 32, seed=1), int8_weight(8, 32, 2)
    assert ops.registry.resolve("quantized_linear", "cpu", (x, weight, scale, None), {}) is \
        ops.native_backend.quantized_linear
    with caplog.at_level(logging.INFO, logger="gpt2fast"), gpt2fast.use_backend("native"):
        y = ops.quantized_linear(x.bfloat16(), weight, scale)  # bf16 activations: the kernel takes fp32 only
        g = ops.quantized_linear(x.clone().requires_grad_(), weight, scale)  # no backward in the kernel
        bf16 = torch.randn(8, 32).bfloat16().requires_grad_()
        gw = ops.quantized_linear(x, bf16)  # a bf16 weight can require grad too
    assert_close(y, expected(x.bfloat16(), weight, scale, None), scale=2)
    g.sum().backward()  # the reference ran, with autograd
    gw.sum().backward()
    assert_close(bf16.grad.double(), x.double().sum(0).expand(8, 32), dtype=torch.bfloat16)
    messages = " ".join(fallback_records(caplog))
    assert "x of dtype torch.bfloat16" in messages and "require grad" in messages


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, s: ops.quantized_linear(x, w.float(), s), TypeError, "weight must be int8 or bfloat16"),
    (lambda x, w, s: ops.quantized_linear(x, w), ValueError, "int8 weights need their scale"),
    (lambda x, w, s: ops.quantized_linear(x[:, :10], w, s), ValueError, "weight has shape"),
    (lambda x, w, s: ops.quantized_linear(x, w, s[:3]), ValueError, "scale has shape"),
    (lambda x, w, s: ops.quantized_linear(x, w, s.double()), TypeError, "scale must be float32"),
    (lambda x, w, s: ops.quantized_linear(x, w, s, torch.zeros(8, dtype=torch.float64)), TypeError, "bias is"),
    (lambda x, w, s: ops.quantized_linear(x, w, s, torch.zeros(7)), ValueError, "bias has shape"),
    (lambda x, w, s: ops.quantized_linear(x.long(), w, s), TypeError, "x must be a floating-point tensor"),
    (lambda x, w, s: ops.quantized_linear(x, w, s.to("meta")), ValueError, "scale is on meta"),
], ids=["fp32 weight", "no scale", "width", "scale shape", "scale dtype", "bias dtype", "bias shape", "int x",
        "device"])
def test_bad_inputs_are_refused_by_name(call, error, match):
    x, (weight, scale) = randn(2, 16), int8_weight(8, 16, 1)
    with pytest.raises(error, match=match):
        call(x, weight, scale)
