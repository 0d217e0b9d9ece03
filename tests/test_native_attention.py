"""The `native` backend's attention operators (csrc/causal_attention.cu, csrc/decode_attention.cu and
csrc/decode_attention_cpu.cpp): refusals with
one log line and the reference's result, on any machine; on a GPU, the operators themselves at GPT-2's shapes
against fp64 oracles (the log-sum-exp too, NaN in the cache past every length), opcheck, torch.compile and a
CUDA graph.

test_ops_attention.py runs them through gpt2fast.ops with every other backend (the `backend` fixture); the
standalone programs tests/cuda/test_{causal,decode}_attention.cu check every tile edge and chunk edge.
"""
import logging
import math
import types

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from gpt2fast.ops import native_backend as nb
from conftest import CUDA, assert_close, fallback_records, randn
from test_ops_attention import kv_cache, naive_causal_attention, naive_decode_attention, qkv
from test_triton_causal_attention import naive_lse

REASON = ops.backends()["native"].unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"native backend unavailable: {REASON}")
DEVICE = "cuda" if CUDA else "cpu"


def operator(name: str):
    """torch.ops.gpt2fast.<name>, or a skip where gpt2fast._C was built before it existed."""
    if not hasattr(torch.ops.gpt2fast, name):
        pytest.skip(f"gpt2fast._C was built without {name}: rebuild it with `pip install --no-build-isolation -e .`")
    return getattr(torch.ops.gpt2fast, name)


def decode_case(B, H, S, D, lengths, Tq, dtype=torch.float32, device=DEVICE, lengths_dtype=torch.int64, seed=0):
    """q at twice the scale of the cache; NaN in the cache past every length (never to be read)."""
    q = randn(B, H, Tq, D, dtype=dtype, device=device, seed=seed, scale=2.0)
    k, v = kv_cache(B, H, S, D, lengths, dtype, device, seed=seed + 1, garbage=math.nan)
    return q, k, v, torch.tensor(lengths, dtype=lengths_dtype, device=device)


# ---- refusals: the reference's result and one log line (any machine) ----


CAUSAL_REFUSALS = {
    "D48": (dict(D=48), "head dim 48 (the kernel takes 32, 64, 128)"),
    "D16": (dict(D=16), "head dim 16"),
    "grad": (dict(requires_grad=True), "inputs that require grad"),
    "float64": (dict(dtype=torch.float64), "dtype torch.float64"),
    "cpu": (dict(device="cpu"), "tensors on cpu: gpt2fast._C has no cpu kernel of"),
}


@pytest.mark.parametrize("case", CAUSAL_REFUSALS)
def test_causal_attention_refusals_get_the_reference_and_one_log_line(
        case, fresh_log, monkeypatch, caplog):
    changes, reason = CAUSAL_REFUSALS[case]
    impl = ops.backends()["native"].impls["causal_attention"]
    monkeypatch.setattr(impl, "fn", lambda *a: pytest.fail("the kernel ran on an input it refuses"))
    q, k, v = qkv((2, 2, 9, changes.get("D", 64)), changes.get("dtype", torch.float32), changes.get("device", DEVICE),
                  requires_grad=changes.get("requires_grad", False))
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("native"):
        for _ in range(2):
            assert_close(ops.causal_attention(q, k, v).detach(), naive_causal_attention(q, k, v))
    records = fallback_records(caplog)
    assert len(records) == 1 and "causal_attention" in records[0] and reason in records[0], records


DECODE_REFUSALS = {
    "Tq17": (dict(Tq=17), "17 queries (the kernel takes 1 to 16)"),
    "D48": (dict(D=48), "head dim 48 (the kernel takes 16, 32, 64, 128)"),
    "grad": (dict(requires_grad=True), "inputs that require grad"),
    "float64": (dict(dtype=torch.float64), "dtype torch.float64"),
    "cpu_bf16": (dict(device="cpu", dtype=torch.bfloat16), "torch.bfloat16 on the CPU (the CPU kernel takes float32)"),
}


@pytest.mark.parametrize("case", DECODE_REFUSALS)
def test_decode_attention_refusals_get_the_reference_and_one_log_line(
        case, fresh_log, monkeypatch, caplog):
    changes, reason = DECODE_REFUSALS[case]
    impl = ops.backends()["native"].impls["decode_attention"]
    monkeypatch.setattr(impl, "fn", lambda *a: pytest.fail("the kernel ran on an input it refuses"))
    Tq = changes.get("Tq", 1)
    q, k, v, lengths = decode_case(2, 1, 20, changes.get("D", 32), [Tq, 20], Tq, changes.get("dtype", torch.float32),
                                   changes.get("device", DEVICE))
    q.requires_grad_(changes.get("requires_grad", False))
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("native"):
        for _ in range(2):
            assert_close(ops.decode_attention(q, k, v, lengths).detach(), naive_decode_attention(q, k, v, lengths))
    records = fallback_records(caplog)
    assert len(records) == 1 and "decode_attention" in records[0] and reason in records[0], records


