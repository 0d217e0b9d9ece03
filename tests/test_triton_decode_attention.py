"""The triton decode_attention kernel: every output element written, chunk edges, refusals, the model.

test_ops_attention.py runs it against the fp64 oracle through the `backend` fixture; here the launcher
is driven directly, with the cache cut into many chunks so that lengths end mid-chunk and whole chunks
lie past a length. Without CUDA it runs in triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
import logging
import math

import pytest
import torch

import gpt2fast
from gpt2fast import GPT2, ops
from gpt2fast.config import GPT2Config
from gpt2fast.ops import triton_backend as tb
from conftest import CUDA, assert_close, fallback_records, randn
from test_ops_attention import kv_cache, naive_decode_attention

REASON = ops.backends()["triton"].unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def kernel(poisoned_empty):
    """The kernel module, run with torch.empty poisoned (conftest.py): an element it fails to write shows."""
    return tb._kernels("decode_attention")


def decode_case(B, H, S, D, lengths, Tq, dtype=torch.float32, seed=0):
    q = randn(B, H, Tq, D, dtype=dtype, device=DEVICE, seed=seed, scale=2.0)
    k, v = kv_cache(B, H, S, D, lengths, dtype, DEVICE, seed=seed + 1, garbage=math.nan)
    return q, k, v, torch.tensor(lengths, device=DEVICE)


# (B, H, S, D, lengths, Tq, num_splits): chunks of 16 keys, lengths ending inside, on and past chunk edges.
SPLIT_CASES = [
    (2, 2, 100, 64, [1, 100], 1, 7),  # length 1: one chunk works, six write the neutral partial
    (3, 1, 100, 32, [17, 48, 63], 3, 7),  # mid-chunk, on a chunk edge, one key into the last chunk
    (1, 2, 130, 128, [130], 16, 9),  # length == S, a last chunk of 2 keys, the most queries
    (8, 1, 64, 32, [2, 3, 5, 16, 17, 33, 50, 64], 2, 4),  # B = 8, lengths spread over the chunks
    (1, 1, 48, 16, [47], 1, 3),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"B{c[0]}-S{c[2]}-D{c[3]}-Tq{c[5]}-splits{c[6]}")
def test_many_splits_write_every_element_and_match_naive(kernel, dtype, case):
    B, H, S, D, lengths, Tq, num_splits = case
    q, k, v, lengths_t = decode_case(B, H, S, D, lengths, Tq, dtype)
    y = kernel.decode_attention_forward(q, k, v, lengths_t, num_splits=num_splits)
    assert y.dtype == dtype and y.shape == (B, H, Tq, D)
    assert_close(y, naive_decode_attention(q, k, v, lengths_t))  # NaN anywhere fails here


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_split_count_does_not_change_the_result(kernel, num_splits):
    q, k, v, lengths = decode_case(1, 3, 80, 64, [80], 1, seed=7)
    y = kernel.decode_attention_forward(q, k, v, lengths, num_splits=num_splits)
    assert_close(y, naive_decode_attention(q, k, v, lengths))


def test_non_contiguous_cache_view(kernel):
    """A cache sliced out of a larger buffer ([B, S, H, D] transposed), as a model may hand it over."""
    B, H, S, D, lengths = 2, 2, 40, 32, [9, 40]
    buffer_k = randn(B, S, H, D, device=DEVICE, seed=3)
    buffer_v = randn(B, S, H, D, device=DEVICE, seed=4)
    for b, length in enumerate(lengths):
        buffer_k[b, length:] = buffer_v[b, length:] = math.nan
    k, v = buffer_k.transpose(1, 2), buffer_v.transpose(1, 2)
    q = randn(B, H, 2, D, device=DEVICE, seed=5, scale=2.0)
    lengths_t = torch.tensor(lengths, device=DEVICE)
    y = kernel.decode_attention_forward(q, k, v, lengths_t, num_splits=3)
    assert_close(y, naive_decode_attention(q, k, v, lengths_t))


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"B{c[0]}-S{c[2]}-D{c[3]}-Tq{c[5]}-splits{c[6]}")
def test_append_across_chunk_edges_writes_the_cache_once_and_matches_naive(kernel, dtype, case):
    """The new tokens' positions may straddle a chunk edge: each is written by the chunk that holds it."""
    B, H, S, D, lengths, Tq, num_splits = case
    q, k, v, lengths_t = decode_case(B, H, S, D, [n - Tq for n in lengths], Tq, dtype)
    lengths_t += Tq
    k_new = randn(B, H, Tq, D, dtype=dtype, device=DEVICE, seed=20)
    v_new = randn(B, H, Tq, D, dtype=dtype, device=DEVICE, seed=21)
    expected_k, expected_v = k.clone(), v.clone()
    for b, length in enumerate(lengths):
        expected_k[b, :, length - Tq:length], expected_v[b, :, length - Tq:length] = k_new[b], v_new[b]
    y = kernel.decode_attention_forward(q, k, v, lengths_t, k_new, v_new, num_splits=num_splits)
    torch.testing.assert_close(k, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v, expected_v, rtol=0, atol=0, equal_nan=True)
    assert_close(y, naive_decode_attention(q, expected_k, expected_v, lengths_t))


