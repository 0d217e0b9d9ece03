"""`python -m gpt2fast bench`: measure the ceilings, every op suite and the end-to-end phases, then write
the record (JSON), its tables (markdown) and one plot per op (PNG)."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import env_info
from ..config import PRESETS
from . import ceilings, e2e, hf_patch, report
from .suite import DEFAULT_DTYPE, REFERENCE, SUITES, Case, Setting, backend_names, dtype_name, prepare
from .timing import method, time_kernel, time_wall

# Seconds of timed calls per implementation (after warm-up), per case and per end-to-end phase.
BUDGET_S = {"cuda": 0.1, "cpu": 0.4, "cpu quick": 0.05, "cuda quick": 0.05}
E2E_BUDGET_S = {"cuda": 2.0, "cpu": 1.0, "cpu quick": 0.2, "cuda quick": 0.5}
DEFAULT_MODELS = {"cuda": ["gpt2", "gpt2-xl"], "cpu": ["gpt2"]}


def main(args) -> None:
    """The `bench` command; args as gpt2fast.cli parses them."""
    if args.report:
        if args.update:
            report.update_readme(Path(args.update), report.readme_section(Path(args.report), Path(args.update)))
            print(f"updated the tables and plots in {args.update}")
        else:
            print(report.markdown(json.loads(report.record_file(Path(args.report)).read_text())))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        raise ValueError(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    s = e2e.E2ESetting(args.device, getattr(torch, args.dtype) if args.dtype else DEFAULT_DTYPE[args.device],
                       args.quick, prompt_tokens=args.prompt_tokens)
    ops = [] if args.ops == "none" else _choose(args.ops, list(SUITES), "op")
    models = [] if args.models == "none" else _choose(args.models, list(PRESETS), "model", DEFAULT_MODELS[s.device])
    # The reference is always measured: every speed-up is over it.
    backends = list(dict.fromkeys([REFERENCE, *_choose(args.backends, list(backend_names()), "backend")]))
    decode_batches = None if args.decode_batches is None else _batches(args.decode_batches)
    phases = _choose(args.phases, list(e2e.PHASES), "phase")
    if args.budget_s is not None and args.budget_s <= 0:
        raise ValueError(f"--budget-s must be > 0 seconds, got {args.budget_s}")
    record = run(ops, models, s, backends, decode_batches=decode_batches, budget_s=args.budget_s, phase_names=phases)
    out = Path(args.out) if args.out else default_out()
    for path in write(record, out):
        print(path)


def default_out() -> Path:
    """benchmarks/results in a source checkout (run from its root), else ./gpt2fast-bench."""
    results = Path("benchmarks/results")
    return results if results.is_dir() else Path("gpt2fast-bench")


def _batches(value: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in value.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise ValueError(f"--decode-batches takes comma-separated batch sizes >= 1, got {value!r}")
    return batches


def _choose(value: str | None, known: list[str], what: str, default: list[str] | None = None) -> list[str]:
    if not value:
        return default if default is not None else known
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def run(ops: list[str], models: list[str], s: Setting, backends=None, progress: bool = True,
        decode_batches: tuple[int, ...] | None = None, budget_s: float | None = None,
        phase_names: list[str] = e2e.PHASES) -> dict:
    """Measure; with budget_s, nothing starts once that many seconds have passed since the start, and what
    was left is recorded as skipped, so that a run cut short still writes what it measured. backends: every
    registered one by default."""
    backends = backend_names() if backends is None else backends
    deadline = Deadline(budget_s)
    cases = [case for op in ops for case in SUITES[op](s)]
    model_phases = {model: [p for p in hf_patch.with_patched_hf(e2e.phases(model, s, decode_batches), model, s)
                            if p.name in phase_names] for model in models}
    bar = tqdm(total=1 + len(cases) + sum(map(len, model_phases.values())), desc="ceilings", disable=not progress)
    limits = ceilings.measure(s)
    bar.update()
    rows, e2e_rows, skipped = [], [], []
    for case in cases:
        bar.set_description(f"{case.op} {case.label}")
        if deadline.passed():
            skipped.append(dict(op=case.op, case=case.label, impl="every implementation", reason=deadline.reason()))
        else:
            case_rows, case_skipped = measure_case(case, s, limits, BUDGET_S[s.size], backends)
            rows, skipped = rows + case_rows, skipped + case_skipped
        bar.update()
    for model, phases in model_phases.items():
        model_rows, model_skipped = measure_model(model, phases, s, limits, bar, deadline)
        e2e_rows, skipped = e2e_rows + model_rows, skipped + model_skipped
    bar.close()
    return {"name": "bench", "device": device_info(s.device), "environment": env_info.environment(),
            "settings": {"device": s.device, "dtype": dtype_name(s.dtype), "quick": s.quick, "ops": ops,
                         "backends": list(backends), "models": models,
                         **({"decode_batches": list(decode_batches)} if decode_batches else {}),
                         **({"prompt_tokens": s.prompt_tokens} if getattr(s, "prompt_tokens", None) else {}),
                         **({"phases": list(phase_names)} if list(phase_names) != list(e2e.PHASES) else {}),
                         **({"budget_s": budget_s} if budget_s is not None else {})},
            "timing": {"ops": method(s.device), "end_to_end": "time.perf_counter around each call, device synchronised",
                       "statistics": "median, p20 and p80 of the calls after warm-up"},
            "ceilings": limits, "ops": rows, "end_to_end": e2e_rows, "skipped": skipped}


def measure_case(case: Case, s: Setting, limits: dict, budget_s: float,
                 backends=None) -> tuple[list[dict], list[dict]]:
    """Time every implementation of one case on the same fresh random inputs; one row each."""
    args, impls, refused = prepare(case, backends)
    times = {}
    for name, impl in impls.items():
        with impl.context():
            times[name] = time_kernel(functools.partial(impl.fn, *args), s.device, budget_s)
    work = case.work(*args)
    if case.work_unit == "bytes":
        unit, scale, ceiling = "GB/s", 1e9, limits["copy_gbps"]
    else:
        unit, scale, ceiling = "TFLOP/s", 1e12, limits["matmul_tflops"][dtype_name(s.dtype)]
    peers = [name for name in times if impls[name].kind == "peer"]
    rows = []
    for name, t in times.items():
        achieved = work / t.median_s / scale
        rows.append(dict(op=case.op, case=case.label, shape=case.shape, impl=name, kind=impls[name].kind,
                         median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, reps=t.reps,
                         work=work, work_unit=case.work_unit, achieved=achieved, unit=unit, ceiling=ceiling,
                         fraction_of_ceiling=achieved / ceiling,
                         speedup_over_reference=times[REFERENCE].median_s / t.median_s if REFERENCE in times else None,
                         speedup_over_peers={p: times[p].median_s / t.median_s for p in peers if p != name}))
    return rows, [dict(op=case.op, case=case.label, impl=name, reason=reason) for name, reason in refused.items()]


class Deadline:
    """A run's time budget: `passed()` once budget_s seconds have gone by since it was made (never without one)."""

    def __init__(self, budget_s: float | None):
        self.budget_s, self.start = budget_s, time.monotonic()

    def passed(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.start > self.budget_s

    def reason(self) -> str:
        return f"not run: the run's budget of {self.budget_s:g} s (--budget-s) was spent"


def measure_model(model: str, phases: list[e2e.Phase], s: Setting, limits: dict, bar,
                  deadline: Deadline) -> tuple[list[dict], list[dict]]:
    """Time every phase of one model, gpt2fast and its peers; an implementation not run in this setting, or
    that fails a phase (out of memory at a large batch, say), is recorded as skipped and the run goes on."""
    measured, skipped = [], []
    for phase in phases:
        bar.set_description(f"{model} {phase.name} batch {phase.batch}")
        for impl, make in phase.runs.items():
            reason = make if isinstance(make, str) else deadline.reason() if deadline.passed() else None
            if reason is None:
                try:
                    measured.append((phase, impl, time_wall(make(), s.device, E2E_BUDGET_S[s.size])))
                except Exception as e:
                    reason = f"{type(e).__name__}: {str(e).strip()[:200]}"
            if reason:
                skipped.append(dict(op="end to end", case=f"{model} {phase.name} batch {phase.batch}", impl=impl,
                                    reason=reason))
        bar.update()
    return e2e.rows(model, s, measured, limits), skipped


def device_info(device: str) -> dict:
    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
                "driver": _nvidia_driver()}
    return {"type": "cpu", "name": env_info._cpu_name(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def write(record: dict, out: Path) -> list[Path]:
    """DIR/bench-<device>-<date>.json, .md, and -<op>.png per op; returns the paths written."""
    device = record["device"]
    name = ("cpu " if device["type"] == "cpu" else "") + device["name"]
    stamp = re.sub(r"\D", "", record["environment"]["date"])[:14]
    stamp = f"{stamp[:8]}-{stamp[8:]}"
    stem = f"bench-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report.markdown(record) + "\n")
    return [out / f"{stem}.json", out / f"{stem}.md", *report.plots(record, out, stem)]