@pytest.mark.parametrize("op", ["causal_attention", "decode_attention"])
def test_a_build_without_the_operator_is_refused_by_name(op, monkeypatch):
    """An extension built before the op existed loads (the probe registers only the fakes of operators it
    defines), and the backend names the missing operator instead of failing."""
    monkeypatch.setattr(nb, "_has_kernel", lambda name, device_type: name != f"{op}_native")
    q = types.SimpleNamespace(shape=(1, 1, 1, 64), dtype=torch.float32, device=torch.device("cuda"),
                              requires_grad=False)  # a stand-in CUDA tensor: no GPU needed to ask
    args = (q, q, q) if op == "causal_attention" else (q, q, q, None)
    reason = ops.backends()["native"].impls[op].supports(*args)
    assert f"gpt2fast._C has no cuda kernel of {op}_native" in reason and "--no-build-isolation" in reason


def test_fake_functions_give_the_outputs_shapes():
    """What torch.compile traces with: on meta tensors the operators run their fakes."""
    q = torch.empty(2, 3, 17, 64, device="meta", dtype=torch.bfloat16)
    out, lse = operator("causal_attention_native")(q, q, q)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 3, 17) and lse.dtype == torch.float32
    cache = torch.empty(2, 3, 40, 64, device="meta", dtype=torch.bfloat16)
    lengths = torch.empty(2, device="meta", dtype=torch.int32)
    out = operator("decode_attention_native")(q[:, :, :3], cache, cache, lengths)
    assert out.shape == (2, 3, 3, 64) and out.dtype == torch.bfloat16


def test_causal_attention_has_no_cpu_kernel():
    """CPU tensors never reach it: the backend refuses those (above). decode_attention has one (below)."""
    q = torch.zeros(1, 1, 4, 64)
    with pytest.raises(NotImplementedError):
        operator("causal_attention_native")(q, q, q)


# ---- decode_attention's CPU kernel (tests/test_ops_attention.py checks it against the reference) ----


@pytest.mark.parametrize("lengths, error", [([0, 4], "every length must be in \\[1, 8\\], got 0 for sequence 0"),
                                            ([4, 9], "every length must be in \\[1, 8\\], got 9 for sequence 1")])
def test_the_cpu_kernel_checks_the_lengths_it_reads(lengths, error):
    q, cache = randn(2, 3, 1, 64, seed=1), randn(2, 3, 8, 64, seed=2)
    with pytest.raises(RuntimeError, match=error):
        operator("decode_attention_native")(q, cache, cache, torch.tensor(lengths))


def test_the_cpu_kernel_refuses_other_dtypes_by_name():
    q, cache = randn(1, 2, 1, 64, seed=3).bfloat16(), randn(1, 2, 8, 64, seed=4).bfloat16()
    with pytest.raises(RuntimeError, match="q must be a float32 CPU tensor"):
        operator("decode_attention_native")(q, cache, cache, torch.tensor([5]))
    reason = ops.backends()["native"].impls["decode_attention"].supports(q, cache, cache, torch.tensor([5]))
    assert reason == "torch.bfloat16 on the CPU (the CPU kernel takes float32)"


@pytest.mark.parametrize("head_dim", [64, 48, 40], ids=["vectors", "vectors_odd", "portable"])
@pytest.mark.parametrize("lengths", [[1], [300, 7, 1024]], ids=["one", "long_ragged"])
def test_the_cpu_kernel_matches_the_reference_at_any_head_dim(head_dim, lengths):
    """Head dims of whole AVX-512 vectors (any count up to 8) and the others (portable), appending the new token; up to the 1024 positions of GPT-2's context."""
    B, H, S, Tq = len(lengths), 2, 1024, 1
    q = randn(B, H, Tq, head_dim, seed=5, scale=2.0)
    k, v = randn(B, H, S, head_dim, seed=6), randn(B, H, S, head_dim, seed=7)
    k_new, v_new = randn(B, H, Tq, head_dim, seed=8), randn(B, H, Tq, head_dim, seed=9)
    lengths_t = torch.tensor(lengths)
    k_ref, v_ref = k.clone(), v.clone()
    for b, n in enumerate(lengths):
        k_ref[b, :, n - Tq:n], v_ref[b, :, n - Tq:n] = k_new[b], v_new[b]
    want = naive_decode_attention(q, k_ref, v_ref, lengths_t)
    y = operator("decode_attention_append_native")(q, k, v, lengths_t, k_new, v_new)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert_close(y, want)


