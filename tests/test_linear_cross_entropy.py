"""ops.linear_cross_entropy on every backend that implements it, against the unfused fp64 oracle
F.cross_entropy(x @ weight.T): the loss and its gradients in x and weight, over dtypes, odd shapes, several
chunks, ignored targets, both reductions; the empty mean, refusals, input checks, the custom op under
opcheck and torch.compile, and the fallback of a backend that lacks the op."""
import logging

import pytest
import torch
import torch.nn.functional as F

import gpt2fast
from gpt2fast import ops
from gpt2fast.cli import describe_backends
from gpt2fast.ops import custom_ops, native_backend as nb, reference
from conftest import AVAILABLE_BACKENDS, fallback_records, randn

OP = "linear_cross_entropy"
# The tests run on CPU tensors, where the native backend has no kernel of this op (its row kernel is CUDA only).
BACKENDS = [name for name in AVAILABLE_BACKENDS if OP in ops.backends()[name].impls and name != "native"]
GPU_BACKENDS = BACKENDS + (["native"] if "native" in AVAILABLE_BACKENDS
                           and nb._has_kernel("cross_entropy_rows_native", "cuda") else [])
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
GRAD_SCALE = 2.5  # the gradient reaching the loss: the backward must scale by it
# bfloat16: triton's logits and their gradient are rounded to bfloat16 (as Liger-Kernel's are), which puts its
# summed weight gradient about 1.3% of the largest value off.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def make_inputs(lead, C, V, dtype=torch.float32, ignore_every=7, seed=0):
    """x [*lead, C] and weight [V, C] with logits of O(1), as a trained LM head's; every ignore_every-th target -100."""
    x = randn(*lead, C, dtype=dtype, seed=seed).requires_grad_()
    weight = randn(V, C, dtype=dtype, seed=seed + 1, scale=C ** -0.5).requires_grad_()
    targets = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(seed + 2))
    if ignore_every:
        targets.view(-1)[ignore_every - 1::ignore_every] = -100
    return x, weight, targets


def oracle(x, weight, targets, ignore_index=-100, reduction="mean"):
    """(loss, dx, dweight) in fp64 from the rounded inputs, the gradients of GRAD_SCALE * loss."""
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    logits = x64.reshape(-1, x.shape[-1]) @ w64.T
    loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return (loss.detach(), *torch.autograd.grad(GRAD_SCALE * loss, (x64, w64)))


def run(backend, x, weight, targets, **kw):
    with gpt2fast.use_backend(backend):
        loss = ops.linear_cross_entropy(x, weight, targets, **kw)
    return (loss, *torch.autograd.grad(GRAD_SCALE * loss, (x, weight)))


def assert_matches(got, want, dtype):
    """Each of (loss, dx, dweight) within dtype's relative tolerance of the oracle's largest value (a max-norm
    check: torch.testing.assert_close takes seconds on GPT-2's [50257, 768] gradient)."""
    for name, g, w in zip(("loss", "dx", "dweight"), got, want):
        assert g.shape == w.shape, name
        if w.numel():
            error = float((g.detach().double() - w).abs().max())  # NaN fails the comparison below
            bound = RTOL[dtype] * float(w.abs().max().clamp(min=1e-3))
            assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


# (x's leading dims, C, V, MIN_CHUNK_LOGITS, reduction): one row, V odd and over one 4096-wide tile; 77 rows in 13
# chunks, the last of 5 rows; [B, T] leading dims.
CASES = {"1-row": ((1,), 64, 4099, reference.MIN_CHUNK_LOGITS, "mean"),
         "77-rows-13-chunks": ((77,), 80, 1000, 0, "mean"),
         "2x5-rows-sum": ((2, 5), 48, 257, 0, "sum")}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_unfused_oracle(backend, dtype, case, monkeypatch):
    lead, C, V, chunk, reduction = CASES[case]
    monkeypatch.setattr(reference, "MIN_CHUNK_LOGITS", chunk)
    x, weight, targets = make_inputs(lead, C, V, dtype)
    got = run(backend, x, weight, targets, reduction=reduction)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert_matches(got, oracle(x, weight, targets, reduction=reduction), dtype)


# GPT-2's vocabulary and widths, and 1024 rows, each where it stays quick in Triton's interpreter.
LARGE = [((2,), 768, 50257, BACKENDS), ((3,), 1600, 2000, BACKENDS), ((1024,), 32, 128, BACKENDS),
         ((1024,), 64, 50257, ["torch"])]


