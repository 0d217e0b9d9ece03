"""`python -m gpt2fast bench`: a --quick CPU pass writes a well-formed record, tables and plots; a backend
registered in the ops registry is measured with no change to the suites. Nothing here asserts a timing."""
import importlib.util
import json
import re

import pytest
import torch

from gpt2fast.bench import ceilings, ctranslate2_peer, e2e, hf_patch, report
from gpt2fast.bench.runner import measure_case
from gpt2fast.bench.suite import SUITES, Setting, prepare
from gpt2fast.bench.timing import Timing
from gpt2fast import GPT2
from gpt2fast.cli import main
from gpt2fast.config import GPT2Config
from gpt2fast.ops import reference, registry

OP_FIELDS = {"op", "case", "shape", "impl", "kind", "median_s", "p20_s", "p80_s", "reps", "work", "work_unit",
             "achieved", "unit", "ceiling", "fraction_of_ceiling", "speedup_over_reference", "speedup_over_peers"}
E2E_FIELDS = {"model", "params", "phase", "impl", "batch", "tokens", "median_s", "p20_s", "p80_s", "reps",
              "tokens_per_s", "bound_tokens_per_s", "bound_by", "fraction_of_bound", "speedup_over_transformers",
              "speedup_over_ctranslate2_float32"}
SCALE = {"GB/s": 1e9, "TFLOP/s": 1e12}
QUICK_CPU = Setting("cpu", torch.float32, quick=True)
# The phases with the quantized gpt2fast models and CTranslate2 beside gpt2fast and transformers.
CPU_RUN_PHASES = ("time to first token", "first token", "decode", "decode top-p")


def cpu_runs(s: Setting) -> dict[str, str | None]:
    """The quantized gpt2fast models and CTranslate2's compute types: why each is not run here, or None."""
    return {**{impl: e2e._quantized_unavailable(s) for impl in e2e.OURS_QUANTIZED.values()},
            **{ctranslate2_peer.name(c): ctranslate2_peer.unavailable(s, c) for c in ctranslate2_peer.COMPUTE_TYPES}}


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


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The tables of a report, by the heading above each ("layer_norm", "End to end"): rows {column: cell}."""
    tables, heading, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#### "):
            heading = line.removeprefix("#### ").split(" (")[0]
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|( -+:? \|)+", lines[i + 1]):
            header = _cells(line)
            body = [_cells(x) for x in lines[i + 2:]]
            rows = body[:next((k for k, cells in enumerate(body) if cells is None), len(body))]
            tables[heading] = [dict(zip(header, cells)) for cells in rows]
    return tables


def _cells(line: str) -> list[str] | None:
    return [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None


def seconds(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"µs": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def assert_report_holds(text: str, record: dict) -> None:
    """The report's tables give every row of the record, with its numbers, to their printed precision."""
    tables = markdown_tables(text)
    assert set(tables) == set(SUITES) | {"End to end"}
    for op in SUITES:
        rows = [r for r in record["ops"] if r["op"] == op]
        printed = {(c["case"], c["implementation"]): c for c in tables[op]}
        assert len(printed) == len(tables[op]) == len(rows)
        for r in rows:
            cells = printed[r["case"], r["impl"]]
            assert seconds(cells["time"]) == pytest.approx(r["median_s"], rel=6e-3, abs=6e-8)
            assert float(cells[r["unit"]]) == pytest.approx(r["achieved"], rel=6e-3)
            assert float(cells["vs torch"].rstrip("x")) == pytest.approx(r["speedup_over_reference"], abs=6e-3)
    printed = {(c["phase"], c["implementation"]): c for c in tables["End to end"]}
    assert len(printed) == len(record["end_to_end"])
    for r in record["end_to_end"]:
        cells = printed[r["phase"], r["impl"]]
        assert seconds(cells["time"]) == pytest.approx(r["median_s"], rel=6e-3, abs=6e-8)
        assert float(cells["tokens/s"].replace(",", "")) == pytest.approx(r["tokens_per_s"], rel=1e-3, abs=0.06)
    for r in record["skipped"]:
        assert r["reason"] in text


