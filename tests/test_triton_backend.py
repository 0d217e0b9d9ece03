"""The `triton` backend: its probe and refusals, every element its kernels write, its custom ops
(opcheck, torch.compile) and the model run on it.

The op tests (test_ops_layer_norm.py, test_ops_mlp.py) run it against fp64 oracles too, through the
`backend` fixture. Without CUDA the kernels run in triton's interpreter: conftest.py sets
TRITON_INTERPRET=1 before gpt2fast is imported.
"""
import logging
import os
import subprocess
import sys

import pytest
import torch

import gpt2fast
from gpt2fast import GPT2, ops
from gpt2fast.config import GPT2Config
from gpt2fast.ops import triton_backend as tb
from conftest import CUDA, assert_close, fallback_records, randn
from test_ops_layer_norm import naive_layer_norm
from test_ops_mlp import naive_gelu_tanh

REASON = ops.backends()["triton"].unavailable_reason()
needs_triton = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")
DEVICE = "cuda" if CUDA else "cpu"

# T = 1, 77 rows, batch 1 and many; GPT-2's widths, ones that are not powers of two, and the widest.
LN_SHAPES = [(1, 1, 768), (1, 77, 1000), (6, 1, 1536), (2, 7, 1600), (77, 17), (1, 8192)]
GELU_SHAPES = [(1, 1, 768), (1, 77, 1000), (6, 1, 3072), (2, 3, 6400), (77, 17)]


# ---- registration and probe ----


def test_backend_is_available_or_says_why():
    backend = ops.backends()["triton"]
    # every op has a Triton kernel but the plain matmuls, which BLAS (cuBLAS) serves
    assert set(ops.OPS) - set(backend.impls) == {"linear", "lm_head"}
    if CUDA or os.environ.get("TRITON_INTERPRET") == "1":
        assert REASON is None
    else:
        assert "TRITON_INTERPRET is not 1" in REASON


def backends_command(**env):
    out = subprocess.run([sys.executable, "-m", "gpt2fast", "backends"], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}, timeout=120).stdout
    return next(line.split(None, 2)[1:] for line in out.splitlines() if line.startswith("triton "))


@needs_triton
@pytest.mark.skipif(CUDA, reason="with CUDA the backend is available whatever TRITON_INTERPRET says")
def test_backends_command_shows_triton_available_only_when_interpreting():
    status, detail = backends_command(TRITON_INTERPRET="1")
    assert status == "available" and all(op in detail for op in ops.backends()["triton"].impls), detail
    status, detail = backends_command(TRITON_INTERPRET="0")
    assert status == "unavailable" and "no CUDA device, and TRITON_INTERPRET is not 1" in detail


