"""The triton causal_attention kernels: every output, log-sum-exp and gradient element written, tile
edges, strided inputs, refusals, the custom ops, and the model run (and trained) on them.

test_ops_attention.py runs them against the fp64 oracle through the `backend` fixture; here the launchers
are driven directly, on sequences that end mid-tile and with tiles of several sizes, the GPU's included.
Without CUDA they run in triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import gpt2fast
from gpt2fast import GPT2, ops
from gpt2fast.config import GPT2Config
from gpt2fast.ops import triton_backend as tb
from conftest import CUDA, assert_close, fallback_records, randn
from test_ops_attention import naive_causal_attention, qkv

REASON = ops.backends()["triton"].unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def kernel(poisoned_empty):
    """The kernel module, run with torch.empty poisoned (conftest.py): an element it fails to write shows."""
    return tb._kernels("causal_attention")


def naive_lse(q, k):
    """fp64 log-sum-exp of each query's scaled, causally masked scores."""
    T, D = q.shape[-2:]
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return torch.logsumexp(scores.masked_fill(future, -math.inf), dim=-1)


def naive_grads(q, k, v, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad((naive_causal_attention(*leaves) * grad_out.double()).sum(), leaves)


def assert_grads_close(grads, expected, dtype):
    for name, got, want in zip("qkv", grads, expected):
        assert got.dtype == dtype, name
        assert_close(got, want, scale=4, msg=lambda m, name=name: f"grad {name}: {m}")


# T = 1, T ending mid-tile (17, 45, 77 with the interpreter's 32 x 16 tiles), batch 1 and several, every head dim.
SHAPES = [(1, 1, 1, 64), (2, 3, 17, 32), (1, 2, 77, 64), (3, 1, 45, 16), (1, 1, 33, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_writes_every_output_and_lse(kernel, dtype, shape):
    q, k, v = qkv(shape, dtype, DEVICE, seed=1)
    out, lse = kernel.causal_attention_forward(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == shape[:-1]
    assert_close(out, naive_causal_attention(q, k, v))  # NaN anywhere fails here
    assert_close(lse, naive_lse(q, k), torch.float32, scale=2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_writes_every_gradient(kernel, dtype, shape):
    q, k, v = qkv(shape, dtype, DEVICE, seed=2)
    grad_out = randn(*shape, dtype=dtype, device=DEVICE, seed=3)
    out, lse = kernel.causal_attention_forward(q, k, v)
    grads = kernel.causal_attention_backward(grad_out, q, k, v, out, lse)
    assert_grads_close(grads, naive_grads(q, k, v, grad_out), dtype)


@pytest.mark.parametrize("tiles", [(16, 16), (64, 16), (128, 32), (128, 64)], ids=str)
def test_tile_sizes_do_not_change_the_result(kernel, tiles):
    """Square tiles (one diagonal block), and the GPU's tiles, on a sequence ending mid-tile."""
    shape = (1, 2, 150, 32)
    q, k, v = qkv(shape, torch.float32, DEVICE, seed=4)
    grad_out = randn(*shape, device=DEVICE, seed=5)
    out, lse = kernel.causal_attention_forward(q, k, v, tiles=tiles)
    assert_close(out, naive_causal_attention(q, k, v))
    assert_close(lse, naive_lse(q, k), scale=2)
    grads = kernel.causal_attention_backward(grad_out, q, k, v, out, lse, tiles=tiles)
    assert_grads_close(grads, naive_grads(q, k, v, grad_out), torch.float32)


def test_strided_inputs(kernel):
    """q, k, v sliced out of one [B, T, 3, H, D] projection (the model's layout), a gradient expanded from
    a scalar (all strides 0), and a head dim that is not unit-stride (copied)."""
    B, T, H, D = 2, 40, 3, 32
    q, k, v = randn(B, T, 3, H, D, device=DEVICE, seed=6).permute(2, 0, 3, 1, 4)
    grad_out = torch.ones((), device=DEVICE).expand(B, H, T, D)
    out, lse = kernel.causal_attention_forward(q, k, v)
    assert_close(out, naive_causal_attention(q, k, v))
    grads = kernel.causal_attention_backward(grad_out, q, k, v, out, lse)
    assert_grads_close(grads, naive_grads(q, k, v, grad_out), torch.float32)

    q_t, k_t, v_t = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    assert q_t.stride(-1) != 1
    torch.testing.assert_close(kernel.causal_attention_forward(q_t, k_t, v_t)[0], out, rtol=0, atol=0)


def test_backward_is_deterministic(kernel):
    q, k, v = qkv((2, 2, 77, 32), torch.float32, DEVICE, seed=7)
    grad_out = randn(2, 2, 77, 32, device=DEVICE, seed=8)
    out, lse = kernel.causal_attention_forward(q, k, v)
    first, second = (kernel.causal_attention_backward(grad_out, q, k, v, out, lse) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_empty_batch(kernel):
    q, k, v = qkv((0, 2, 5, 32), torch.float32, DEVICE)
    out, lse = kernel.causal_attention_forward(q, k, v)
    assert out.shape == (0, 2, 5, 32) and lse.shape == (0, 2, 5)
    assert all(g.shape == q.shape for g in kernel.causal_attention_backward(out, q, k, v, out, lse))


# ---- the custom ops ----


def test_custom_ops_pass_opcheck():
    q, k, v = qkv((2, 2, 19, 32), torch.float32, DEVICE, seed=9, requires_grad=True)
    torch.library.opcheck(tb.causal_attention_op, (q, k, v))  # schema, autograd registration, fake tensors
    out, lse = (t.detach() for t in tb.causal_attention_op(q, k, v))
    grad_out = randn(2, 2, 19, 32, device=DEVICE, seed=10)
    torch.library.opcheck(tb.causal_attention_backward_op, (grad_out, *(t.detach() for t in (q, k, v)), out, lse))


def test_torch_compile_fullgraph_traces_forward_and_backward():
    q, k, v = (t.transpose(1, 2) for t in qkv((2, 21, 2, 32), torch.float32, DEVICE, seed=11, requires_grad=True))
    eager = tb.causal_attention(q, k, v)
    compiled = torch.compile(tb.causal_attention, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
    grad_out = randn(*eager.shape, device=DEVICE, seed=12)
    for got, want in zip(torch.autograd.grad(compiled, (q, k, v), grad_out),
                         torch.autograd.grad(eager, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want)


# ---- refusals: the reference's result and one log line ----


REFUSALS = {
    "D48": (dict(D=48), "head dim 48 (the kernel takes 16, 32, 64, 128)"),
    "D256": (dict(D=256), "head dim 256"),
    "float64": (dict(dtype=torch.float64), "dtype torch.float64"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_inputs_get_the_reference_and_one_log_line(case, fresh_log, monkeypatch, caplog):
    changes, reason = REFUSALS[case]
    monkeypatch.setattr(tb, "causal_attention_op", lambda *a: pytest.fail("the kernel ran on an input it refuses"))
    q, k, v = qkv((2, 1, 9, changes.get("D", 32)), changes.get("dtype", torch.float32), DEVICE)
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        for _ in range(2):
            assert_close(ops.causal_attention(q, k, v), naive_causal_attention(q, k, v))
    records = fallback_records(caplog)
    assert len(records) == 1 and "causal_attention" in records[0] and reason in records[0], records


# ---- the model ----


def small_model():
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=2)).to(DEVICE)


def count_calls(monkeypatch, name):
    calls = []
    op = getattr(tb, name)
    monkeypatch.setattr(tb, name, lambda *a: calls.append(1) or op(*a))
    return calls


def test_model_gives_the_references_logits_and_greedy_tokens(monkeypatch):
    model = small_model().eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = count_calls(monkeypatch, "causal_attention_op")
    with torch.no_grad(), gpt2fast.use_backend("torch"):
        ref_logits, ref_tokens = model(ids), model.generate(ids, 6, do_sample=False)
    with torch.no_grad(), gpt2fast.use_backend("triton"):
        logits = model(ids)
        assert len(calls) == 2  # one attention per block
        tokens = model.generate(ids, 6, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())
    assert torch.equal(tokens, ref_tokens)


def test_model_gradients_match_the_reference(monkeypatch):
    """A training step's gradients, with the attention backward run by the kernels."""
    model = small_model().train()
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    calls = count_calls(monkeypatch, "causal_attention_backward_op")

    def gradients(backend):
        model.zero_grad()
        with gpt2fast.use_backend(backend):
            F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected, got = gradients("torch"), gradients("triton")
    assert len(calls) == 2
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-4 * expected[name].abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---- full GPT-2 shapes on a GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 12, 1024, 64), (4, 25, 1024, 64)], ids=str)
def test_gpt2_shapes_forward_and_backward_in_bfloat16_on_gpu(shape):
    q, k, v = qkv(shape, torch.bfloat16, "cuda", seed=13, requires_grad=True)
    grad_out = randn(*shape, dtype=torch.bfloat16, device="cuda", seed=14)
    with gpt2fast.use_backend("triton"):
        out = ops.causal_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert_close(out, naive_causal_attention(q, k, v))
    assert_grads_close(grads, naive_grads(q, k, v, grad_out), torch.bfloat16)