def test_files_are_written_one_plot_per_op(bench):
    out, record_path, record = bench
    stem = record_path.stem
    assert stem.startswith("bench-cpu-")
    assert_report_holds((out / f"{stem}.md").read_text(), record)
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


def test_read_bandwidth_is_a_ceiling_beside_the_copy_bandwidth(bench):
    out, record_path, record = bench
    limits = record["ceilings"]
    assert limits["read_gbps"] > 0 and limits["read_bytes"] == ceilings.READ_BYTES["cpu quick"]
    assert limits["copy_gbps"] > 0 and limits["copy_bytes"] == ceilings.COPY_BYTES["cpu quick"]
    header = (out / f"{record_path.stem}.md").read_text()
    assert f"read bandwidth **{limits['read_gbps']:.1f} GB/s** (256 MiB sum, read only)" in header
    old = {**record, "ceilings": {k: v for k, v in limits.items() if not k.startswith("read_")},
           "end_to_end": [{k: v for k, v in r.items() if k != "speedup_over_ctranslate2_float32"}
                          for r in record["end_to_end"]]}
    text = report.markdown(old)  # a record from before the read bandwidth and the CTranslate2 peer
    assert "read bandwidth **" not in text and "vs ctranslate2 float32" not in text and "vs transformers" in text


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
    """A row for every phase and implementation run on the CPU, whatever the machine's load: nothing is derived
    from a difference of two timings, and whatever fails is recorded as skipped with its error (shown here).
    The quantized gpt2fast models and CTranslate2 run where this gpt2fast and this machine have them."""
    record = bench[2]
    rows = record["end_to_end"]
    ours = {(phase, "gpt2fast") for phase in ("prefill", "time to first token", "first token", "decode", "decode top-p",
                                              "train step")}
    peer = {(phase, "transformers") for phase, _ in ours}
    patched = {(phase, hf_patch.PATCHED) for phase in ("prefill", "first token", "decode", "train step")}
    others = cpu_runs(QUICK_CPU)
    run = {(phase, impl) for phase in CPU_RUN_PHASES for impl, reason in others.items() if reason is None}
    skipped = [r for r in record["skipped"] if r["op"] == "end to end"]
    assert {(r["phase"], r["impl"]) for r in rows} == ours | peer | patched | run, skipped
    assert {(r["case"], r["impl"]) for r in skipped} == {
        *((f"char {phase} batch 1", e2e.COMPILED_PEER) for phase in CPU_RUN_PHASES),
        *((f"char {phase} batch 1", impl) for phase in ("decode", "decode top-p")
          for impl in (e2e.OURS_EAGER, e2e.OURS_COMPILED)),
        *((f"char {phase} batch 1", impl) for phase in CPU_RUN_PHASES for impl, reason in others.items() if reason)
    }, skipped
    reasons = {r["impl"]: r["reason"] for r in skipped}
    assert all(reasons[impl] == reason for impl, reason in others.items() if reason)
    config = GPT2Config.from_preset("char")
    z = e2e.sizes(QUICK_CPU, config)
    tokens = {"prefill": z.prefill_batch * z.prompt, "time to first token": z.ttft_prompt, "first token": z.prompt,
              "decode": z.new_tokens - 1, "decode top-p": z.new_tokens - 1, "train step": z.train_batch * z.train_len}
    for r in rows:
        assert r.keys() == E2E_FIELDS
        assert r["tokens"] == tokens[r["phase"]] and r["median_s"] > 0, r
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_s"])
        assert r["fraction_of_bound"] == pytest.approx(r["tokens_per_s"] / r["bound_tokens_per_s"])
        same_phase = {x["impl"]: x for x in rows if (x["phase"], x["batch"]) == (r["phase"], r["batch"])}
        assert r["speedup_over_transformers"] == pytest.approx(same_phase["transformers"]["median_s"] / r["median_s"])
        ct2 = same_phase.get(e2e.CT2_FLOAT32)
        assert r["speedup_over_ctranslate2_float32"] == (ct2 and pytest.approx(ct2["median_s"] / r["median_s"]))
        if r["phase"].startswith("decode"):  # every weight read once a step, at the implementation's precision
            weights = e2e.weight_bytes(config, e2e.WEIGHT_DTYPES.get(r["impl"], torch.float32))
            assert r["bound_by"] == "read bandwidth"
            read_gbps = record["ceilings"]["read_gbps"]
            assert r["bound_tokens_per_s"] == pytest.approx(r["batch"] * read_gbps * 1e9 / weights)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic cache", "static cache"])
