"""The CUDA kernels of layer_norm, bias_gelu and gelu_mlp (csrc/layer_norm.cu, csrc/bias_gelu.cu), as the
operators gpt2fast::layer_norm_native, bias_gelu_native, gelu_mlp_native and their backward operators; and
bias_gelu's CPU kernel (csrc/bias_gelu_cpu.cpp: fp32, forward only).

Without a GPU: the operators' schemas, the backend's refusals (CPU tensors, widths, dtypes, an extension
built before these operators) and the autograd formulas' glue, with the backward operators stood in for
by fp64 torch math; the CPU bias_gelu against fp64. On a GPU: every output against fp64 oracles at GPT-2's shapes, each operator's checks,
opcheck, torch.compile and replay from a CUDA graph. test_ops_layer_norm.py and test_ops_mlp.py run the
kernels through the `backend` fixture too; tests/cuda/test_layer_norm.cu and test_bias_gelu.cu check them
without Python.
"""
import logging
import math
import types

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from gpt2fast.ops import custom_ops, native_backend as nb
from conftest import assert_close, fallback_records, randn
from test_ops_layer_norm import make_inputs, naive_layer_norm
from test_ops_mlp import mlp_weights, naive_gelu_mlp, naive_gelu_tanh

REASON = ops.backends()["native"].unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"native backend unavailable: {REASON}")

SCHEMAS = {
    "layer_norm_native": "gpt2fast::layer_norm_native(Tensor x, Tensor weight, Tensor bias, float eps, "
                         "Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor)",
    "layer_norm_backward_native": "gpt2fast::layer_norm_backward_native(Tensor grad_y, Tensor? grad_h, Tensor h, "
                                  "Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)",
    "bias_gelu_native": "gpt2fast::bias_gelu_native(Tensor x, Tensor bias) -> Tensor",
    "bias_gelu_backward_native": "gpt2fast::bias_gelu_backward_native(Tensor grad_y, Tensor x, Tensor bias) "
                                 "-> (Tensor, Tensor)",
    "gelu_mlp_native": "gpt2fast::gelu_mlp_native(Tensor x, Tensor w_fc, Tensor b_fc, Tensor w_proj, "
                       "Tensor b_proj) -> (Tensor, Tensor, Tensor)",
}
UNBUILT = sorted(op for op in SCHEMAS if REASON is None and not hasattr(torch.ops.gpt2fast, op))
needs_ops = pytest.mark.skipif(bool(UNBUILT), reason=f"gpt2fast._C was built before {', '.join(UNBUILT)} "
                                                     f"existed: rebuild it (pip install --no-build-isolation -e .)")
needs_cuda_kernels = pytest.mark.skipif(REASON is not None or not nb._has_kernel("layer_norm_native", "cuda"),
                                        reason="gpt2fast._C has no CUDA kernels (built without CUDA)")


def on_cuda(*shape, dtype=torch.float32):
    """A stand-in for a CUDA tensor, enough for the backend's `supports` (no GPU needed to ask)."""
    return types.SimpleNamespace(shape=torch.Size(shape), dtype=dtype, device=torch.device("cuda"))


# ---- without a GPU ----


@needs_ops
@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_operator_schemas(op):
    assert str(getattr(torch.ops.gpt2fast, op).default._schema) == SCHEMAS[op]