@pytest.mark.parametrize("lead,C,V,backend", [(lead, C, V, b) for lead, C, V, names in LARGE for b in names],
                         ids=lambda v: str(v) if isinstance(v, tuple) else None)
def test_gpt2_vocabulary_widths_and_many_rows(backend, lead, C, V):
    x, weight, targets = make_inputs(lead, C, V, ignore_every=5)
    assert_matches(run(backend, x, weight, targets), oracle(x, weight, targets), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ignore_index_that_is_a_class_id(backend):
    x, weight, targets = make_inputs((40,), 16, 5, ignore_every=0)
    got = run(backend, x, weight, targets, ignore_index=3, reduction="sum")
    assert bool((targets == 3).any())
    assert_matches(got, oracle(x, weight, targets, ignore_index=3, reduction="sum"), torch.float32)


@pytest.mark.parametrize("rows", [0, 6])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_target_gives_zero_loss_and_zero_gradients(backend, reduction, rows):
    """Where F.cross_entropy's mean gives NaN."""
    x, weight, targets = make_inputs((rows,), 16, 9, ignore_every=1)
    loss, dx, dweight = run(backend, x, weight, targets, reduction=reduction)
    assert loss.item() == 0.0 and dx.shape == x.shape
    assert not dx.any() and not dweight.any()


def test_reference_passes_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(reference, "MIN_CHUNK_LOGITS", 0)  # 5 * 3 // 7: two rows per chunk, one in the last
    x, weight, targets = make_inputs((5,), 3, 7, torch.float64, ignore_every=3)
    for reduction in ("mean", "sum"):
        with gpt2fast.use_backend("torch"):
            assert torch.autograd.gradcheck(lambda x, w: ops.linear_cross_entropy(x, w, targets, reduction=reduction),
                                            (x, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for_are_computed(backend, monkeypatch):
    """No gradient matmuls under no_grad or for inputs that do not require grad, and autograd still works."""
    module, name = (reference, "chunked_linear_cross_entropy") if backend == "torch" else \
        (custom_ops, "linear_cross_entropy_chunks")
    flags = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: flags.append(args[5:7]) or original(*args))
    x, weight, targets = make_inputs((4,), 8, 11)
    want = oracle(x, weight, targets)
    with gpt2fast.use_backend(backend):
        with torch.no_grad():
            no_grad = ops.linear_cross_entropy(x, weight, targets)
        (dx,) = torch.autograd.grad(GRAD_SCALE * ops.linear_cross_entropy(x, weight.detach(), targets), x)
        (dweight,) = torch.autograd.grad(GRAD_SCALE * ops.linear_cross_entropy(x.detach(), weight, targets), weight)
    assert flags == [(False, False), (True, False), (False, True)]
    assert_matches((no_grad, dx, dweight), want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend, poisoned_empty):
    x, weight, targets = make_inputs((77,), 32, 300)
    assert_matches(run(backend, x, weight, targets), oracle(x, weight, targets), torch.float32)


def test_chunks_hold_no_more_logits_than_x_or_the_floor():
    for rows, width, vocab in [(4096, 768, 50257), (65536, 1600, 50257), (1, 768, 50257), (77, 8, 10**8)]:
        step = reference.cross_entropy_chunk_rows(rows, width, vocab)
        assert 1 <= step <= rows
        assert step == 1 or step * vocab <= max(rows * width, reference.MIN_CHUNK_LOGITS)
    assert reference.cross_entropy_chunk_rows(8, 768, 50257) == 8  # a small batch in one matmul


# ---- refusals and fallbacks ----


@needs_triton
def test_triton_refuses_float64_for_the_reference_with_one_log_line(fresh_log, caplog):
    x, weight, targets = make_inputs((5,), 8, 7, torch.float64)
    with caplog.at_level(logging.WARNING, logger="gpt2fast"):
        for _ in range(2):
            got = run("triton", x, weight, targets)
    assert_matches(got, oracle(x, weight, targets), torch.float64)
    records = fallback_records(caplog)
    assert len(records) == 1 and OP in records[0] and "dtype torch.float64" in records[0], records


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: the native backend's kernel is CUDA only")
def test_the_native_backend_on_cpu_tensors_falls_back_with_one_log_line(fresh_log, caplog):
    """The native backend's row kernel runs on CUDA only: named for CPU tensors, the reference runs, said once."""
    x, weight, targets = make_inputs((5,), 8, 7)
    with caplog.at_level(logging.WARNING, logger="gpt2fast"):
        for _ in range(2):
            got = run("native", x, weight, targets)
    assert_matches(got, oracle(x, weight, targets), torch.float32)
    records = fallback_records(caplog)
    assert len(records) == 1 and OP in records[0] and "backend 'native'" in records[0], records


def test_backends_command_lists_the_op_where_it_is_implemented():
    rows = {name: detail for name, status, detail in describe_backends() if status == "available"}
    for name in ("torch", "triton", "native"):
        assert (name not in rows) or OP in rows[name]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [768, 1600])
def test_gpt2_shapes_on_gpu(backend, dtype, C):
    """GPT-2's head, V = 50257, 2,048 rows (several chunks at C = 768): every kernel on CUDA tensors."""
    x, weight, targets = make_inputs((2, 1024), C, 50257, dtype)
    x, weight = (t.detach().cuda().requires_grad_() for t in (x, weight))
    got = run(backend, x, weight, targets.cuda())
    assert_matches([t.cpu() for t in got], oracle(x.cpu(), weight.cpu(), targets), dtype)


# ---- input checks ----


def valid():
    return dict(x=torch.randn(3, 8), weight=torch.randn(11, 8), targets=torch.tensor([0, -100, 10]))


BAD_INPUTS = [
    (dict(weight=torch.randn(11, 7)), ValueError, r"weight has shape \(11, 7\), expected \(11, 8\)"),
    (dict(weight=torch.randn(8)), ValueError, r"x must be \[..., C\] and weight \[V, C\] with V >= 1"),
    (dict(weight=torch.randn(0, 8)), ValueError, r"with V >= 1"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x must be \[..., C\]"),
    (dict(targets=torch.tensor([0, 1])), ValueError, r"targets has shape \(2,\), expected \(3,\)"),
    (dict(targets=torch.tensor([[0, 1, 2]])), ValueError, r"targets has shape \(1, 3\)"),
    (dict(targets=torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError,
     r"targets must be int64 on cpu, got torch.int32 on cpu"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0])), ValueError, r"targets must be int64"),
    (dict(targets=torch.tensor([0, 1, 2], device="meta")), ValueError, r"got torch.int64 on meta"),
    (dict(weight=torch.randn(11, 8, dtype=torch.bfloat16)), ValueError,
     r"weight is torch.bfloat16 but x is torch.float32"),
    (dict(weight=torch.randn(11, 8, device="meta")), ValueError, r"weight is on meta but x is on cpu"),
    (dict(x=torch.ones(3, 8, dtype=torch.int64), weight=torch.ones(11, 8, dtype=torch.int64)), TypeError,
     r"floating-point"),
    (dict(targets=torch.tensor([0, 11, 2])), ValueError,
     r"every target must be in \[0, 11\) or equal ignore_index \(-100\)"),
    (dict(targets=torch.tensor([0, -1, 2])), ValueError, r"every target must be in \[0, 11\)"),
    (dict(targets=torch.tensor([0, -100, 2]), ignore_index=-1), ValueError, r"or equal ignore_index \(-1\)"),
    (dict(ignore_index=1.5), ValueError, r"ignore_index must be an int, got 1.5"),
    (dict(reduction="none"), ValueError, r"reduction must be one of \('mean', 'sum'\), got 'none'"),
]