# ---- the operators on a GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 12, 1024, 64), (1, 25, 1024, 64), (2, 4, 512, 128), (3, 2, 77, 32)], ids=str)
def test_causal_attention_gpt2_shapes(dtype, shape):
    q, k, v = qkv(shape, dtype, "cuda", seed=1)
    out, lse = operator("causal_attention_native")(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == shape[:-1]
    assert_close(out, naive_causal_attention(q, k, v))  # NaN anywhere (an element left unwritten) fails here
    assert_close(lse, naive_lse(q, k), torch.float32, scale=2)


@pytest.mark.gpu
def test_causal_attention_on_the_models_layout(dtype):
    """q, k, v sliced out of one [B, T, 3, H, D] projection and viewed as [B, H, T, D], as the model passes
    them; and a head dim that is not unit-stride (copied by the binding)."""
    B, T, H, D = 2, 200, 12, 64
    q, k, v = randn(B, T, 3, H, D, dtype=dtype, device="cuda", seed=2).permute(2, 0, 3, 1, 4)
    out, lse = operator("causal_attention_native")(q, k, v)
    assert_close(out, naive_causal_attention(q, k, v))
    assert_close(lse, naive_lse(q, k), torch.float32, scale=2)
    q_t, k_t, v_t = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    assert q_t.stride(-1) != 1
    torch.testing.assert_close(operator("causal_attention_native")(q_t, k_t, v_t)[0], out, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("lengths_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_decode_attention_gpt2_shapes(dtype, Tq, lengths_dtype):
    B, H, S, D = 8, 12, 1024, 64
    lengths = torch.randint(Tq, S + 1, (B,), generator=torch.Generator().manual_seed(0)).tolist()
    q, k, v, lengths_t = decode_case(B, H, S, D, lengths, Tq, dtype, "cuda", lengths_dtype, seed=3)
    out = operator("decode_attention_native")(q, k, v, lengths_t)
    assert out.dtype == dtype and out.shape == (B, H, Tq, D)
    assert_close(out, naive_decode_attention(q, k, v, lengths_t))


# (B, H, S, D, lengths, Tq): one sequence alone cuts its cache into many chunks; lengths end inside
# chunks, on their edges and leave whole chunks past them; the most queries; every head dim.
DECODE_CASES = [
    (1, 1, 4096, 64, [4096], 1),
    (1, 2, 4000, 128, [65], 16),
    (3, 1, 2048, 16, [1, 64, 1999], 1),
    (2, 3, 777, 32, [3, 777], 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-S{c[2]}-D{c[3]}-Tq{c[5]}")
def test_decode_attention_chunk_edges(dtype, case):
    B, H, S, D, lengths, Tq = case
    q, k, v, lengths_t = decode_case(B, H, S, D, lengths, Tq, dtype, "cuda", seed=4)
    assert_close(operator("decode_attention_native")(q, k, v, lengths_t), naive_decode_attention(q, k, v, lengths_t))


@pytest.mark.gpu
def test_decode_attention_on_a_token_major_cache():
    """A [B, S, H, D] cache viewed as [B, H, S, D], and q as [B, Tq, H, D]."""
    B, H, S, D, lengths = 2, 4, 300, 64, [9, 300]
    k, v = (randn(B, S, H, D, device="cuda", seed=seed) for seed in (5, 6))
    for b, length in enumerate(lengths):
        k[b, length:] = v[b, length:] = math.nan
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    q = randn(B, 2, H, D, device="cuda", seed=7, scale=2.0).transpose(1, 2)
    lengths_t = torch.tensor(lengths, device="cuda")
    assert_close(operator("decode_attention_native")(q, k, v, lengths_t), naive_decode_attention(q, k, v, lengths_t))


@pytest.mark.gpu
def test_decode_attention_replays_from_a_cuda_graph():
    """The binding never reads the lengths on the host: a captured call follows new lengths on replay."""
    B, H, S, D = 4, 12, 512, 64
    q, k, v, lengths = decode_case(B, H, S, D, [S] * B, 1, torch.bfloat16, "cuda", seed=8)
    k, v = k.nan_to_num(), v.nan_to_num()
    op = operator("decode_attention_native")
    op(q, k, v, lengths)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(q, k, v, lengths)
    for new_lengths in ([1, 100, 257, 512], [512, 3, 64, 65]):
        lengths.copy_(torch.tensor(new_lengths))
        graph.replay()
        assert_close(out, naive_decode_attention(q, k, v, lengths))


@pytest.mark.gpu
def test_operators_pass_opcheck():
    q, k, v = qkv((2, 3, 70, 64), torch.bfloat16, "cuda", seed=9)
    torch.library.opcheck(operator("causal_attention_native").default, (q, k, v))
    q, k, v, lengths = decode_case(2, 3, 90, 64, [5, 90], 3, torch.bfloat16, "cuda", seed=10)
    k, v = k.nan_to_num(), v.nan_to_num()  # opcheck compares inputs before and after, and NaN never equals NaN
    torch.library.opcheck(operator("decode_attention_native").default, (q, k, v, lengths))


@pytest.mark.gpu
def test_torch_compile_fullgraph_traces_the_backend():
    operator("causal_attention_native")
    operator("decode_attention_native")
    q, k, v = (t.transpose(1, 2) for t in qkv((2, 50, 3, 64), torch.bfloat16, "cuda", seed=11))
    torch.testing.assert_close(torch.compile(nb.causal_attention, fullgraph=True)(q, k, v),
                               nb.causal_attention(q, k, v))
    q, k, v, lengths = decode_case(2, 3, 90, 64, [5, 90], 1, torch.bfloat16, "cuda", seed=12)
    torch.testing.assert_close(torch.compile(nb.decode_attention, fullgraph=True)(q, k, v, lengths),
                               nb.decode_attention(q, k, v, lengths))