@needs_ops
@needs_cuda_kernels
@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_operators_have_cuda_kernels(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gpt2fast::{op}", "CUDA")


def ln_args(width=64, dtype=torch.float32, device="cpu"):
    x, residual, weight, bias = make_inputs((3, width), dtype, device, seed=1)
    return x, weight, bias, 1e-5, residual


def mlp_args(dtype=torch.float32, device="cpu"):
    return (randn(4, 33, dtype=dtype, device=device, seed=2), *mlp_weights(33, 100, dtype, device, seed=3))


CALLS = {
    "layer_norm": ln_args,
    "bias_gelu": lambda: (randn(5, 17, seed=4), randn(17, seed=5)),
    "gelu_mlp": mlp_args,
}


def oracle(op, *args) -> tuple:
    """The op's outputs in fp64, as a tuple."""
    if op == "layer_norm":
        x, weight, bias, eps, residual = args
        h = x.double() + residual.double()
        return naive_layer_norm(h, weight, bias, eps), h
    if op == "bias_gelu":
        x, bias = args
        return (naive_gelu_tanh(x.double() + bias.double()),)
    return (naive_gelu_mlp(*args),)


@pytest.mark.parametrize("op", ["layer_norm", "gelu_mlp"])
def test_cpu_tensors_get_the_reference_and_one_log_line(fresh_log, caplog, op):
    """These kernels run on CUDA tensors only: on CPU ones the backend refuses, once per reason, and the
    reference runs (the operators have no CPU kernel, so a kernel call would raise)."""
    args = CALLS[op]()
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("native"):
        for _ in range(2):
            got, want = getattr(ops, op)(*args), oracle(op, *args)
            got = got if isinstance(got, tuple) else (got,)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert_close(g, w)
    records = fallback_records(caplog)
    assert len(records) == 1 and op in records[0], records
    assert "tensors on cpu: gpt2fast._C has no cpu kernel of" in records[0], records


def test_refusals_name_their_reason(monkeypatch):
    monkeypatch.setattr(nb, "_has_kernel", lambda op, device_type: True)
    weight = torch.empty(8193)
    assert nb._layer_norm_supports(on_cuda(2, 8192), weight, weight) is None
    assert nb._layer_norm_supports(on_cuda(2, 8193), weight, weight) == "width 8193 (the kernels take 1 to 8192)"
    assert "dtype torch.float64" in nb._layer_norm_supports(on_cuda(2, 768, dtype=torch.float64), weight, weight)
    bias_gelu, gelu_mlp = (ops.backends()["native"].impls[op].supports for op in ("bias_gelu", "gelu_mlp"))
    assert bias_gelu(on_cuda(2, 3072), None) is None and gelu_mlp(on_cuda(2, 768), None, None, None, None) is None
    assert "dtype torch.float64" in bias_gelu(on_cuda(2, 3072, dtype=torch.float64), None)


def test_an_extension_built_before_the_operators_is_refused_with_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(nb, "_has_kernel", lambda op, device_type: False)
    weight = torch.empty(768)
    for reason in (nb._layer_norm_supports(on_cuda(2, 768), weight, weight),
                   ops.backends()["native"].impls["bias_gelu"].supports(on_cuda(2, 3072), None),
                   ops.backends()["native"].impls["gelu_mlp"].supports(on_cuda(2, 768), None, None, None, None)):
        assert "has no cuda kernel of" in reason and "--no-build-isolation" in reason


class Context(types.SimpleNamespace):
    """What setup_context and the backward formula see of autograd's ctx."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def layer_norm_backward64(grad_y, grad_h, h, weight):
    """layer_norm_backward_native's (dh, dweight, dbias) in fp64, by autograd through naive_layer_norm."""
    leaves = [t.detach().double().requires_grad_() for t in (h, weight, torch.zeros_like(weight))]
    dh, dweight, dbias = torch.autograd.grad(naive_layer_norm(*leaves, 1e-5), leaves, grad_y.double())
    return dh if grad_h is None else dh + grad_h.double(), dweight, dbias


def bias_gelu_backward64(grad_y, x, bias):
    """bias_gelu_backward_native's (dx, dbias) in fp64, by autograd through naive_gelu_tanh."""
    z = (x.double() + bias.double()).requires_grad_()
    (dz,) = torch.autograd.grad(naive_gelu_tanh(z), z, grad_y.double())
    return dz, dz.reshape(-1, x.shape[-1]).sum(0)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_autograd_formula_routes_the_gradients(with_residual):
    """setup_context saves h (x without a residual); dh reaches x, and residual when there is one."""
    backward, setup_context = custom_ops.layer_norm_autograd(
        lambda grad_y, grad_h, h, weight, mean, rstd: tuple(t.float() for t in layer_norm_backward64(grad_y, grad_h,
                                                                                                    h, weight)))
    x, weight, bias, eps, residual = ln_args(100)
    residual = residual if with_residual else None
    h = x + residual if with_residual else torch.empty(0)
    mean, rstd = torch.empty(3), torch.empty(3)  # only passed on to the backward operator, stood in for here
    ctx = Context()
    setup_context(ctx, (x, weight, bias, eps, residual), (None, h, mean, rstd))
    grad_y, grad_h = randn(3, 100, seed=6), randn(3, 100, seed=7)
    dx, dweight, dbias, d_eps, d_residual = backward(ctx, grad_y, grad_h, None, None)

    leaves = [t.double().requires_grad_() for t in (x, weight, bias, residual if with_residual else x)]
    h64 = leaves[0] + leaves[3] if with_residual else leaves[0]
    loss = (naive_layer_norm(h64, *leaves[1:3], eps) * grad_y.double()).sum()
    if with_residual:
        loss = loss + (h64 * grad_h.double()).sum()
    want = torch.autograd.grad(loss, leaves[:3] + leaves[3:] * with_residual)
    assert d_eps is None
    for got, expected in zip((dx, dweight, dbias, d_residual), want):
        assert_close(got, expected)
    assert (d_residual is None) != with_residual


@pytest.mark.parametrize("saved", [True, False], ids=["saved", "recomputed"])
def test_gelu_mlp_autograd_formula_matches_fp64_autograd(saved):
    """The formula's matmuls and b_fc wiring (pre excludes b_fc: the bias_gelu backward adds it), from a saved
    pre or, where the forward kept none (the triton op's save_pre=False), a recomputed one."""
    backward, setup_context = custom_ops.gelu_mlp_autograd(
        lambda grad_y, x, bias: tuple(t.float() for t in bias_gelu_backward64(grad_y, x, bias)))
    x = randn(2, 5, 33, seed=8)
    weights = mlp_weights(33, 100, torch.float32, "cpu", seed=9)
    w_fc, b_fc, w_proj, _ = weights
    pre = x @ w_fc
    act = naive_gelu_tanh(pre + b_fc).float()
    ctx = Context()
    setup_context(ctx, (x, *weights, saved), (None, act, pre if saved else torch.empty(0)))
    grad_y = randn(2, 5, 33, seed=10)
    *grads, d_saved = backward(ctx, grad_y, None, None)
    assert d_saved is None

    leaves = [t.double().requires_grad_() for t in (x, *weights)]
    want = torch.autograd.grad((naive_gelu_mlp(*leaves) * grad_y.double()).sum(), leaves)
    for name, got, expected in zip(["x", "w_fc", "b_fc", "w_proj", "b_proj"], grads, want):
        assert got.shape == expected.shape, name
        assert_close(got, expected, scale=4, msg=lambda m, name=name: f"grad {name}: {m}")


# ---- on a GPU: the operators called directly ----


def on_gpu(test):
    """GPT-2 shapes on a CUDA device, through the CUDA kernels of an extension built with these operators."""
    return pytest.mark.gpu(needs_ops(needs_cuda_kernels(test)))


def poison_allocator(*like):
    """Frees NaN-filled tensors shaped as the outputs to come, so that the caching allocator likely hands
    their blocks to those outputs and an element a kernel fails to write shows (the bindings allocate with
    at::empty, which no test can patch; each test also runs twice, on different inputs)."""
    for shape, dtype in like:
        torch.full(shape, math.nan, dtype=dtype, device="cuda")


LN_SHAPES = [(8, 1024, 768), (4, 1024, 1600), (77, 1000), (3, 8192)]


@on_gpu
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
def test_layer_norm_forward_and_backward_gpt2_shapes(dtype, shape, with_residual):
    for seed in (0, 100):
        x, residual, weight, bias = make_inputs(shape, dtype, "cuda", seed=seed)
        residual = residual if with_residual else None
        poison_allocator((shape, dtype), (shape, dtype), (shape[:-1], torch.float32), (shape[:-1], torch.float32))
        y, h, mean, rstd = torch.ops.gpt2fast.layer_norm_native(x, weight, bias, 1e-5, residual)
        h64 = x.double() + residual.double() if with_residual else x.double()
        assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32 and mean.shape == shape[:-1]
        if with_residual:
            assert_close(h, h64)
            h64 = h.double()  # the kernel normalises h as rounded to dtype
        else:
            assert h.numel() == 0
        assert_close(y, naive_layer_norm(h64, weight, bias, 1e-5))
        assert_close(mean, h64.mean(-1), dtype=torch.float32)
        assert_close(rstd, (h64.var(-1, unbiased=False) + 1e-5).rsqrt(), dtype=torch.float32)

        grad_y, grad_h = randn(*shape, dtype=dtype, device="cuda", seed=seed + 7), None
        if with_residual:
            grad_h = randn(*shape, dtype=dtype, device="cuda", seed=seed + 8)
        saved = h if with_residual else x
        poison_allocator((shape, dtype), ((shape[-1],), dtype), ((shape[-1],), dtype))
        dh, dweight, dbias = torch.ops.gpt2fast.layer_norm_backward_native(grad_y, grad_h, saved, weight, mean, rstd)
        want_dh, want_dweight, want_dbias = layer_norm_backward64(grad_y, grad_h, saved, weight)
        rows = math.prod(shape[:-1])
        assert_close(dh, want_dh, scale=2)
        # dweight and dbias sum over every row: their rounding error grows with the row count.
        assert_close(dweight, want_dweight, scale=2 * rows ** 0.5)
        assert_close(dbias, want_dbias, scale=2 * rows ** 0.5)


@on_gpu
@pytest.mark.parametrize("shape", [(8, 1024, 3072), (2, 1024, 6400), (77, 1000)], ids=str)
def test_bias_gelu_forward_and_backward_gpt2_shapes(dtype, shape):
    for seed in (0, 100):
        x = randn(*shape, dtype=dtype, device="cuda", seed=seed, scale=2.5)
        bias = randn(shape[-1], dtype=dtype, device="cuda", seed=seed + 1)
        poison_allocator((shape, dtype))
        y = torch.ops.gpt2fast.bias_gelu_native(x, bias)
        assert_close(y, naive_gelu_tanh(x.double() + bias.double()), scale=2)

        grad_y = randn(*shape, dtype=dtype, device="cuda", seed=seed + 2)
        poison_allocator((shape, dtype), ((shape[-1],), dtype))
        dx, dbias = torch.ops.gpt2fast.bias_gelu_backward_native(grad_y, x, bias)
        want_dx, want_dbias = bias_gelu_backward64(grad_y, x, bias)
        assert_close(dx, want_dx, scale=2)
        assert_close(dbias, want_dbias, scale=2 * math.prod(shape[:-1]) ** 0.5)


@on_gpu
@pytest.mark.parametrize("C", [768, 1600])
def test_gelu_mlp_outputs_gpt2_shapes(dtype, C):
    for seed in (0, 100):
        x = randn(4, 1024, C, dtype=dtype, device="cuda", seed=seed)
        weights = mlp_weights(C, 4 * C, dtype, "cuda", seed=seed + 1)
        poison_allocator(((4, 1024, 4 * C), dtype), ((4, 1024, C), dtype))
        y, act, pre = torch.ops.gpt2fast.gelu_mlp_native(x, *weights)
        assert act.shape == pre.shape == (4, 1024, 4 * C) and y.shape == x.shape
        pre64 = x.double() @ weights[0].double()
        assert_close(pre, pre64, scale=2)
        # act is the GELU of pre as rounded to dtype (plus b_fc): one rounding more than the oracle's.
        assert_close(act, naive_gelu_tanh(pre.double() + weights[1].double()), scale=2)
        assert_close(y, naive_gelu_mlp(x, *weights), scale=3)


@on_gpu
def test_non_contiguous_inputs():
    x = randn(77, 3, 1000, device="cuda", seed=11, scale=2.0, shift=1.0).transpose(0, 1)
    weight = randn(2000, device="cuda", seed=12, shift=1.0)[::2]
    bias = randn(1000, device="cuda", seed=13)
    residual = randn(3, 1000, 77, device="cuda", seed=14).transpose(1, 2)
    y, h, _, _ = torch.ops.gpt2fast.layer_norm_native(x, weight, bias, 1e-5, residual)
    assert_close(h, x.double() + residual.double())
    assert_close(y, naive_layer_norm(h.double(), weight, bias, 1e-5))
    assert_close(torch.ops.gpt2fast.bias_gelu_native(x, bias), naive_gelu_tanh(x.double() + bias.double()), scale=2)
    w_fc, b_fc, w_proj, b_proj = mlp_weights(1000, 256, torch.float32, "cuda", seed=15)
    w_fc = w_fc.T.contiguous().T  # column-major, as a transposed nn.Linear weight
    y, _, _ = torch.ops.gpt2fast.gelu_mlp_native(x, w_fc, b_fc, w_proj, b_proj)
    assert_close(y, naive_gelu_mlp(x, w_fc, b_fc, w_proj, b_proj), scale=3)



def cuda_ones(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype, device="cuda")


VALID_CALLS = {  # per operator: a call it takes, as (name, shape or value) pairs
    "layer_norm_native": dict(x=(2, 8), weight=(8,), bias=(8,), eps=1e-5, residual=None),
    "layer_norm_backward_native": dict(grad_y=(2, 8), grad_h=None, h=(2, 8), weight=(8,), mean=(2,), rstd=(2,)),
    "bias_gelu_native": dict(x=(2, 8), bias=(8,)),
    "bias_gelu_backward_native": dict(grad_y=(2, 8), x=(2, 8), bias=(8,)),
    "gelu_mlp_native": dict(x=(2, 8), w_fc=(8, 32), b_fc=(32,), w_proj=(32, 8), b_proj=(8,)),
}
BAD_ARGUMENTS = {  # name: (operator, the arguments changed, the error it must raise)
    "cpu": ("layer_norm_native", lambda: dict(x=torch.ones(2, 8)), "x must be a CUDA tensor"),
    "wide": ("layer_norm_native", lambda: dict(x=cuda_ones(2, 8193), weight=cuda_ones(8193), bias=cuda_ones(8193)),
             "1 to 8192 wide"),
    "narrow": ("layer_norm_native", lambda: dict(x=cuda_ones(2, 0), weight=cuda_ones(0), bias=cuda_ones(0)),
               "1 to 8192 wide"),
    "weight": ("layer_norm_native", lambda: dict(weight=cuda_ones(9)), r"weight and bias must be \[8\]"),
    "eps": ("layer_norm_native", lambda: dict(eps=0.0), "eps must be finite and > 0"),
    "residual": ("layer_norm_native", lambda: dict(residual=cuda_ones(3, 8)), "residual must have x's shape"),
    "mixed_dtypes": ("layer_norm_native", lambda: dict(weight=cuda_ones(8, dtype=torch.half)), "expected Float"),
    "mean": ("layer_norm_backward_native", lambda: dict(mean=cuda_ones(2, dtype=torch.half)), "mean must be float32"),
    "grad_y": ("layer_norm_backward_native", lambda: dict(grad_y=cuda_ones(2, 9)), "grad_y must have h's shape"),
    "bias": ("bias_gelu_native", lambda: dict(bias=cuda_ones(9)), r"bias must be \[8\]"),
    "gelu_grad_y": ("bias_gelu_backward_native", lambda: dict(grad_y=cuda_ones(2, 9)), "grad_y must have x's shape"),
    "w_proj": ("gelu_mlp_native", lambda: dict(w_proj=cuda_ones(8, 32)), r"w_proj must be \[32, 8\]"),
    "double": ("gelu_mlp_native", lambda: {name: cuda_ones(*shape, dtype=torch.float64)
                                         for name, shape in VALID_CALLS["gelu_mlp_native"].items()},
               "float32, float16 or bfloat16"),
}


@on_gpu
@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_the_operators_check_their_arguments(case):
    """Called directly, past gpt2fast.ops' own checks, each operator refuses what its kernel cannot take."""
    op, changes, match = BAD_ARGUMENTS[case]
    args = {name: cuda_ones(*v) if isinstance(v, tuple) else v for name, v in VALID_CALLS[op].items()} | changes()
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.gpt2fast, op)(*args.values())


