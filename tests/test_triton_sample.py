"""The triton sample kernel (kernels/sample.py): every id written, rows read in many blocks, GPT-2's
vocabulary, ties on the nucleus boundary, many rejection rounds, refusals, the custom op and the model.

test_ops_sample.py runs it against the exact distribution too (support, chi-square, HF parity), through
the `backend` fixture. Without CUDA it runs in triton's interpreter (conftest.py sets TRITON_INTERPRET=1),
where one block holds a whole row of up to 65536 logits: the tests that need rows read in many blocks
make the blocks small.
"""
import logging

import pytest
import torch

import gpt2fast
from gpt2fast import GPT2, ops
from gpt2fast.config import GPT2Config
from gpt2fast.ops import triton_backend as tb
from conftest import CUDA, FLOAT_DTYPES, fallback_records
from test_ops_sample import assert_distribution, kept_tokens, oracle_probs, random_logits
from test_triton_backend import DEVICE, needs_triton

pytestmark = needs_triton
GPT2_VOCAB = 50257


@pytest.fixture
def kernel(poisoned_empty):
    """The kernel module, run with torch.empty poisoned (conftest.py): an element it fails to write shows."""
    return tb._kernels("sample")


@pytest.fixture
def small_blocks(kernel, monkeypatch):
    """Blocks of 16 logits, so that a row of a few dozen is read in several blocks and the running sums
    and the first/last candidates carry from block to block."""
    monkeypatch.setattr(kernel, "_MAX_BLOCK", 16)
    return kernel


def run(kernel, logits, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    ids = kernel.sample_forward(logits.to(DEVICE), temperature, top_k, top_p,
                                torch.tensor([seed], dtype=torch.int64, device=DEVICE))
    assert ids.shape == logits.shape[:1] and ids.dtype == torch.int64
    return ids.cpu()


def repeated(row, n):
    return row[None].repeat(n, 1)


# (V, temperature, top_k, top_p): top_k 0 and top_p 1 are "off".
BLOCKED_CASES = [(50, 1.0, 0, 1.0), (50, 0.8, 7, 1.0), (45, 1.0, 0, 0.8), (61, 1.5, 20, 0.9), (33, 1.0, 33, 0.3)]


@pytest.mark.parametrize("V,temperature,top_k,top_p", BLOCKED_CASES)
def test_rows_read_in_many_blocks_draw_the_exact_distribution(small_blocks, V, temperature, top_k, top_p):
    row = random_logits(V, seed=V, scale=1.0)
    ids = run(small_blocks, repeated(row, 6000), temperature, top_k, top_p, seed=1)
    assert_distribution(ids, oracle_probs(row, temperature, top_k, top_p), f"V={V} top_k={top_k} top_p={top_p}")


def test_ties_on_the_nucleus_boundary_keep_the_higher_ids(small_blocks):
    """All 40 logits equal, top_p 0.5: HF's stable ascending sort drops ids 0..19 (cumulative <= 0.5)."""
    ids = run(small_blocks, torch.full((4000, 40), 1.5), top_p=0.5, seed=2)
    expected = torch.zeros(40, dtype=torch.float64)
    expected[20:] = 1 / 20
    assert_distribution(ids, expected, "equal logits, top-p 0.5")


def test_ties_at_the_kth_value_are_all_kept_across_blocks(small_blocks):
    row = torch.arange(48.0) % 6  # values 0..5, each eight times, spread over three blocks
    ids = run(small_blocks, repeated(row, 3000), top_k=3, seed=3)
    assert set(ids.tolist()) == set((row == 5).nonzero().flatten().tolist())  # eight ties at the top


def test_tiny_top_p_takes_many_rounds_and_keeps_the_top_token(small_blocks):
    """Near-uniform logits and top_p 1e-6: nearly every draw is rejected, each raising the pivot, until
    the top token, the only one in the nucleus."""
    row = random_logits(64, seed=4, scale=0.01)
    ids = run(small_blocks, repeated(row, 50), top_p=1e-6, seed=4)
    assert set(ids.tolist()) == {int(row.argmax())}


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("params", [dict(), dict(top_k=50), dict(top_p=0.9), dict(temperature=0.7, top_k=200, top_p=0.8)],
                         ids=["plain", "top_k", "top_p", "all"])
def test_gpt2_vocabulary_every_id_written_and_inside_the_kept_set(kernel, B, params):
    logits = torch.randn(B, GPT2_VOCAB, generator=torch.Generator().manual_seed(B)) * 4
    temperature, top_k, top_p = params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0)
    for seed in range(3):
        ids = run(kernel, logits, temperature, top_k, top_p, seed=seed)
        for row, token in zip(logits, ids.tolist()):
            # The fp32 sums may rightly disagree with fp64 within the margin on the nucleus boundary.
            assert kept_tokens(row, temperature, top_k, top_p, top_p_margin=1e-5)[token], (params, token)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_rows_with_a_stride_and_low_precision(kernel, dtype):
    """A [B, V] view into wider rows (the model's last-position logits may be one), in each dtype."""
    wide = torch.randn(3000, 27, generator=torch.Generator().manual_seed(5)).to(dtype)
    wide[:] = random_logits(27, seed=6, scale=2.0).to(dtype)
    logits = wide[:, 2:22]
    assert logits.stride() == (27, 1)
    ids = run(kernel, logits, top_k=12, top_p=0.9, seed=5)
    assert_distribution(ids, oracle_probs(logits[0], 1.0, 12, 0.9), f"{dtype}")


