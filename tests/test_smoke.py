"""benchmarks/smoke.py, stage 1 of the GPU run, on the CPU with small shapes: every op of every available
backend against the fp64 reference, an element left unwritten caught, decode tokens/s, the summary tables."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from gpt2fast import ops
from gpt2fast.ops import reference, registry

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpt2fast_smoke", ROOT / "benchmarks" / "smoke.py")
smoke = sys.modules["gpt2fast_smoke"] = importlib.util.module_from_spec(_spec)  # registered: its dataclasses look it up
_spec.loader.exec_module(smoke)

AVAILABLE = [b for b in smoke.BACKENDS if ops.backends()[b].unavailable_reason() is None]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "check.json"
    code = smoke.main(["check", "--device", "cpu", "--dtypes", "float32", "--out", str(out)])
    return code, json.loads(out.read_text())


def test_every_op_is_checked_on_every_available_backend(checked):
    code, record = checked
    assert code == 0 and record["name"] == "smoke check"
    rows = record["rows"]
    assert {(r["backend"], r["op"]) for r in rows} == {(b, op) for b in AVAILABLE for op in registry.OPS}
    for r in rows:
        assert r["status"] in ("ok", "refused"), r
        if r["status"] == "ok":
            assert r["error"] <= r["tolerance"] * smoke.GRAD_SCALE, r
    assert not torch.are_deterministic_algorithms_enabled()  # the poisoning is undone after the check


@pytest.mark.skipif("triton" not in AVAILABLE, reason="the triton backend is not available")
def test_triton_runs_every_op_it_implements_on_the_cpu_and_its_gradients(checked):
    implemented = ops.backends()["triton"].impls
    rows = [r for r in checked[1]["rows"] if r["backend"] == "triton"]
    assert rows and all(r["status"] == "ok" for r in rows if r["op"] in implemented), \
        [r for r in rows if r["status"] != "ok"]
    assert all(r["detail"] == f"no {r['op']} implementation" for r in rows if r["op"] not in implemented)


def test_an_element_left_unwritten_fails_the_check(monkeypatch):
    """Uninitialised memory is NaN while checking: an output row a kernel never writes shows."""
    def half_written(x, bias):
        out = torch.empty_like(x)
        out[: x.shape[0] // 2] = reference.bias_gelu(x, bias)[: x.shape[0] // 2]
        return out

    backend = registry.Backend("triton", "a test double", lambda: None)
    backend.impls["bias_gelu"] = registry.Impl(half_written)
    monkeypatch.setitem(registry._BACKENDS, "triton", backend)
    rows = [r for r in smoke.check("tiny", "cpu", [torch.float32], ["triton"]) if r["op"] == "bias_gelu"]
    assert rows and all(r["status"] == "FAIL" and "NaN" in r["detail"] for r in rows), rows


def test_a_wrong_result_fails_the_check(monkeypatch):
    backend = registry.Backend("triton", "a test double", lambda: None)
    backend.impls["layer_norm"] = registry.Impl(lambda x, w, b, eps, residual=None: tuple(
        t * (1 + 1e-4) for t in reference.layer_norm(x, w, b, eps, residual)))
    monkeypatch.setitem(registry._BACKENDS, "triton", backend)
    rows = [r for r in smoke.check("tiny", "cpu", [torch.float32], ["triton"]) if r["op"] == "layer_norm"]
    assert rows and all(r["status"] == "FAIL" and "relative error" in r["detail"] for r in rows), rows


def test_a_draw_outside_the_nucleus_fails_the_sample_check(monkeypatch):
    backend = registry.Backend("triton", "a test double", lambda: None)
    backend.impls["sample"] = registry.Impl(lambda logits, temperature, top_k, top_p, generator: (
        logits.argmax(-1) if temperature == 0 else logits.argmin(-1)))
    monkeypatch.setitem(registry._BACKENDS, "triton", backend)
    rows = [r for r in smoke.check("tiny", "cpu", [torch.float32], ["triton"]) if r["op"] == "sample"]
    assert rows and all(r["status"] == "FAIL" and "outside" in r["detail"] for r in rows), rows


def test_decode_speed_and_the_summary(checked, tmp_path, capsys):
    (tmp_path / "check.json").write_text(json.dumps(checked[1]))
    out = tmp_path / "decode.json"
    # The reference and the C++ extension (where built): Triton's interpreter would take minutes to time.
    assert smoke.main(["decode", "--device", "cpu", "--backends", "native", "--prompt", "8", "--new-tokens", "4",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["torch", *(["native"] if "native" in AVAILABLE else [])]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    capsys.readouterr()
    smoke.main(["summary", str(tmp_path / "check.json"), str(out), str(tmp_path / "absent.json")])
    text = capsys.readouterr().out
    for op in registry.OPS:
        assert any(line.startswith(f"| {op} | {b} |") for line in text.splitlines() for b in AVAILABLE), op
    assert sum(line.startswith("| char float32 ") for line in text.splitlines()) == len(rows)
