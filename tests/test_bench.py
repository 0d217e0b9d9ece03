"""`python -m gpt2fast bench`: a --quick CPU pass writes a well-formed record, tables and plots; a backend
registered in the ops registry is measured with no change to the suites. Nothing here asserts a timing."""
import json
import os

import pytest
import torch

from gpt2fast.bench import e2e, hf_patch, report
from gpt2fast.bench.runner import measure_case
from gpt2fast.bench.suite import SUITES, Setting, prepare
from gpt2fast.cli import main
from gpt2fast.ops import reference, registry

OP_FIELDS = {"op", "case", "shape", "impl", "kind", "median_s", "p20_s", "p80_s", "reps", "work", "work_unit",
             "achieved", "unit", "ceiling", "fraction_of_ceiling", "speedup_over_reference", "speedup_over_peers"}
E2E_FIELDS = {"model", "params", "phase", "impl", "batch", "tokens", "median_s", "p20_s", "p80_s", "reps",
              "tokens_per_s", "bound_tokens_per_s", "bound_by", "fraction_of_bound", "speedup_over_transformers"}
SCALE = {"GB/s": 1e9, "TFLOP/s": 1e12}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One --quick run of every op suite and the end-to-end phases of the small char model, the reference
    backend only: conftest runs Triton in its interpreter on the CPU, far too slow to time here."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # quick and steady on a busy machine; nothing here is a timing
    try:
        main(["bench", "--quick", "--device", "cpu", "--backends", "torch", "--models", "char", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    (record_path,) = out.glob("bench-*.json")
    return out, record_path, json.loads(record_path.read_text())


def test_files_are_written_one_plot_per_op(bench):
    out, record_path, record = bench
    stem = record_path.stem
    assert stem.startswith("bench-cpu-")
    assert (out / f"{stem}.md").read_text().strip() == report.markdown(record)
    for op in SUITES:
        assert (out / f"{stem}-{op}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_names_device_versions_and_settings(bench):
    record = bench[2]
    assert {"device", "date", "commit", "torch", "transformers", "python"} <= record["environment"].keys()
    assert record["device"]["type"] == "cpu" and record["device"]["name"]
    assert record["settings"] == {"device": "cpu", "dtype": "float32", "quick": True, "ops": list(SUITES),
                                  "backends": ["torch"], "models": ["char"]}
    limits = record["ceilings"]
    assert limits["copy_gbps"] > 0 and {"float32", "bfloat16"} <= limits["matmul_tflops"].keys()


def test_every_op_row_is_complete_and_its_ratios_come_from_its_times(bench):
    record = bench[2]
    rows = record["ops"]
    assert {r["op"] for r in rows} == set(SUITES)
    for r in rows:
        assert r.keys() == OP_FIELDS
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["achieved"] == pytest.approx(r["work"] / r["median_s"] / SCALE[r["unit"]])
        assert r["fraction_of_ceiling"] == pytest.approx(r["achieved"] / r["ceiling"])
        case = {x["impl"]: x["median_s"] for x in rows if (x["op"], x["case"]) == (r["op"], r["case"])}
        assert r["speedup_over_reference"] == pytest.approx(case["torch"] / r["median_s"])
        assert r["speedup_over_peers"].keys() == {x["impl"] for x in rows if (x["op"], x["case"]) == (r["op"], r["case"])
                                                  and x["kind"] == "peer"} - {r["impl"]}
        for peer, ratio in r["speedup_over_peers"].items():
            assert ratio == pytest.approx(case[peer] / r["median_s"])


def test_every_backend_chosen_is_measured_or_skipped_with_a_reason(bench):
    record = bench[2]
    for op, case in {(r["op"], r["case"]) for r in record["ops"]}:
        measured = {r["impl"] for r in record["ops"] if (r["op"], r["case"]) == (op, case)}
        skipped = {r["impl"]: r["reason"] for r in record["skipped"] if (r["op"], r["case"]) == (op, case)}
        assert set(record["settings"]["backends"]) <= measured | skipped.keys()
        assert not measured & skipped.keys() and all(skipped.values())


def test_end_to_end_rows(bench):
    rows = bench[2]["end_to_end"]
    ours = {(phase, "gpt2fast") for phase in ("prefill", "time to first token", "first token", "decode", "decode top-p",
                                              "train step")}
    peer = {(phase, "transformers") for phase, _ in ours}
    patched = {(phase, hf_patch.PATCHED) for phase in ("prefill", "first token", "decode", "train step")}
    assert {(r["phase"], r["impl"]) for r in rows} == ours | peer | patched
    for r in rows:
        assert r.keys() == E2E_FIELDS
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_s"])
        assert r["fraction_of_bound"] == pytest.approx(r["tokens_per_s"] / r["bound_tokens_per_s"])
        peer = next(x for x in rows if (x["phase"], x["batch"], x["impl"]) == (r["phase"], r["batch"], "transformers"))
        assert r["speedup_over_transformers"] == pytest.approx(peer["median_s"] / r["median_s"])


def test_compiled_static_cache_peer_is_listed_as_not_run_on_the_cpu(bench):
    skipped = {r["case"]: r["reason"] for r in bench[2]["skipped"] if r["impl"] == e2e.COMPILED_PEER}
    assert set(skipped) == {"char time to first token batch 1", "char first token batch 1", "char generate batch 1",
                            "char generate top-p batch 1"}
    assert all("on GPUs only" in reason for reason in skipped.values())


def test_gpt2fast_decode_variants_not_run_on_a_quick_cpu_run_say_why(bench):
    skipped = {(r["case"], r["impl"]): r["reason"] for r in bench[2]["skipped"]}
    for phase in ("first token", "generate", "generate top-p"):
        assert "the gpt2fast row" in skipped[f"char {phase} batch 1", e2e.OURS_EAGER]
        assert "--quick" in skipped[f"char {phase} batch 1", e2e.OURS_COMPILED]


def test_markdown_has_a_table_per_op_and_a_line_per_row(bench):
    text = report.markdown(bench[2])
    for op in SUITES:
        assert f"#### {op} (" in text
    lines = text.splitlines()
    for r in bench[2]["ops"]:
        assert any(line.startswith(f"| {r['case']} | {r['impl']} |") for line in lines)
    assert "#### End to end" in text and "Not measured:" in text


def test_report_prints_and_updates_the_readme_table(bench, tmp_path, capsys):
    out, record_path, record = bench
    main(["bench", "--report", str(out)])  # a folder: its newest record
    assert capsys.readouterr().out.strip() == report.markdown(record)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.TABLE_START}\nold table\n{report.TABLE_END}\nafter\n")
    main(["bench", "--report", str(record_path), "--update", str(readme)])
    plots = "\n".join(f"![{op}]({os.path.relpath(out / f'{record_path.stem}-{op}.png', tmp_path)})"
                      for op in sorted(SUITES))
    section = f"{report.markdown(record)}\n\nPlots:\n\n{plots}"
    assert readme.read_text() == f"intro\n{report.TABLE_START}\n{section}\n{report.TABLE_END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no table markers"):
        main(["bench", "--report", str(record_path), "--update", str(readme)])


def test_unknown_op_or_model_is_an_error():
    with pytest.raises(SystemExit, match="unknown op nope"):
        main(["bench", "--ops", "layer_norm,nope"])
    with pytest.raises(SystemExit, match="unknown model gpt3"):
        main(["bench", "--models", "gpt3"])


def test_a_registered_backend_is_benchmarked_with_no_change_to_the_suites(monkeypatch):
    """One registration: measured where it takes the input, skipped with its own reason where it refuses."""
    def narrow(x, *args):
        return None if x.shape[-1] == 768 else f"width {x.shape[-1]} not supported"

    backend = registry.Backend("triton", "a test double", lambda: None)
    backend.impls["layer_norm"] = registry.Impl(reference.layer_norm, supports=narrow)
    monkeypatch.setitem(registry._BACKENDS, "triton", backend)
    s = Setting("cpu", torch.float32, quick=False)
    cases = {case.shape["width"]: case for case in SUITES["layer_norm"](s) if not case.shape["residual"]}

    _, impls, skipped = prepare(cases[768])
    assert impls["triton"].kind == "backend" and "triton" not in skipped
    limits = {"copy_gbps": 1.0, "matmul_tflops": {"float32": 1.0}}
    rows, _ = measure_case(cases[768], s, limits, budget_s=0.01)
    assert {r["impl"] for r in rows} >= {"torch", "triton", "F.layer_norm"}

    _, impls, skipped = prepare(cases[1600])
    assert "triton" not in impls and skipped["triton"] == "width 1600 not supported"