def test_without_triton_gpt2fast_imports_and_falls_back():
    code = """
import sys
sys.modules["triton"] = None  # what a missing package looks like to import
import torch, gpt2fast
from gpt2fast import ops
print(ops.backends()["triton"].unavailable_reason())
x, bias = torch.randn(3, 8), torch.randn(8)
with gpt2fast.use_backend("triton"):
    assert torch.equal(ops.bias_gelu(x, bias), torch.nn.functional.gelu(x + bias, approximate="tanh"))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("triton is not installed (ModuleNotFoundError: "), result.stdout
    assert "falls back to the torch reference: backend 'triton': triton is not installed" in result.stderr


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False), ("3.5.1", "2.4.0", True)])
def test_interpreter_with_numpy_it_cannot_run_is_refused(monkeypatch, triton_version, numpy_version, refused):
    numpy = pytest.importorskip("numpy")
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = tb._interpreter_fault(triton_version)
    if refused:
        assert f"under numpy {numpy_version}" in reason and "install numpy<2.4" in reason
    else:
        assert reason is None


def test_importing_gpt2fast_does_not_import_triton():
    code = "import sys, gpt2fast; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


# ---- refusals: the reference's result and one log line ----


def ln_args(width, dtype=torch.float32, device=DEVICE):
    return (randn(2, 3, width, dtype=dtype, device=device, seed=1, shift=1.0),
            randn(width, dtype=dtype, device=device, seed=2, shift=1.0),
            randn(width, dtype=dtype, device=device, seed=3))


def gelu_args(width, dtype=torch.float32, device=DEVICE):
    return randn(4, width, dtype=dtype, device=device, seed=4), randn(width, dtype=dtype, device=device, seed=5)


def oracle(op, *args):
    """fp64 layer_norm (without residual) or bias_gelu of ln_args / gelu_args."""
    if op == "layer_norm":
        return naive_layer_norm(*args, 1e-5)
    x, bias = args
    return naive_gelu_tanh(x.double() + bias.double())


REFUSALS = [
    ("layer_norm", lambda: ln_args(8193), "width 8193 (the kernel takes 1 to 8192)"),
    ("layer_norm", lambda: ln_args(64, torch.float64), "dtype torch.float64"),
    ("bias_gelu", lambda: gelu_args(64, torch.float64), "dtype torch.float64"),
]


@needs_triton
@pytest.mark.parametrize("op,make_args,reason", REFUSALS, ids=["ln-width", "ln-float64", "gelu-float64"])
def test_refused_inputs_get_the_reference_and_one_log_line(op, make_args, reason, fresh_log, monkeypatch, caplog):
    monkeypatch.setattr(tb, f"{op}_op", lambda *a: pytest.fail("the kernel ran on an input it refuses"))
    args = make_args()
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        for _ in range(2):
            assert_close(getattr(ops, op)(*args), oracle(op, *args))
    records = fallback_records(caplog)
    assert len(records) == 1 and op in records[0] and reason in records[0], records


@needs_triton
@pytest.mark.parametrize("op", ["layer_norm", "bias_gelu"])
def test_cpu_tensors_are_refused_unless_interpreting(op, fresh_log, monkeypatch, caplog):
    """On a GPU machine (not interpreting), CPU tensors go to the reference."""
    monkeypatch.setattr(tb, "_interpreted", False)
    monkeypatch.setattr(tb, f"{op}_op", lambda *a: pytest.fail("the kernel ran on CPU tensors"))
    args = ln_args(64, device="cpu") if op == "layer_norm" else gelu_args(64, device="cpu")
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        for _ in range(2):
            assert_close(getattr(ops, op)(*args), oracle(op, *args))
    records = fallback_records(caplog)
    assert len(records) == 1 and "tensors on cpu: Triton runs CUDA tensors" in records[0], records


# ---- every element written, right, in every dtype ----


@needs_triton
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
def test_layer_norm_writes_every_output(poisoned_empty, dtype, shape, with_residual):
    x = randn(*shape, dtype=dtype, device=DEVICE, seed=1, scale=2.0, shift=3.0)
    residual = randn(*shape, dtype=dtype, device=DEVICE, seed=2, shift=-1.0) if with_residual else None
    weight = randn(shape[-1], dtype=dtype, device=DEVICE, seed=3, scale=0.1, shift=1.0)
    bias = randn(shape[-1], dtype=dtype, device=DEVICE, seed=4, scale=0.1)
    y, h, mean, rstd = tb.layer_norm_op(x, weight, bias, 1e-5, residual)

    assert y.shape == x.shape and y.dtype == dtype and mean.shape == rstd.shape == shape[:-1]
    if with_residual:
        assert_close(h, x.double() + residual.double())
    else:
        assert h.numel() == 0
        h = x
    h64 = h.double()
    assert_close(y, naive_layer_norm(h, weight, bias, 1e-5))  # y is LN of the h returned, rounded or not
    assert_close(mean, h64.mean(-1), torch.float32)
    assert_close(rstd, (h64.var(-1, unbiased=False) + 1e-5).rsqrt(), torch.float32)


@needs_triton
@pytest.mark.parametrize("with_grad_h", [False, True], ids=["dy", "dy+dh"])
@pytest.mark.parametrize("shape", [(1, 1, 768), (1, 77, 1000), (6, 1, 1600), (77, 17)], ids=str)
def test_layer_norm_backward_writes_every_gradient(poisoned_empty, dtype, shape, with_grad_h):
    h = randn(*shape, dtype=dtype, device=DEVICE, seed=5, scale=2.0, shift=3.0)
    weight = randn(shape[-1], dtype=dtype, device=DEVICE, seed=6, scale=0.1, shift=1.0)
    grad_y = randn(*shape, dtype=dtype, device=DEVICE, seed=7)
    grad_h = randn(*shape, dtype=dtype, device=DEVICE, seed=8) if with_grad_h else None
    h64 = h.double()
    mean = h64.mean(-1).float()
    rstd = (h64.var(-1, unbiased=False) + 1e-5).rsqrt().float()
    dh, dweight, dbias = tb.layer_norm_backward_op(grad_y, grad_h, h, weight, mean, rstd)

    leaves = [t.detach().double().requires_grad_() for t in (h, weight)]
    y64 = naive_layer_norm(leaves[0], leaves[1], torch.zeros_like(leaves[1]), 1e-5)
    want_dh, want_dweight = torch.autograd.grad((y64 * grad_y.double()).sum(), leaves)
    if with_grad_h:
        want_dh = want_dh + grad_h.double()
    rows = h.numel() // shape[-1]
    assert dh.dtype == dweight.dtype == dbias.dtype == dtype
    assert_close(dh, want_dh, scale=2)
    assert_close(dweight, want_dweight, scale=2 * rows ** 0.5)
    assert_close(dbias, grad_y.double().reshape(-1, shape[-1]).sum(0), scale=2 * rows ** 0.5)


@needs_triton
@pytest.mark.parametrize("shape", GELU_SHAPES, ids=str)
def test_bias_gelu_writes_every_output_and_gradient(poisoned_empty, dtype, shape):
    x = randn(*shape, dtype=dtype, device=DEVICE, seed=9, scale=2.5)
    bias = randn(shape[-1], dtype=dtype, device=DEVICE, seed=10)
    grad_y = randn(*shape, dtype=dtype, device=DEVICE, seed=11)
    y = tb.bias_gelu_op(x, bias)
    dx, dbias = tb.bias_gelu_backward_op(grad_y, x, bias)

    leaves = [t.detach().double().requires_grad_() for t in (x, bias)]
    y64 = naive_gelu_tanh(leaves[0] + leaves[1])
    want_dx, want_dbias = torch.autograd.grad((y64 * grad_y.double()).sum(), leaves)
    rows = x.numel() // shape[-1]
    assert y.dtype == dx.dtype == dbias.dtype == dtype
    assert_close(y, y64.detach(), scale=2)
    assert_close(dx, want_dx, scale=2)
    assert_close(dbias, want_dbias, scale=2 * rows ** 0.5)


@needs_triton
def test_bias_gelu_saturates_without_overflow():
    """Far tails: gelu(z) is z for large z and 0 (not NaN from inf * 0) for very negative z."""
    x = torch.tensor([[-1e4, -100.0, -10.0, 10.0, 100.0, 1e4]], device=DEVICE)
    y = tb.bias_gelu_op(x, torch.zeros(6, device=DEVICE))
    dx, _ = tb.bias_gelu_backward_op(torch.ones_like(x), x, torch.zeros(6, device=DEVICE))
    assert_close(y, naive_gelu_tanh(x))
    assert_close(dx, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], dtype=torch.float64))


# ---- the custom ops ----


def ln_op_args(residual=True):
    x, weight, bias = ln_args(17)
    return x, weight, bias, 1e-5, randn(*x.shape, device=DEVICE, seed=12) if residual else None


def ln_backward_op_args(grad_h=True):
    x, weight, bias, eps, residual = ln_op_args()
    _, h, mean, rstd = tb.layer_norm_op(x, weight, bias, eps, residual)
    return torch.randn_like(h), torch.randn_like(h) if grad_h else None, h, weight, mean, rstd


def requiring_grad(args):
    """The tensors among args requiring grad, so that opcheck checks the autograd registration too."""
    return tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)


OPCHECKS = {
    "layer_norm": lambda: (tb.layer_norm_op, requiring_grad(ln_op_args(residual=False))),
    "layer_norm-residual": lambda: (tb.layer_norm_op, requiring_grad(ln_op_args())),
    "layer_norm_backward": lambda: (tb.layer_norm_backward_op, ln_backward_op_args(grad_h=False)),
    "layer_norm_backward-grad_h": lambda: (tb.layer_norm_backward_op, ln_backward_op_args()),
    "bias_gelu": lambda: (tb.bias_gelu_op, requiring_grad(gelu_args(17))),
    "bias_gelu_backward": lambda: (tb.bias_gelu_backward_op, (randn(4, 17, device=DEVICE), *gelu_args(17))),
}


@needs_triton
@pytest.mark.parametrize("case", OPCHECKS)
def test_custom_op_passes_opcheck(case):
    op, args = OPCHECKS[case]()
    torch.library.opcheck(op, args)  # schema, autograd registration, fake tensors, AOT dispatch


def layer_norm_then_gelu(ln, gelu, x, residual, weight, bias):
    y, h = ln(x * 2, weight, bias, 1e-5, residual=residual)
    return gelu(y, bias) + h


@needs_triton
def test_torch_compile_fullgraph_traces_the_custom_ops_forward_and_backward():
    x, weight, bias = (t.requires_grad_() for t in ln_args(64))
    residual = randn(*x.shape, device=DEVICE, seed=13)
    eager = layer_norm_then_gelu(tb.layer_norm, tb.bias_gelu, x, residual, weight, bias)
    compiled = torch.compile(layer_norm_then_gelu, fullgraph=True)(tb.layer_norm, tb.bias_gelu, x, residual,
                                                                   weight, bias)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled.sum(), (x, weight, bias)),
                         torch.autograd.grad(eager.sum(), (x, weight, bias))):
        torch.testing.assert_close(got, want)


@needs_triton
def test_torch_compile_fullgraph_through_ops_under_use_backend():
    x, weight, bias = ln_args(64)
    residual = randn(*x.shape, device=DEVICE, seed=13)
    torch._dynamo.reset()
    with gpt2fast.use_backend("triton"):
        eager = layer_norm_then_gelu(ops.layer_norm, ops.bias_gelu, x, residual, weight, bias)
        compiled = torch.compile(layer_norm_then_gelu, fullgraph=True)(ops.layer_norm, ops.bias_gelu, x, residual,
                                                                       weight, bias)
    torch.testing.assert_close(compiled, eager)


# ---- the model on the triton backend ----


@needs_triton
def test_model_on_triton_matches_the_reference(fresh_log, monkeypatch, caplog):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4)).eval().to(DEVICE)
    with torch.no_grad():  # LayerNorm weights and biases away from 1 and 0, so that each one counts
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = []
    monkeypatch.setattr(tb, "layer_norm_op", lambda *a, _op=tb.layer_norm_op: calls.append(1) or _op(*a))

    with torch.no_grad(), gpt2fast.use_backend("torch"):
        ref_logits, ref_tokens = model(ids), model.generate(ids, 6, do_sample=False)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        logits = model(ids)
        assert len(calls) == 2 * 2 + 1  # every LayerNorm ran the kernel: two per block, and ln_f
        tokens = model.generate(ids, 6, do_sample=False)

    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())
    assert torch.equal(tokens, ref_tokens)
    assert fallback_records(caplog) == []  # every op the model calls ran on the backend


@needs_triton
def test_torch_compile_fullgraph_traces_the_whole_model_on_triton():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4)).eval().to(DEVICE)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    traced = set()

    def record_ops(graph_module, example_inputs):
        traced.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad(), gpt2fast.use_backend("triton"):
        compiled = torch.compile(model, backend=record_ops, fullgraph=True)(ids)
        eager = model(ids)
    torch.testing.assert_close(compiled, eager)
    assert {f"gpt2fast.{op}_triton.default" for op in ("layer_norm", "causal_attention", "gelu_mlp")} <= traced, traced


@pytest.mark.gpu
def test_cuda_graph_replays_every_kernel():
    """Each op captured once in a CUDA graph, replayed on new inputs copied into the captured ones."""
    B, H, T, S, D, C = 4, 12, 77, 256, 64, 768
    dtype = torch.bfloat16

    def fresh(seed):
        r = lambda *shape, scale=1.0: randn(*shape, dtype=dtype, device="cuda", seed=seed, scale=scale)  # noqa: E731
        return dict(x=r(B, T, C), w=r(C, scale=0.1) + 1, b=r(C, scale=0.1), q=r(B, H, T, D), kv=r(B, H, S, D),
                    w_fc=r(C, 4 * C, scale=C ** -0.5), w_proj=r(4 * C, C, scale=(4 * C) ** -0.5),
                    b_fc=r(4 * C), logits=r(B, 50257, scale=4.0))

    def step(t, lengths, generator):
        y, h = ops.layer_norm(t["x"], t["w"], t["b"], 1e-5, residual=t["x"])
        a = ops.causal_attention(t["q"], t["q"], t["q"])
        d = ops.decode_attention(t["q"][:, :, -1:], t["kv"], t["kv"], lengths)
        m = ops.gelu_mlp(y, t["w_fc"], t["b_fc"], t["w_proj"], t["b"])
        return y, h, a, d, m, ops.sample(t["logits"], 0.8, 50, 0.9, generator)

    lengths = torch.tensor([1, 77, 200, 256], device="cuda")
    static = fresh(0)
    with torch.no_grad(), gpt2fast.use_backend("triton"):
        generator = torch.Generator(device="cuda").manual_seed(0)
        step(static, lengths, generator)  # compile every kernel before capture
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            outputs = step(static, lengths, generator)
        new = fresh(1)
        for name, t in new.items():
            static[name].copy_(t)
        graph.replay()
        expected = step(new, lengths, torch.Generator(device="cuda").manual_seed(0))
    for got, want in zip(outputs[:5], expected[:5]):
        torch.testing.assert_close(got, want)
    ids = outputs[5].cpu()
    assert ids.shape == (B,) and bool(((ids >= 0) & (ids < 50257)).all())
