"""The CUDA kernel of sample (csrc/sample.cu), as the operator gpt2fast::sample_native on CUDA tensors: ids
inside the kept set at GPT-2's vocabulary, the same seed giving the same ids, opcheck, torch.compile and
replay from a CUDA graph. The CPU greedy kernel (csrc/sample_cpu.cpp, gpt2fast::greedy_native): argmax's ids
at every width around its vectors, ties between its two sets of lanes, its checks.

test_ops_sample.py runs the kernel against the exact distribution too (support, chi-square, ties, HF
parity), through the `backend` fixture on the cuda device; tests/cuda/test_sample.cu checks it without Python.
"""
import importlib
import types

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from gpt2fast.ops import native_backend as nb
from test_ops_sample import kept_tokens

REASON = ops.backends()["native"].unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"native backend unavailable: {REASON}")
BUILT_WITH_CUDA = REASON is None and importlib.import_module("gpt2fast._C").with_cuda  # the probe has loaded it
HAS_CUDA_KERNEL = REASON is None and nb._has_kernel("sample_native", "cuda")
needs_cuda_kernel = pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="gpt2fast._C has no CUDA kernel of sample")
GPT2_VOCAB = 50257
PARAMS = [dict(), dict(top_k=50), dict(top_p=0.9), dict(top_k=50, top_p=0.9),
          dict(temperature=0.7, top_k=200, top_p=0.8)]


def sample_op(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    seed = torch.tensor([seed], device=logits.device) if isinstance(seed, int) else seed
    return torch.ops.gpt2fast.sample_native(logits, temperature, top_k, top_p, seed)


def gpt2_logits(rows, seed, dtype=torch.float32):
    """GPT-2-like rows (N(0, 4^2)) with a few -inf entries, on the GPU."""
    logits = torch.randn(rows, GPT2_VOCAB, generator=torch.Generator().manual_seed(seed)) * 4
    logits[:, 1000:1003] = -float("inf")
    return logits.to(device="cuda", dtype=dtype)


def test_sample_takes_cuda_tensors_exactly_where_the_extension_has_its_kernel():
    supports = ops.backends()["native"].impls["sample"].supports
    on_cuda = types.SimpleNamespace(dtype=torch.float32, device=torch.device("cuda"))  # no GPU needed to ask
    reason = supports(on_cuda, 1.0, None, 0.9, None)
    if HAS_CUDA_KERNEL:
        assert reason is None
    else:
        assert "gpt2fast._C has no cuda kernel of sample_native" in reason


@pytest.mark.skipif(not BUILT_WITH_CUDA, reason="gpt2fast._C was built without CUDA")
def test_a_cuda_build_has_the_kernel():
    assert HAS_CUDA_KERNEL, "gpt2fast._C was built with CUDA but without csrc/sample.cu: rebuild it"


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("params", PARAMS, ids=["plain", "top_k", "top_p", "top_k_top_p", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 16, 256])
def test_gpt2_vocabulary_ids_inside_the_kept_set(rows, dtype, params):
    logits = gpt2_logits(rows, seed=rows, dtype=dtype)
    temperature, top_k, top_p = params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0)
    ids = torch.stack([sample_op(logits, temperature, top_k, top_p, seed) for seed in range(3)], 1).cpu()
    assert ids.shape == (rows, 3) and ids.dtype == torch.int64
    for row, tokens in zip(logits.float().cpu(), ids):
        allowed = kept_tokens(row, temperature, top_k, top_p, top_p_margin=1e-5)
        assert bool(allowed[tokens].all()), (params, tokens.tolist())


@pytest.mark.gpu
@needs_cuda_kernel
def test_strided_and_half_precision_rows():
    wide = torch.randn(300, 30, generator=torch.Generator().manual_seed(5)).mul(2).to("cuda")
    logits = wide[:, 3:25].half()[::2]  # rows 60 apart
    ids = sample_op(logits, top_k=5, top_p=0.8, seed=6).cpu()
    for row, token in zip(logits.float().cpu(), ids.tolist()):
        assert kept_tokens(row, 1.0, 5, 0.8, top_p_margin=1e-5)[token]


@pytest.mark.gpu
@needs_cuda_kernel
def test_same_seed_gives_same_ids():
    logits = gpt2_logits(64, seed=7)
    first, again, other = (sample_op(logits, 0.9, 100, 0.9, seed) for seed in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.gpu
@needs_cuda_kernel
def test_custom_op_passes_opcheck_on_cuda():
    logits = gpt2_logits(5, seed=9)
    torch.library.opcheck(torch.ops.gpt2fast.sample_native.default,
                          (logits, 0.8, 5, 0.9, torch.tensor([3], device="cuda")))


@pytest.mark.gpu
@needs_cuda_kernel
def test_torch_compile_fullgraph_on_cuda():
    logits = gpt2_logits(4, seed=10)
    seed = torch.tensor([11], device="cuda")

    def draw(x, seed):
        return torch.ops.gpt2fast.sample_native(x, 1.0, 50, 0.9, seed)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(draw, fullgraph=True)(logits, seed), draw(logits, seed))
    ids = torch.compile(lambda x: nb.sample(x, 1.0, 50, 0.9), fullgraph=True)(logits)
    assert ids.shape == (4,) and bool(((ids >= 0) & (ids < GPT2_VOCAB)).all())