@pytest.mark.parametrize("change,error,match", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs_raise_naming_the_problem(change, error, match):
    with pytest.raises(error, match=f"^{OP}: .*{match}"):
        ops.linear_cross_entropy(**(valid() | change))


# ---- the triton custom op ----


@needs_triton
def test_custom_op_passes_opcheck():
    from gpt2fast.ops import triton_backend as tb

    x, weight, targets = make_inputs((6,), 8, 11)
    for grads in (True, False):
        torch.library.opcheck(tb.linear_cross_entropy_op, (x, weight, targets, -100, True, grads, grads))


@needs_triton
def test_torch_compile_fullgraph_traces_forward_and_backward():
    x, weight, targets = make_inputs((2, 5), 16, 37)
    traced = set()

    def record_ops(graph_module, example_inputs):
        traced.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    def loss(x, weight, targets):
        return ops.linear_cross_entropy(x, weight, targets)

    torch._dynamo.reset()
    with gpt2fast.use_backend("triton"):
        torch.compile(loss, backend=record_ops, fullgraph=True)(x, weight, targets)
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(x, weight, targets)
    assert "gpt2fast.linear_cross_entropy_triton.default" in traced, traced
    got = (compiled, *torch.autograd.grad(GRAD_SCALE * compiled, (x, weight)))
    assert_matches(got, oracle(x, weight, targets), torch.float32)
