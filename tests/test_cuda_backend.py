"""The `cuda` backend (csrc/, gpt2fast._C): its probe, refusals, its operators' checks, opcheck and
torch.compile, and its CPU sampler on GPT-2's vocabulary.

test_ops_sample.py runs the sampler against the exact distribution too (support, chi-square, HF
parity), through the `backend` fixture; the per-op test files do the same for every CUDA kernel on a GPU.
"""
import logging
import subprocess
import sys

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from gpt2fast.ops import cuda_backend as cb
from test_ops_sample import kept_tokens, random_logits
from conftest import fallback_records

REASON = ops.backends()["cuda"].unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cuda backend unavailable: {REASON}")
GPT2_VOCAB = 50257


def sample_op(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    return torch.ops.gpt2fast.sample_cuda(logits, temperature, top_k, top_p, torch.tensor([seed]))


def test_backends_command_lists_the_ops_built_here():
    out = subprocess.run([sys.executable, "-m", "gpt2fast", "backends"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    line = next(line for line in out.splitlines() if line.startswith("cuda "))
    assert line.split()[1] == "available" and "sample" in line


def test_without_the_extension_the_backend_says_how_to_build_it():
    code = """
import sys
sys.modules["gpt2fast._C"] = None  # what a missing extension looks like to import
from gpt2fast import ops
print(ops.backends()["cuda"].unavailable_reason())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gpt2fast._C is not built" in result.stdout and "--no-build-isolation" in result.stdout


@pytest.mark.parametrize("params", [dict(), dict(top_k=50), dict(top_p=0.9), dict(temperature=0.7, top_k=200, top_p=0.8)],
                         ids=["plain", "top_k", "top_p", "all"])
def test_gpt2_vocabulary_ids_inside_the_kept_set(params):
    logits = torch.randn(8, GPT2_VOCAB, generator=torch.Generator().manual_seed(1)) * 4
    temperature, top_k, top_p = params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0)
    for seed in range(3):
        ids = sample_op(logits, temperature, top_k, top_p, seed)
        assert ids.shape == (8,) and ids.dtype == torch.int64
        for row, token in zip(logits, ids.tolist()):
            assert kept_tokens(row, temperature, top_k, top_p, top_p_margin=1e-5)[token], (params, token)


def test_draws_do_not_depend_on_the_thread_count():
    """Each row's draws are keyed by (seed, row), not by which thread takes the row."""
    logits = random_logits(40, seed=2)[None].repeat(200, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample_op(logits, top_k=10, top_p=0.9, seed=3)
        torch.set_num_threads(max(threads, 2))
        many = sample_op(logits, top_k=10, top_p=0.9, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert not torch.equal(one, sample_op(logits, top_k=10, top_p=0.9, seed=4))


def test_strided_and_low_precision_logits():
    wide = random_logits(30, seed=5, scale=2.0)[None].repeat(300, 1)
    logits = wide[:, 3:25].to(torch.bfloat16)  # rows 30 apart, bf16
    ids = sample_op(logits, top_k=5, seed=6)
    allowed = kept_tokens(logits[0].float(), 1.0, 5, None)
    assert bool(allowed[ids].all())


@pytest.mark.parametrize("args,match", [
    (dict(logits=torch.zeros(3)), r"logits must be \[B, V\]"),
    (dict(logits=torch.zeros(2, 0)), r"V >= 1"),
    (dict(logits=torch.zeros(2, 3, dtype=torch.int64)), "floating point"),
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(logits=torch.tensor([[0.0, float("nan")]])), "NaN"),
    (dict(logits=torch.tensor([[0.0, 1.0], [-float("inf")] * 2])), "all -inf"),
    (dict(seed=torch.tensor([1, 2])), "seed must be one int64"),
], ids=["1d", "empty", "int", "temperature", "top_k", "top_p", "nan", "neginf", "seed"])
def test_the_operator_checks_its_arguments(args, match):
    """Called directly, past gpt2fast.ops' own checks, the operator still refuses what its kernel cannot take."""
    call = dict(logits=torch.zeros(2, 3), temperature=1.0, top_k=0, top_p=1.0, seed=torch.tensor([0])) | args
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gpt2fast.sample_cuda(*call.values())


def test_refused_dtype_gets_the_reference_and_one_log_line(fresh_log, monkeypatch, caplog):
    logits = random_logits(20, seed=8).double()[None]
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("cuda"):
        for _ in range(2):
            assert ops.sample(logits, top_k=1).tolist() == [int(logits.argmax())]
    records = fallback_records(caplog)
    assert len(records) == 1 and "sample" in records[0] and "dtype torch.float64" in records[0], records


def test_tensors_on_a_device_without_kernels_are_refused():
    reason = cb._refusal("sample_cuda", torch.zeros(2, 3, device="meta"))
    assert "tensors on meta: gpt2fast._C has no meta kernel of sample_cuda" in reason


def test_custom_op_passes_opcheck():
    logits = torch.randn(5, 33, generator=torch.Generator().manual_seed(9))
    torch.library.opcheck(torch.ops.gpt2fast.sample_cuda.default, (logits, 0.8, 5, 0.9, torch.tensor([3])))


def test_torch_compile_fullgraph_traces_the_backend():
    logits = torch.randn(4, 33, generator=torch.Generator().manual_seed(10))

    def draw(x, generator=None):
        return cb.sample(x, 1.0, 0, 0.9, generator)

    torch.manual_seed(0)
    compiled = torch.compile(draw, fullgraph=True)(logits)
    torch.manual_seed(0)
    assert torch.equal(compiled, draw(logits))