@on_gpu
def test_custom_ops_pass_opcheck():
    x, residual, weight, bias = make_inputs((3, 100), torch.float32, "cuda", seed=16, requires_grad=True)
    for args in ((x, weight, bias, 1e-5, residual), (x, weight, bias, 1e-5, None)):
        torch.library.opcheck(torch.ops.gpt2fast.layer_norm_native.default, args)
    with torch.no_grad():
        _, h, mean, rstd = torch.ops.gpt2fast.layer_norm_native(x, weight, bias, 1e-5, residual)
    grad = randn(3, 100, device="cuda", seed=17)
    torch.library.opcheck(torch.ops.gpt2fast.layer_norm_backward_native.default,
                          (grad, grad, h, weight.detach(), mean, rstd))
    gelu_x, gelu_bias = randn(5, 17, device="cuda", seed=18), randn(17, device="cuda", seed=19)
    torch.library.opcheck(torch.ops.gpt2fast.bias_gelu_native.default,
                          (gelu_x.requires_grad_(), gelu_bias.requires_grad_()))
    torch.library.opcheck(torch.ops.gpt2fast.bias_gelu_backward_native.default,
                          (torch.randn_like(gelu_x), gelu_x.detach(), gelu_bias.detach()))
    torch.library.opcheck(torch.ops.gpt2fast.gelu_mlp_native.default,
                          tuple(t.requires_grad_() for t in mlp_args(device="cuda")))