def test_append_refuses_a_cache_it_could_not_write_in_place(kernel):
    q, k, v, lengths = decode_case(1, 2, 16, 32, [8], 1)
    strided = torch.empty(1, 2, 16, 64, device=DEVICE)[..., ::2]
    with pytest.raises(ValueError, match="unit stride along the head dim"):
        kernel.decode_attention_forward(q, strided, v, lengths, q, q)


def test_custom_op_passes_opcheck():
    q, k, v, lengths = decode_case(2, 2, 24, 32, [5, 24], 2)
    k, v = k.nan_to_num(), v.nan_to_num()  # opcheck compares outputs, and NaN never equals NaN; unread anyway
    torch.library.opcheck(tb.decode_attention_op, (q, k, v, lengths))
    k_new, v_new = (randn(2, 2, 2, 32, device=DEVICE, seed=seed) for seed in (30, 31))
    torch.library.opcheck(tb.decode_attention_append_op, (q, k, v, lengths, k_new, v_new))


def test_torch_compile_fullgraph_traces_the_custom_op():
    q, k, v, lengths = decode_case(2, 2, 24, 32, [5, 24], 1)
    eager = tb.decode_attention(q, k, v, lengths)
    compiled = torch.compile(tb.decode_attention, fullgraph=True)(q, k, v, lengths)
    torch.testing.assert_close(compiled, eager)


# ---- refusals: the reference's result and one log line ----


REFUSALS = {
    "Tq17": (dict(Tq=17), "17 queries (the kernel takes 1 to 16)"),
    "D48": (dict(D=48), "head dim 48"),
    "D256": (dict(D=256), "head dim 256"),
    "grad": (dict(requires_grad=True), "inputs that require grad"),
    "float64": (dict(dtype=torch.float64), "dtype torch.float64"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_inputs_get_the_reference_and_one_log_line(case, fresh_log, monkeypatch, caplog):
    changes, reason = REFUSALS[case]
    monkeypatch.setattr(tb, "decode_attention_op", lambda *a: pytest.fail("the kernel ran on an input it refuses"))
    Tq, D = changes.get("Tq", 1), changes.get("D", 32)
    q, k, v, lengths = decode_case(2, 1, 20, D, [Tq, 20], Tq, changes.get("dtype", torch.float32))
    q.requires_grad_(changes.get("requires_grad", False))
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        for _ in range(2):
            assert_close(ops.decode_attention(q, k, v, lengths).detach(), naive_decode_attention(q, k, v, lengths))
    records = fallback_records(caplog)
    assert len(records) == 1 and "decode_attention" in records[0] and reason in records[0], records


# ---- the model ----


def test_model_generates_the_references_greedy_tokens(monkeypatch):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=2)).eval().to(DEVICE)
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = []
    monkeypatch.setattr(tb, "decode_attention_append_op",  # the model appends through the attention op
                        lambda *a, _op=tb.decode_attention_append_op: calls.append(a[0].shape[2]) or _op(*a))
    with torch.no_grad(), gpt2fast.use_backend("torch"):
        expected = model.generate(ids, 6, do_sample=False)
    with torch.no_grad(), gpt2fast.use_backend("triton"):
        tokens = model.generate(ids, 6, do_sample=False)
    assert calls, "the kernel never ran"
    assert torch.equal(tokens, expected)
