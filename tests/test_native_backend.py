"""The `native` backend (csrc/, gpt2fast._C): its probe, refusals, its operators' checks, opcheck and
torch.compile, and its CPU sampler on GPT-2's vocabulary.

test_ops_sample.py runs the sampler against the exact distribution too (support, chi-square, HF
parity), through the `backend` fixture; the per-op test files do the same for every CUDA kernel on a GPU.
"""
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from gpt2fast.ops import native_backend as nb
from test_ops_sample import kept_tokens, random_logits
from conftest import fallback_records

REASON = ops.backends()["native"].unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"native backend unavailable: {REASON}")
GPT2_VOCAB = 50257
ROOT = Path(__file__).resolve().parents[1]


def sample_op(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    return torch.ops.gpt2fast.sample_native(logits, temperature, top_k, top_p, torch.tensor([seed]))


def test_backends_command_lists_the_ops_built_here():
    out = subprocess.run([sys.executable, "-m", "gpt2fast", "backends"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    line = next(line for line in out.splitlines() if line.startswith("native "))
    assert line.split()[1] == "available" and "sample" in line


def test_without_the_extension_the_backend_says_how_to_build_it():
    code = """
import sys
sys.modules["gpt2fast._C"] = None  # what a missing extension looks like to import
from gpt2fast import ops
print(ops.backends()["native"].unavailable_reason())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gpt2fast._C is not built" in result.stdout and "--no-build-isolation" in result.stdout


def test_an_extension_built_before_limits_is_refused_with_how_to_rebuild_it():
    code = """
import sys, types
sys.modules["gpt2fast._C"] = types.ModuleType("gpt2fast._C")  # an older build: no limits()
from gpt2fast import ops
print(ops.backends()["native"].unavailable_reason())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "has no limits()" in result.stdout and "--no-build-isolation" in result.stdout


# ---- the kernels' limits: csrc/gpt2fast.h states them, _C exports them, the backend reads them ----

LIMITS = {"layer_norm_max_width": "LAYER_NORM_MAX_WIDTH", "causal_attention_head_dims": "CAUSAL_HEAD_DIMS",
          "decode_attention_head_dims": "DECODE_HEAD_DIMS", "decode_attention_max_queries": "DECODE_MAX_QUERIES"}


def header_limits() -> dict:
    """gpt2fast.h's int64 constants: `constexpr int64_t name = n;` and `constexpr int64_t name[] = {a, b};`."""
    found = re.findall(r"constexpr int64_t (\w+)(\[\])? = \{?([\d, ]+)\}?;", (ROOT / "csrc" / "gpt2fast.h").read_text())
    return {name: tuple(map(int, values.split(","))) if array else int(values) for name, array, values in found}


def test_the_backends_limits_are_the_extensions_and_those_gpt2fast_h_states():
    from gpt2fast import _C

    assert _C.limits() == header_limits() and set(_C.limits()) == set(LIMITS)
    assert {name: getattr(nb, attribute) for name, attribute in LIMITS.items()} == _C.limits()


def test_no_source_but_gpt2fast_h_writes_the_limits():
    """The bindings' checks, the attention kernels' instantiations and the backend's refusals name the header's
    constants: none spells out their values."""
    limits = header_limits()
    sources = [p for p in sorted((ROOT / "csrc").iterdir()) if p.suffix in (".cpp", ".cu", ".cuh", ".h")
               and p.name != "gpt2fast.h"] + sorted((ROOT / "gpt2fast" / "ops").glob("*.py"))
    attention = [p for p in sources if "attention" in p.name]
    head_dims = sorted({*limits["causal_attention_head_dims"], *limits["decode_attention_head_dims"]})
    forbidden = {
        "a list of head dims": (r"\b" + r"\W+(?:or\W+)?".join(map(str, limits["causal_attention_head_dims"])) + r"\b",
                                sources),
        "a head dim compared": (r"head_dim\s*==\s*\d", sources),
        "a head dim instantiated": (r"case\s+(?:" + "|".join(map(str, head_dims)) + r")\s*:", attention),
        "the widest LayerNorm row": (rf"\b{limits['layer_norm_max_width']}\b",
                                     [p for p in sources if p.suffix in (".cpp", ".py")]),
        "the most decode queries": (rf"(?i)max_queries\s*=\s*{limits['decode_attention_max_queries']}\b", sources),
    }
    found = [f"{path.relative_to(ROOT)}: {what}: {match.group(0)!r}" for what, (pattern, paths) in forbidden.items()
             for path in paths for match in re.finditer(pattern, path.read_text())]
    assert not found, found


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
        torch.ops.gpt2fast.sample_native(*call.values())


def test_refused_dtype_gets_the_reference_and_one_log_line(fresh_log, monkeypatch, caplog):
    logits = random_logits(20, seed=8).double()[None]
    with caplog.at_level(logging.WARNING, logger="gpt2fast"), gpt2fast.use_backend("native"):
        for _ in range(2):
            assert ops.sample(logits, top_k=1).tolist() == [int(logits.argmax())]
    records = fallback_records(caplog)
    assert len(records) == 1 and "sample" in records[0] and "dtype torch.float64" in records[0], records


def test_tensors_on_a_device_without_kernels_are_refused():
    reason = nb._refusal("sample_native", torch.zeros(2, 3, device="meta"))
    assert "tensors on meta: gpt2fast._C has no meta kernel of sample_native" in reason


def test_custom_op_passes_opcheck():
    logits = torch.randn(5, 33, generator=torch.Generator().manual_seed(9))
    torch.library.opcheck(torch.ops.gpt2fast.sample_native.default, (logits, 0.8, 5, 0.9, torch.tensor([3])))


def test_torch_compile_fullgraph_traces_the_backend():
    logits = torch.randn(4, 33, generator=torch.Generator().manual_seed(10))

    def draw(x, generator=None):
        return nb.sample(x, 1.0, 0, 0.9, generator)

    torch.manual_seed(0)
    compiled = torch.compile(draw, fullgraph=True)(logits)
    torch.manual_seed(0)
    assert torch.equal(compiled, draw(logits))