def test_seed_decides_the_draw(kernel):
    logits = repeated(random_logits(30, seed=7), 300)
    first, again, other = (run(kernel, logits, top_p=0.95, seed=s) for s in (11, 11, 12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ---- refusals, the custom op, dispatch ----


def test_refused_dtype_gets_the_reference_and_one_log_line(fresh_log, monkeypatch, caplog):
    monkeypatch.setattr(tb, "sample_op", lambda *a: pytest.fail("the kernel ran on an input it refuses"))
    logits = random_logits(20, seed=8).double()[None].to(DEVICE)
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("triton"):
        for _ in range(2):
            ids = ops.sample(logits, top_k=1)
            assert ids.tolist() == [int(logits.argmax())]
    records = fallback_records(caplog)
    assert len(records) == 1 and "sample" in records[0] and "dtype torch.float64" in records[0], records


def test_greedy_runs_no_kernel(monkeypatch):
    monkeypatch.setattr(tb, "sample_op", lambda *a: pytest.fail("greedy decoding ran the sampling kernel"))
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]], device=DEVICE)
    with gpt2fast.use_backend("triton"):
        assert ops.sample(logits, temperature=0).tolist() == [1]


def test_custom_op_passes_opcheck():
    logits = torch.randn(5, 33, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    torch.library.opcheck(tb.sample_op, (logits, 0.8, 5, 0.9, torch.tensor([3], device=DEVICE)))


def test_torch_compile_fullgraph_traces_the_custom_op():
    logits = torch.randn(4, 33, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    seed = torch.tensor([4], device=DEVICE)
    compiled = torch.compile(tb.sample_op, fullgraph=True)(logits, 1.0, 0, 0.9, seed)
    assert torch.equal(compiled, tb.sample_op(logits, 1.0, 0, 0.9, seed))


def test_model_samples_through_the_kernel_seeded(monkeypatch):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=2)).eval().to(DEVICE)
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = []
    monkeypatch.setattr(tb, "sample_op", lambda *a, _op=tb.sample_op: calls.append(1) or _op(*a))
    with gpt2fast.use_backend("triton"):
        runs = [model.generate(ids, 6, top_k=20, top_p=0.9, seed=s) for s in (3, 3, 4)]
    assert len(calls) == 3 * 6
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert runs[0].shape == (2, 11) and bool((runs[0] >= 0).all() and (runs[0] < 101).all())


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gpt2_vocabulary_on_gpu_inside_the_kept_set(B, dtype):
    assert CUDA
    logits = (torch.randn(B, GPT2_VOCAB, generator=torch.Generator().manual_seed(B)) * 4).to(dtype)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for params in (dict(top_p=0.9), dict(top_k=50), dict(temperature=0.7, top_k=200, top_p=0.8)):
        with gpt2fast.use_backend("triton"):
            ids = ops.sample(logits.cuda(), generator=generator, **params).cpu()
        for row, token in zip(logits, ids.tolist()):
            assert kept_tokens(row.float(), params.get("temperature", 1.0), params.get("top_k"), params.get("top_p"),
                               top_p_margin=1e-5)[token], (params, token)