def test_timed_decode_calls_make_the_tokens_after_the_first(static):
    """Each side's decode call, after its untimed set-up, makes the n - 1 greedy tokens that follow the first,
    as one whole generate of n tokens does; a reused static cache starts afresh every call."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    hf = e2e._hf_model(config).eval()
    x, n = torch.randint(0, 101, (2, 5)), 6
    expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    peer = e2e.hf_decode(hf, x, n, static=static, do_sample=False)
    for _ in range(2):
        assert torch.equal(peer.run(peer.prepare()), expected)
    tokens = e2e.ours_decode(GPT2.from_hf(hf), x, n, do_sample=False).prepare()
    assert torch.equal(torch.stack(list(tokens), dim=1), expected[:, 6:])


def test_decode_is_bound_by_the_read_bandwidth_over_the_weights_at_their_precision():
    (decode,) = [p for p in e2e.phases("char", QUICK_CPU, (4,)) if p.name == "decode"]
    impls = ["gpt2fast", "gpt2fast int8", "gpt2fast bf16", "ctranslate2 float32", "ctranslate2 int8"]
    limits = {"copy_gbps": 1.0, "read_gbps": 2.0, "matmul_tflops": {"float32": 1.0}}
    rows = e2e.rows("char", QUICK_CPU, [(decode, impl, Timing(1.0, 1.0, 1.0, 3)) for impl in impls], limits)
    bound = {r["impl"]: r["bound_tokens_per_s"] for r in rows}
    fp32 = 4 * 2e9 / e2e.weight_bytes(GPT2Config.from_preset("char"), torch.float32)
    assert bound == pytest.approx({"gpt2fast": fp32, "gpt2fast int8": 4 * fp32, "gpt2fast bf16": 2 * fp32,
                                   "ctranslate2 float32": fp32, "ctranslate2 int8": 4 * fp32})
    assert {r["bound_by"] for r in rows} == {"read bandwidth"}


def test_quantized_gpt2fast_runs_a_copy_quantized_once_per_scheme(monkeypatch):
    """A copy of the float32 model per scheme, quantized once and kept for both phases, decodes the tokens after
    the first."""
    schemes, quantize = [], GPT2.quantize

    def counted(self, scheme):
        schemes.append(scheme)
        return quantize(self, scheme)
    monkeypatch.setattr(GPT2, "quantize", counted)
    (first, decode) = [p for p in e2e.phases("char", QUICK_CPU, (2,)) if p.name in ("first token", "decode")]
    for impl in e2e.OURS_QUANTIZED.values():
        assert first.runs[impl]()().shape == (2, e2e.sizes(QUICK_CPU, GPT2Config.from_preset("char")).prompt + 1)
        prepared = decode.runs[impl]()
        assert sum(len(step) for step in prepared.prepare()) == decode.tokens
    assert schemes == list(e2e.OURS_QUANTIZED)  # once per scheme, for both phases


def test_ctranslate2_is_listed_with_the_reason_where_it_cannot_run(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "ctranslate2"
                        else find_spec(name, *args))
    (decode,) = [p for p in e2e.phases("char", QUICK_CPU, (1,)) if p.name == "decode"]
    for compute_type in ctranslate2_peer.COMPUTE_TYPES:
        reason = decode.runs[ctranslate2_peer.name(compute_type)]
        assert reason == "ctranslate2 is not installed (pip install ctranslate2)"
        assert "CPU only" in ctranslate2_peer.unavailable(Setting("cuda", torch.bfloat16), compute_type)


def test_ctranslate2_float32_is_the_transformers_model():
    """The conversion is the same model: CTranslate2's greedy tokens are transformers', every sequence making
    exactly the n tokens asked for (the first one, then the n - 1 the timed decode call covers)."""
    pytest.importorskip("ctranslate2")
    torch.manual_seed(0)
    # eos_token_id: the converted model's end token is the last id; both hold it back for the n tokens.
    config = GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=2, eos_token_id=100)
    hf = e2e._hf_model(config).eval()
    x, n = torch.randint(0, 101, (3, 5)), 6
    expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)[:, 5:]
    generator = ctranslate2_peer.load(ctranslate2_peer.convert(hf), "float32")
    first = ctranslate2_peer.first_token(generator, x)()
    assert [r.sequences_ids[0] for r in first] == expected[:, :1].tolist()
    greedy, top_p = (ctranslate2_peer.decode(generator, x, n, top_p) for top_p in (None, 0.9))
    assert [r.sequences_ids[0] for r in greedy.run(greedy.prepare())] == expected.tolist()
    assert [len(r.sequences_ids[0]) for r in top_p.run(top_p.prepare())] == [n] * 3


def test_prompt_tokens_sets_the_prompt_of_the_end_to_end_phases(tmp_path):
    """The issue's setting, at the char model's size: a 16-token prompt, the first-token and decode phases; with
    CTranslate2 where it is installed."""
    main(["bench", "--quick", "--device", "cpu", "--ops", "none", "--models", "char", "--phases", "first token,decode",
          "--decode-batches", "2", "--prompt-tokens", "16", "--out", str(tmp_path)])
    (record_path,) = tmp_path.glob("bench-*.json")
    record = json.loads(record_path.read_text())
    assert record["settings"]["prompt_tokens"] == 16
    rows = {(r["phase"], r["impl"]): r for r in record["end_to_end"]}
    assert {r["tokens"] for (phase, _), r in rows.items() if phase == "first token"} == {2 * 16}
    for impl, reason in cpu_runs(QUICK_CPU).items():
        assert reason is not None or all(rows[phase, impl]["tokens_per_s"] > 0 for phase in ("first token", "decode"))
    assert e2e.sizes(e2e.E2ESetting("cpu", torch.float32, True, prompt_tokens=16), GPT2Config.from_preset("char")
                     ).prompt == 16
    with pytest.raises(SystemExit, match="--prompt-tokens must be >= 1"):
        main(["bench", "--ops", "none", "--models", "none", "--prompt-tokens", "0"])


def test_compiled_static_cache_peer_is_listed_as_not_run_on_the_cpu(bench):
    skipped = {r["case"]: r["reason"] for r in bench[2]["skipped"] if r["impl"] == e2e.COMPILED_PEER}
    assert set(skipped) == {"char time to first token batch 1", "char first token batch 1", "char decode batch 1",
                            "char decode top-p batch 1"}
    assert all("on GPUs only" in reason for reason in skipped.values())


def test_gpt2fast_decode_variants_not_run_on_a_quick_cpu_run_say_why(bench):
    skipped = {(r["case"], r["impl"]): r["reason"] for r in bench[2]["skipped"]}
    for phase in ("decode", "decode top-p"):
        assert "the gpt2fast row" in skipped[f"char {phase} batch 1", e2e.OURS_EAGER]
        assert "--quick" in skipped[f"char {phase} batch 1", e2e.OURS_COMPILED]


def test_report_prints_and_updates_the_readme_table(bench, tmp_path, capsys):
    out, record_path, record = bench
    main(["bench", "--report", str(out)])  # a folder: its newest record
    assert_report_holds(capsys.readouterr().out, record)
    readme = tmp_path / "docs" / "README.md"  # in another folder than the record: plot links are relative
    readme.parent.mkdir()
    readme.write_text(f"intro\n{report.TABLE_START}\nold table\n{report.TABLE_END}\nafter\n")
    main(["bench", "--report", str(record_path), "--update", str(readme)])
    head, rest = readme.read_text().split(f"{report.TABLE_START}\n")
    section, tail = rest.split(f"\n{report.TABLE_END}")
    assert (head, tail) == ("intro\n", "\nafter\n") and "old table" not in section
    assert_report_holds(section, record)
    links = dict(re.findall(r"!\[([^]]+)\]\(([^)]+)\)", section))
    assert links.keys() == set(SUITES)
    for op, link in links.items():
        assert (readme.parent / link).resolve() == (out / f"{record_path.stem}-{op}.png").resolve()
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no table markers"):
        main(["bench", "--report", str(record_path), "--update", str(readme)])


def test_a_spent_budget_skips_the_rest_and_still_writes_the_record(tmp_path):
    main(["bench", "--quick", "--device", "cpu", "--backends", "torch", "--ops", "layer_norm", "--models", "char",
          "--decode-batches", "2", "--budget-s", "1e-9", "--out", str(tmp_path)])
    (record_path,) = tmp_path.glob("bench-*.json")
    record = json.loads(record_path.read_text())
    assert record["settings"]["budget_s"] == 1e-9 and record["settings"]["decode_batches"] == [2]
    assert record["ops"] == [] and record["end_to_end"] == []
    reasons = {(r["case"], r["impl"]): r["reason"] for r in record["skipped"]}
    cases = [case.label for case in SUITES["layer_norm"](Setting("cpu", torch.float32, quick=True))]
    phases = hf_patch.with_patched_hf(e2e.phases("char", Setting("cpu", torch.float32, quick=True), (2,)), "char",
                                      Setting("cpu", torch.float32, quick=True))
    expected = {(case, "every implementation") for case in cases} | {
        (f"char {p.name} batch {p.batch}", impl) for p in phases for impl, run in p.runs.items() if callable(run)}
    assert expected <= reasons.keys()
    assert all("--budget-s" in reasons[key] for key in expected)
    assert {p.batch for p in phases if p.name.startswith("decode")} == {2}


def test_phases_choose_the_end_to_end_phases(tmp_path):
    main(["bench", "--quick", "--device", "cpu", "--ops", "none", "--models", "char", "--phases", "train step",
          "--out", str(tmp_path)])
    (record_path,) = tmp_path.glob("bench-*.json")
    record = json.loads(record_path.read_text())
    assert {r["phase"] for r in record["end_to_end"]} == {"train step"}
    assert {r["impl"] for r in record["end_to_end"]} == {"gpt2fast", "transformers", hf_patch.PATCHED}
    assert record["settings"]["phases"] == ["train step"]
    with pytest.raises(SystemExit, match="unknown phase decoding"):
        main(["bench", "--ops", "none", "--phases", "decoding"])


def test_no_ops_and_no_models_measure_only_the_ceilings(tmp_path):
    main(["bench", "--quick", "--device", "cpu", "--ops", "none", "--models", "none", "--out", str(tmp_path)])
    (record_path,) = tmp_path.glob("bench-*.json")
    record = json.loads(record_path.read_text())
    assert record["ops"] == record["end_to_end"] == [] and record["ceilings"]["copy_gbps"] > 0


@pytest.mark.parametrize("value", ["0", "1,x", ""])
def test_bad_decode_batches_are_an_error(value):
    with pytest.raises(SystemExit, match="--decode-batches takes"):
        main(["bench", "--ops", "none", "--models", "none", "--decode-batches", value])


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


def test_a_copy_without_git_records_the_commit_it_is_given(monkeypatch):
    from gpt2fast import env_info

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(env_info.subprocess, "run", no_git)
    monkeypatch.setenv("GPT2FAST_COMMIT", "abc1234")
    assert env_info.environment()["commit"] == "abc1234"
    monkeypatch.delenv("GPT2FAST_COMMIT")
    assert env_info.environment()["commit"] == "unknown"