def norm_then_mlp(x, residual, weight, bias, mlp):
    y, h = nb.layer_norm(x, weight, bias, 1e-5, residual)
    return nb.gelu_mlp(y, *mlp) + nb.bias_gelu(h, mlp[3]) + nb.layer_norm(h, weight, bias)


@on_gpu
def test_torch_compile_fullgraph_forward_and_backward():
    x, residual, weight, bias = make_inputs((2, 7, 33), torch.float32, "cuda", seed=20, requires_grad=True)
    mlp = mlp_weights(33, 100, torch.float32, "cuda", seed=21, requires_grad=True)
    leaves = (x, residual, weight, bias, *mlp)
    eager = norm_then_mlp(x, residual, weight, bias, mlp)
    compiled = torch.compile(norm_then_mlp, fullgraph=True)(x, residual, weight, bias, mlp)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled.sum(), leaves), torch.autograd.grad(eager.sum(), leaves)):
        torch.testing.assert_close(got, want)


@on_gpu
def test_cuda_graph_replays_the_kernels():
    """Forward and backward operators captured once, replayed on new inputs copied into the captured ones."""
    def fresh(seed):
        bf16 = dict(dtype=torch.bfloat16, device="cuda")
        x, residual, weight, bias = make_inputs((4, 77, 768), seed=seed, **bf16)
        return [x, residual, weight, bias, randn(4, 77, 768, seed=seed + 9, **bf16),
                *mlp_weights(768, 3072, seed=seed + 10, **bf16)]

    def step(x, residual, weight, bias, grad, *mlp):
        y, h, mean, rstd = torch.ops.gpt2fast.layer_norm_native(x, weight, bias, 1e-5, residual)
        dh = torch.ops.gpt2fast.layer_norm_backward_native(grad, grad, h, weight, mean, rstd)[0]
        out, act, pre = torch.ops.gpt2fast.gelu_mlp_native(y, *mlp)
        d_pre = torch.ops.gpt2fast.bias_gelu_backward_native(act, pre, mlp[1])[0]
        return y, h, dh, out, d_pre

    static = fresh(0)
    step(*static)  # cuBLAS's handle and workspace exist before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(*static)
    for captured, new in zip(static, fresh(1)):
        captured.copy_(new)
    graph.replay()
    for got, want in zip(outputs, step(*static)):
        torch.testing.assert_close(got, want)


