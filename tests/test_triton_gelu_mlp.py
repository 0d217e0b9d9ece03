"""The triton backend's gelu_mlp (kernels/gelu_mlp.py): every element written, odd sizes, the saved
pre-activation, refusals, the custom op, and the model run on it.

test_ops_mlp.py runs it against the fp64 oracle too, through the `backend` fixture.
"""
import logging

import pytest
import torch

import gpt2fast
from gpt2fast import GPT2, ops
from gpt2fast.config import GPT2Config
from gpt2fast.ops import triton_backend as tb
from conftest import assert_close, fallback_records, randn
from test_ops_mlp import mlp_weights, naive_gelu_mlp, naive_gelu_tanh, naive_linear
from test_triton_backend import DEVICE, needs_triton

# Batch 1 and many rows (231); M, K and N off the blocks (77 rows, widths 100 and 17, 33 wide inputs).
SHAPES = [((1, 1, 64), 256), ((77, 17), 100), ((1, 1, 100), 17), ((3, 77, 33), 100)]


@needs_triton
@pytest.mark.parametrize("shape,hidden", SHAPES, ids=str)
def test_writes_every_output(poisoned_empty, dtype, shape, hidden):
    x = randn(*shape, dtype=dtype, device=DEVICE, seed=1)
    weights = mlp_weights(shape[-1], hidden, dtype, DEVICE, seed=2)
    y, act, pre = tb.gelu_mlp_op(x, *weights, True)

    pre64 = x.double() @ weights[0].double()  # without b_fc, which the bias_gelu backward adds
    assert y.dtype == act.dtype == pre.dtype == dtype
    assert act.shape == pre.shape == (*shape[:-1], hidden)
    assert_close(pre, pre64, scale=2)
    assert_close(act, naive_gelu_tanh(naive_linear(x, weights[0], weights[1])), scale=2)
    assert_close(y, naive_gelu_mlp(x, *weights), scale=3)


@needs_triton
def test_pre_activation_is_stored_only_when_asked():
    x = randn(5, 33, device=DEVICE, seed=3)
    weights = mlp_weights(33, 100, torch.float32, DEVICE, seed=4)
    y, _, pre = tb.gelu_mlp_op(x, *weights, False)
    assert pre.numel() == 0
    torch.testing.assert_close(y, tb.gelu_mlp_op(x, *weights, True)[0], rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("grad_enabled", [True, False])
def test_saves_the_pre_activation_only_for_a_backward(grad_enabled, monkeypatch):
    x = randn(3, 17, device=DEVICE, seed=5).requires_grad_()
    weights = mlp_weights(17, 100, torch.float32, DEVICE, seed=6)
    flags = []
    monkeypatch.setattr(tb, "gelu_mlp_op", lambda *a, _op=tb.gelu_mlp_op: flags.append(a[-1]) or _op(*a))
    with torch.set_grad_enabled(grad_enabled), gpt2fast.use_backend("triton"):
        ops.gelu_mlp(x, *weights)
    assert flags == [grad_enabled]


@needs_triton
@pytest.mark.parametrize("save_pre", [True, False], ids=["saved", "recomputed"])
def test_backward_in_low_precision(save_pre):
    """bf16 gradients, from the saved pre-activation or (without it) a recomputed one."""
    x = randn(77, 17, dtype=torch.bfloat16, device=DEVICE, seed=7).requires_grad_()
    weights = mlp_weights(17, 100, torch.bfloat16, DEVICE, seed=8, requires_grad=True)
    grad_y = randn(77, 17, dtype=torch.bfloat16, device=DEVICE, seed=9)
    grads = torch.autograd.grad((tb.gelu_mlp_op(x, *weights, save_pre)[0] * grad_y).sum(), (x, *weights))

    leaves = [t.detach().double().requires_grad_() for t in (x, *weights)]
    expected = torch.autograd.grad((naive_gelu_mlp(*leaves) * grad_y.double()).sum(), leaves)
    for name, got, want in zip(["x", "w_fc", "b_fc", "w_proj", "b_proj"], grads, expected):
        assert got.dtype == torch.bfloat16
        # Weight and bias gradients sum 77 rows.
        assert_close(got, want, scale=4 if name == "x" else 4 * 77 ** 0.5, msg=lambda m, n=name: f"grad {n}: {m}")


def mlp_args(dtype=torch.float32, device=DEVICE):
    return (randn(4, 33, dtype=dtype, device=device, seed=10), *mlp_weights(33, 100, dtype, device, seed=11))


@needs_triton
def test_refused_dtype_gets_the_reference_and_one_log_line(fresh_log, monkeypatch, caplog):
    monkeypatch.setattr(tb, "gelu_mlp_op", lambda *a: pytest.fail("the kernel ran on an input it refuses"))
    args, reason = mlp_args(torch.float64), "dtype torch.float64"
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        for _ in range(2):
            assert_close(ops.gelu_mlp(*args), naive_gelu_mlp(*args))
    records = fallback_records(caplog)
    assert len(records) == 1 and "gelu_mlp" in records[0] and reason in records[0], records


@needs_triton
def test_cpu_tensors_are_refused_unless_interpreting(fresh_log, monkeypatch, caplog):
    monkeypatch.setattr(tb, "_interpreted", False)
    monkeypatch.setattr(tb, "gelu_mlp_op", lambda *a: pytest.fail("the kernel ran on CPU tensors"))
    args = mlp_args(device="cpu")
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        assert_close(ops.gelu_mlp(*args), naive_gelu_mlp(*args))
    records = fallback_records(caplog)
    assert len(records) == 1 and "tensors on cpu: Triton runs CUDA tensors" in records[0], records


@needs_triton
def test_custom_op_passes_opcheck():
    args = tuple(t.requires_grad_() for t in mlp_args())
    torch.library.opcheck(tb.gelu_mlp_op, (*args, True))  # schema, autograd registration, fake tensors


@needs_triton
def test_model_on_triton_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4)).eval().to(DEVICE)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = []
    monkeypatch.setattr(tb, "gelu_mlp_op", lambda *a, _op=tb.gelu_mlp_op: calls.append(1) or _op(*a))
    with torch.no_grad(), gpt2fast.use_backend("torch"):
        ref_logits = model(ids)
    with torch.no_grad(), gpt2fast.use_backend("triton"):
        logits = model(ids)
    assert len(calls) == 2  # one MLP per block
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())


@needs_triton
def test_torch_compile_fullgraph_traces_forward_and_backward():
    args = tuple(t.requires_grad_() for t in mlp_args())
    eager = tb.gelu_mlp(*args)
    compiled = torch.compile(tb.gelu_mlp, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled.sum(), args), torch.autograd.grad(eager.sum(), args)):
        torch.testing.assert_close(got, want)