def peaked(rows, step):
    """Logits whose nucleus at top-p 0.9 is one token per row, the peak: (logits, peaks)."""
    g = torch.Generator().manual_seed(100 + step)
    logits = torch.randn(rows, GPT2_VOCAB, generator=g) * 4
    peaks = torch.randint(0, GPT2_VOCAB, (rows,), generator=g)
    logits[torch.arange(rows), peaks] = 100.0
    return logits.cuda(), peaks.cuda()


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_graph_replays_with_new_logits_and_seed():
    """Captured once; each replay reads the logits and the seed copied into the captured tensors."""
    rows = 16
    logits = torch.zeros(rows, GPT2_VOCAB, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sample_op(logits, 1.0, 50, 0.9, seed)  # warm up off the capturing stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = sample_op(logits, 1.0, 50, 0.9, seed)
    for step in range(3):
        new, peaks = peaked(rows, step)
        logits.copy_(new)
        graph.replay()
        assert torch.equal(ids, peaks)
    logits.copy_(gpt2_logits(rows, seed=12))
    for value in (21, 22):
        seed.fill_(value)
        graph.replay()
        assert torch.equal(ids, sample_op(logits, 1.0, 50, 0.9, value))  # the seed is read when the kernel runs


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_graph_replays_ops_sample_on_the_native_backend():
    rows = 8
    logits, _ = peaked(rows, 0)
    with gpt2fast.use_backend("native"):
        generator = torch.Generator(device="cuda").manual_seed(0)
        ops.sample(logits, 0.8, 50, 0.9, generator)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            ids = ops.sample(logits, 0.8, 50, 0.9, generator)
        for step in range(1, 3):
            new, peaks = peaked(rows, step)
            logits.copy_(new)
            graph.replay()
            assert torch.equal(ids, peaks)


# ---- greedy on the CPU ----


def greedy_op(logits):
    return torch.ops.gpt2fast.greedy_native(logits)


@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 31, 32, 33, 77, 1024, GPT2_VOCAB])
@pytest.mark.parametrize("rows", [1, 64])
def test_cpu_greedy_is_argmax_at_every_width(rows, vocab):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    ids = greedy_op(logits)
    assert ids.dtype == torch.int64 and torch.equal(ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("places,first", [((16, 32), 16), ((32, 16), 16), ((0, 16), 0), ((17, 33, 1), 1),
                                          ((48, 49, 47), 47), ((50256, 50240), 50240), ((3, 50256), 3)])
def test_cpu_greedy_takes_the_first_of_equal_maxima_across_its_lanes(places, first):
    """Vectors alternate between two sets of 16 lanes (0-15, 32-47, ... and 16-31, 48-63, ...), merged at the end:
    the lowest index must win whichever set and lane it fell in, and the tail (past the last 32) too."""
    logits = torch.randn(1, GPT2_VOCAB, generator=torch.Generator().manual_seed(1))
    logits[0, list(places)] = 100.0
    assert greedy_op(logits).tolist() == [first]


def test_cpu_greedy_rows_of_inf_and_minus_inf_are_argmax():
    inf = float("inf")
    logits = torch.full((4, 40), -inf)
    logits[1, 39] = 2.0
    logits[2, [5, 20]] = inf
    logits[3] = torch.linspace(-5, 5, 40)
    assert greedy_op(logits).tolist() == logits.argmax(dim=-1).tolist() == [0, 39, 5, 39]


def test_cpu_greedy_reads_strided_rows():
    logits = torch.randn(8, 2 * GPT2_VOCAB, generator=torch.Generator().manual_seed(2))[:, ::2]
    assert torch.equal(greedy_op(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize("logits,match", [
    (torch.randn(5), "logits must be \\[B, V\\]"),
    (torch.randn(2, 0), "logits must be \\[B, V\\]"),
    (torch.randn(2, 7, dtype=torch.float64), "logits must be float32, got Double"),
], ids=["1d", "empty_rows", "float64"])
def test_cpu_greedy_refuses_bad_logits_by_name(logits, match):
    with pytest.raises(RuntimeError, match=match):
        greedy_op(logits)


def test_ops_sample_runs_the_cpu_greedy_kernel_for_fp32_only(monkeypatch):
    """temperature 0 on fp32 CPU logits runs the kernel; other dtypes, torch's max (the kernel takes fp32)."""
    calls = []
    real = torch.ops.gpt2fast.greedy_native

    class Spy:
        def __call__(self, logits):
            calls.append(logits.dtype)
            return real(logits)

    monkeypatch.setattr(torch.ops.gpt2fast, "greedy_native", Spy())
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(3))
    with gpt2fast.use_backend("native"):
        fp32 = ops.sample(logits, temperature=0)
        bf16 = ops.sample(logits.to(torch.bfloat16), temperature=0)
    assert calls == [torch.float32]
    assert torch.equal(fp32, logits.argmax(-1)) and torch.equal(bf16, logits.to(torch.bfloat16).argmax(-1))