# ---- bias_gelu's CPU kernel ----

CPU_GELU = REASON is None and nb.BIAS_GELU_CPU_VECTORIZED
needs_cpu_gelu = pytest.mark.skipif(not CPU_GELU, reason="no CPU bias_gelu kernel here (it needs AVX-512)")


@needs_cpu_gelu
@pytest.mark.parametrize("shape", [(1, 3072), (16, 3072), (64, 3072), (3, 77), (5, 1600), (2, 5, 17), (1, 1)],
                         ids=str)
def test_cpu_bias_gelu_matches_fp64(shape):
    """GPT-2's MLP widths at a decode step's rows, and odd widths (masked tails); values to +-12, where the
    tanh saturates and the formula's e^(-2u) overflows to inf."""
    x = randn(*shape, seed=20, scale=4.0)
    bias = randn(shape[-1], seed=21)
    y = torch.ops.gpt2fast.bias_gelu_native(x, bias)
    assert y.shape == x.shape and y.is_contiguous()
    assert_close(y, naive_gelu_tanh(x.double() + bias.double()))


@needs_cpu_gelu
def test_cpu_bias_gelu_reads_strided_rows_and_columns():
    base = randn(6, 200, seed=22)
    bias = randn(77, seed=23)
    for x in (base[:, :77], base[:, ::2][:, :77], base.T[:77].T):  # rows apart, columns apart, transposed
        assert_close(torch.ops.gpt2fast.bias_gelu_native(x, bias), naive_gelu_tanh(x.double() + bias.double()))


@needs_cpu_gelu
def test_cpu_bias_gelu_carries_inf_and_nan_as_the_reference():
    x = torch.tensor([[float("inf"), -float("inf"), float("nan"), -30.0, 30.0, 0.0, 1e-30, -1e-30]])
    bias = torch.zeros(8)
    got = torch.ops.gpt2fast.bias_gelu_native(x, bias)
    want = torch.nn.functional.gelu(x + bias, approximate="tanh")
    torch.testing.assert_close(got, want, equal_nan=True)


@needs_cpu_gelu
@pytest.mark.parametrize("call,match", [
    (lambda: (torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)),
     "the CPU kernel takes float32 x and bias, got Double"),
    (lambda: (torch.randn(3, 8), torch.randn(7)), "bias must be \\[8\\], got \\[7\\]"),
    (lambda: (torch.tensor(1.0), torch.randn(1)), "x must have at least one dim"),
], ids=["float64", "bias_width", "scalar"])
def test_cpu_bias_gelu_refuses_bad_inputs_by_name(call, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gpt2fast.bias_gelu_native(*call())


@needs_cpu_gelu
def test_cpu_bias_gelu_sends_what_it_cannot_take_to_the_reference(fresh_log, caplog):
    """bf16 (the kernel is fp32) and inputs that need grad (it has no backward): the reference, one log line
    per reason, with autograd; fp32 at inference: the kernel."""
    supports = ops.backends()["native"].impls["bias_gelu"].supports
    x, bias = randn(4, 3072, seed=24), randn(3072, seed=25)
    assert supports(x, bias) is None
    assert "bfloat16 on the CPU" in supports(x.bfloat16(), bias.bfloat16())
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("native"):
        x.requires_grad_(True)
        y = ops.bias_gelu(x, bias)
        y.sum().backward()
    assert x.grad is not None and y.requires_grad
    records = fallback_records(caplog)
    assert len(records) == 1 and "require grad" in records[0], records
    with torch.no_grad():
        assert_close(ops.bias_gelu(x.detach(), bias), naive_gelu_tanh(x.double() + bias.double()))
