"""The GPU run's first questions, answered in minutes: does every op of every backend give the reference's
result at GPT-2's shapes, does each CUDA kernel run clean under compute-sanitizer, and how fast does gpt2
decode on each backend.

    python benchmarks/smoke.py check --out check.json        # every op x backend x dtype x shape against the reference
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python benchmarks/smoke.py sanitize                  # one small launch of every kernel, forward and backward
    python benchmarks/smoke.py decode --out decode.json      # gpt2 batch-1 decode tokens/s, torch / triton / native
    python benchmarks/smoke.py summary RECORD...             # the short tables .ci/gpu prints last (smoke,
                                                             # bench and train records; others are passed over)

`check` compares each backend's outputs (and gradients, for the ops with a backward) with the reference
backend run in fp64 on the same inputs, by the norm of the difference over the norm of the reference,
against a tolerance per dtype. Uninitialised memory is poisoned (torch's deterministic mode fills every
torch.empty / at::empty with NaN, the C++ extension's allocations included), so an output element a kernel
fails to write shows as NaN. Sampling is checked by what it may draw: greedy is the fp64 argmax, and every
token drawn with top-k and top-p lies in the fp64 reference's kept set. `--shapes tiny` runs the same
checks on small shapes (the CPU tests run it, with Triton in its interpreter).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS in deterministic mode: before CUDA starts

import torch  # noqa: E402

import gpt2fast  # noqa: E402
from gpt2fast import ops  # noqa: E402
from gpt2fast.ops import reference, registry  # noqa: E402

BACKENDS = ("triton", "native")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ||out - ref|| / ||ref|| allowed, per dtype: fp32 arithmetic; one bf16 / fp16 rounding of the outputs and
# of the intermediates that kernels keep in 16 bits (attention's probabilities, the MLP's activation).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Gradients sum over rows and pass through more 16-bit intermediates.
GRAD_SCALE = 4.0
# The fused LM head + loss keeps the logits and their gradient in the input dtype, as Liger-Kernel does (README).
OP_SCALE = {"linear_cross_entropy": 2.0}


@dataclass(frozen=True)
class Model:
    name: str
    width: int
    heads: int


@dataclass(frozen=True)
class Shapes:
    models: tuple[Model, ...]
    batches: tuple[tuple[int, int], ...]  # (batch, tokens) of the prefill-side ops
    cache: int  # decode attention's KV cache positions
    vocab: int


SHAPES = {
    # GPT-2's widths; T = 1024 at batch 1, 77 at batch 16, 1 at batch 64; decoding over a cache of 1024.
    "gpt2": Shapes((Model("gpt2", 768, 12), Model("gpt2-xl", 1600, 25)), ((1, 1024), (16, 77), (64, 1)), 1024, 50257),
    "tiny": Shapes((Model("tiny", 64, 2),), ((1, 33), (3, 5)), 40, 1000),
}


@dataclass
class Case:
    op: str
    label: str
    args: tuple  # the op's arguments; tensors that need gradients require grad
    grads: bool  # compare the gradients of the inputs that require grad too
    stored: tuple[int, ...] = ()  # arguments the oracle takes as they are (quantized weights and their scales)


def randn(*shape, dtype, device, scale=1.0, shift=0.0, grad=False):
    t = (torch.randn(*shape, device=device) * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def cases(shapes: str, dtype: torch.dtype, device: str) -> list[Case]:
    """Every op at every shape, on fresh random inputs (never zeros)."""
    z, r = SHAPES[shapes], dict(dtype=dtype, device=device)
    out = []
    for m in z.models:
        C, H, D = m.width, m.heads, m.width // m.heads
        for B, T in z.batches:
            tag = f"{m.name} B{B} T{T}"
            out.append(Case("layer_norm", f"{tag} +residual", (
                randn(B, T, C, **r, grad=True), randn(C, **r, shift=1.0, grad=True), randn(C, **r, grad=True), 1e-5,
                randn(B, T, C, **r, grad=True)), True))
            out.append(Case("bias_gelu", tag, (randn(B, T, 4 * C, **r, grad=True), randn(4 * C, **r, grad=True)), True))
            out.append(Case("gelu_mlp", tag, (
                randn(B, T, C, **r, grad=True), randn(C, 4 * C, **r, scale=C ** -0.5, grad=True),
                randn(4 * C, **r, grad=True), randn(4 * C, C, **r, scale=(4 * C) ** -0.5, grad=True),
                randn(C, **r, grad=True)), True))
            q, k, v = (randn(B, H, T, D, **r, scale=2.0 if i == 0 else 1.0, grad=True) for i in range(3))
            out.append(Case("causal_attention", tag, (q, k, v), True))
            out.append(Case("linear", f"{tag} {C}->{3 * C}", (
                randn(B, T, C, **r, grad=True), randn(C, 3 * C, **r, scale=C ** -0.5, grad=True),
                randn(3 * C, **r, grad=True)), True))
            out.append(Case("lm_head", f"{tag} V{z.vocab}", (
                randn(B, T, C, **r, grad=True), randn(z.vocab, C, **r, scale=C ** -0.5, grad=True)), True))
            # Weight-only int8 (per output channel) and bf16, activations in the run's dtype: inference only.
            int8 = torch.randint(-127, 128, (3 * C, C), dtype=torch.int8, device=device)
            scale = torch.rand(3 * C, device=device) / (127 * C ** 0.5) + 1e-4
            bf16 = randn(3 * C, C, dtype=torch.bfloat16, device=device, scale=C ** -0.5)
            for weights, (w, s) in (("int8", (int8, scale)), ("bf16", (bf16, None))):
                out.append(Case("quantized_linear", f"{tag} {weights} {C}->{3 * C}", (
                    randn(B, T, C, **r), w, s, randn(3 * C, **r)), False, stored=(1, 2)))
            rows = B * T
            targets = torch.randint(0, z.vocab, (rows,), device=device)
            targets[::7] = -100
            out.append(Case("linear_cross_entropy", f"{tag} V{z.vocab}", (
                randn(rows, C, **r, grad=True), randn(z.vocab, C, **r, scale=C ** -0.5, grad=True), targets, -100,
                "mean"), True))
            # One new query per sequence against a cache of z.cache positions, each row valid up to its own
            # length (the first row's the whole cache); then the same with the new keys and values appended.
            S = z.cache
            lengths = torch.randint(1, S + 1, (B,), device=device)
            lengths[0] = S
            q, k, v = randn(B, H, 1, D, **r, scale=2.0), randn(B, H, S, D, **r), randn(B, H, S, D, **r)
            out.append(Case("decode_attention", f"{m.name} B{B} cache {S}", (q, k, v, lengths), False))
            out.append(Case("decode_attention", f"{m.name} B{B} cache {S} +append",
                            (q, k, v, lengths, randn(B, H, 1, D, **r), randn(B, H, 1, D, **r)), False))
    out += [Case("sample", f"B{B} V{z.vocab}", (randn(B, z.vocab, **r, scale=4.0),), False) for B, _ in z.batches]
    return out


def fp64(args: tuple, stored: tuple[int, ...] = ()) -> tuple:
    """The arguments in fp64, detached, requiring grad where they did (the reference's inputs), but for those
    whose dtype is their format (stored)."""
    return tuple(a.detach().double().requires_grad_(a.requires_grad)
                 if torch.is_tensor(a) and a.is_floating_point() and i not in stored
                 else a.clone() if torch.is_tensor(a) else a for i, a in enumerate(args))


def detached(args: tuple) -> tuple:
    return tuple(a.detach() if torch.is_tensor(a) else a for a in args)


def fresh(args: tuple) -> tuple:
    """A copy of the arguments for one call (decode_attention's append writes into its caches)."""
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args)


def run_op(op: str, args: tuple, grads: bool) -> list[tuple[str, torch.Tensor]]:
    """The op's outputs, then (where grads) the gradients of the inputs that require grad, by name."""
    with torch.enable_grad():
        out = getattr(ops, op)(*args)
    outputs = list(out) if isinstance(out, tuple) else [out]
    named = [(f"out{i}" if len(outputs) > 1 else "out", t) for i, t in enumerate(outputs)]
    if op == "decode_attention" and len(args) > 4:  # the appended caches are outputs too
        named += [("k_cache", args[1]), ("v_cache", args[2])]
    if grads:
        inputs = [(i, a) for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]
        # A fixed random cotangent per output (the same for every backend: seeded by its shape).
        total = sum((t.float() * _cotangent(t)).sum() for t in outputs if t.is_floating_point() and t.requires_grad)
        g = torch.autograd.grad(total, [a for _, a in inputs], allow_unused=True)
        named += [(f"grad{i}", gi) for (i, _), gi in zip(inputs, g) if gi is not None]
    return [(name, t.detach()) for name, t in named]


def _cotangent(t: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device=t.device).manual_seed(t.numel())
    return torch.randn(t.shape, generator=gen, device=t.device)


def compare(got: list, want: list, tolerance: float) -> tuple[float, str | None]:
    """(the largest relative error over the outputs, the first failure or None)."""
    worst, failure = 0.0, None
    want = dict(want)
    for name, g in got:
        w = want[name].to(g.device)
        if not torch.isfinite(g).all():
            return math.inf, f"{name}: holds NaN or inf (an element not written, or an overflow)"
        scale = tolerance * (GRAD_SCALE if name.startswith("grad") else 1.0)
        err = float((g.double() - w.double()).norm() / w.double().norm().clamp(min=1e-30))
        worst = max(worst, err)
        if err > scale and failure is None:
            failure = f"{name}: relative error {err:.2e} > {scale:.1e}"
    return worst, failure


def check_sample(logits: torch.Tensor, draws: int = 8) -> tuple[float, str | None]:
    """Greedy is the fp64 argmax; every token drawn with temperature, top-k and top-p is one the fp64
    reference keeps. Returns (the fraction of draws outside the kept set, the failure or None)."""
    x64 = logits.double()
    greedy = ops.sample(logits, 0.0)
    if not torch.equal(greedy, x64.argmax(-1)):
        return 1.0, "greedy differs from the fp64 argmax"
    outside = 0
    for temperature, top_k, top_p in ((1.0, None, 0.9), (0.8, 50, None), (0.7, 40, 0.8)):
        kept = torch.isfinite(reference.filtered_logits(x64 - x64.amax(-1, keepdim=True), temperature, top_k, top_p))
        gen = torch.Generator(device=logits.device).manual_seed(0)
        for _ in range(draws):
            ids = ops.sample(logits, temperature, top_k, top_p, gen)
            outside += int((~kept.gather(1, ids[:, None])).sum())
    fraction = outside / (3 * draws * logits.shape[0])
    return fraction, f"{outside} draws outside the fp64 reference's kept set" if outside else None


def check(shapes: str, device: str, dtypes: list[torch.dtype], backends: list[str]) -> list[dict]:
    """One row per (backend, op, dtype, case): error, tolerance, and ok / FAIL / refused / error."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # torch.empty / at::empty poisoned with NaN
    try:
        return _check(shapes, device, dtypes, backends)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _check(shapes: str, device: str, dtypes: list[torch.dtype], backends: list[str]) -> list[dict]:
    rows = []
    for dtype in dtypes:
        torch.manual_seed(0)
        for case in cases(shapes, dtype, device):
            tolerance = TOLERANCE[dtype] * OP_SCALE.get(case.op, 1.0)
            want = {}  # the reference's results, by whether gradients were taken
            for name in backends:
                row = dict(backend=name, op=case.op, dtype=str(dtype).removeprefix("torch."), case=case.label,
                           tolerance=tolerance)
                args, grads, note = case.args, case.grads, None
                reason = registry._refusal(name, case.op, args, {})
                if reason and grads:  # a kernel without a backward: check its forward
                    args, grads, note = detached(args), False, f"forward only ({reason})"
                    reason = registry._refusal(name, case.op, args, {})
                if reason:
                    rows.append(row | dict(status="refused", detail=reason))
                    continue
                try:
                    with gpt2fast.use_backend(name):
                        if case.op == "sample":
                            err, failure = check_sample(*args)
                        else:
                            got = run_op(case.op, fresh(args), grads)
                            if (case.op, grads) not in want:
                                with gpt2fast.use_backend("torch"):
                                    want[case.op, grads] = run_op(case.op, fp64(args, case.stored), grads)
                            err, failure = compare(got, want[case.op, grads], tolerance)
                except Exception as e:  # a crash is an answer too: record it and go on
                    rows.append(row | dict(status="error", detail=f"{type(e).__name__}: {str(e)[:300]}"))
                    continue
                rows.append(row | dict(status="FAIL" if failure else "ok", error=err, detail=failure or note))
                if device == "cuda":
                    torch.cuda.synchronize()
    return rows


def sanitize(device: str, backends: list[str]) -> list[dict]:
    """One small launch of every kernel of each backend, forward and backward, in every dtype (each its own
    instantiation): the program compute-sanitizer watches (with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each
    tensor is its own allocation and an access past its end is seen)."""
    return check("tiny", device, list(DTYPES.values()), backends)


def decode_speed(device: str, backends: list[str], preset: str, prompt: int, new_tokens: int) -> list[dict]:
    """gpt2 batch-1 decode tokens/s (greedy, the default decode mode) with every op on each backend."""
    from gpt2fast import GPT2
    from gpt2fast.bench import ceilings, e2e
    from gpt2fast.bench.suite import DEFAULT_DTYPE, Setting
    from gpt2fast.bench.timing import time_wall
    from gpt2fast.config import GPT2Config

    dtype = DEFAULT_DTYPE[device]
    config = GPT2Config.from_preset(preset)
    prompt = min(prompt, config.n_positions // 2)  # within a small preset's context (the char model's 256)
    new_tokens = min(new_tokens, config.n_positions - prompt)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2(config).to(dtype).eval()
    x = torch.randint(0, config.vocab_size, (1, prompt), device=device)
    limits = ceilings.measure(Setting(device, dtype, quick=True))
    bound = limits["copy_gbps"] * 1e9 / e2e.weight_bytes(config, dtype)
    rows = []
    for name in ["torch", *backends]:
        row = dict(backend=name, model=preset, dtype=str(dtype).removeprefix("torch."), prompt=prompt,
                   new_tokens=new_tokens, bound_tokens_per_s=bound)
        try:
            with gpt2fast.use_backend(name):
                t = time_wall(e2e.ours_decode(model, x, new_tokens, do_sample=False), device, budget_s=2.0)
        except Exception as e:
            rows.append(row | dict(status="error", detail=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        rows.append(row | dict(status="ok", tokens_per_s=(new_tokens - 1) / t.median_s, median_s=t.median_s))
    base = next((r["tokens_per_s"] for r in rows if r["backend"] == "torch" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and base:
            r["speedup_over_torch"] = r["tokens_per_s"] / base
    return rows


def summary(check_rows: list[dict], decode_rows: list[dict]) -> str:
    """A line per (op, backend): each dtype's verdict and worst error; then decode tokens/s per backend."""
    lines = ["| op | backend | " + " | ".join(DTYPES) + " |", "| --- | --- |" + " --- |" * len(DTYPES)] if check_rows \
        else []
    for op, backend in dict.fromkeys((r["op"], r["backend"]) for r in check_rows):
        cells = []
        for dtype in DTYPES:
            rows = [r for r in check_rows if (r["op"], r["backend"], r["dtype"]) == (op, backend, dtype)]
            cells.append(_verdict(rows))
        lines.append(f"| {op} | {backend} | " + " | ".join(cells) + " |")
    if decode_rows:
        lines += ["", "| decode (batch 1) | tokens/s | of bound | vs torch |", "| --- | ---: | ---: | ---: |"][not lines:]
        for r in decode_rows:
            if r["status"] == "ok":
                lines.append(f"| {r['model']} {r['dtype']} {r['backend']} | {r['tokens_per_s']:,.0f} | "
                             f"{100 * r['tokens_per_s'] / r['bound_tokens_per_s']:.0f}% | "
                             f"{r.get('speedup_over_torch', math.nan):.2f}x |")
            else:
                lines.append(f"| {r['model']} {r['dtype']} {r['backend']} | {r['status']}: {r['detail'][:60]} | | |")
    return "\n".join(lines)


def bench_summary(record: dict) -> str:
    """A bench record in short: each backend's time per op case against the reference, the best peer and the
    ceiling; each end-to-end row's tokens/s against its bound and transformers."""
    lines = []
    backends = [r for r in record["ops"] if r["kind"] == "backend" and r["impl"] != "torch"]
    if backends:
        lines += ["| op case | backend | time | of ceiling | vs torch | vs best peer |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in backends:
            peer = min(r["speedup_over_peers"].items(), key=lambda kv: kv[1], default=None)
            lines.append(f"| {r['op']} {r['case']} | {r['impl']} | {r['median_s'] * 1e6:,.1f} µs | "
                         f"{100 * r['fraction_of_ceiling']:.0f}% | {_ratio(r['speedup_over_reference'])} | "
                         + (f"{peer[1]:.2f}x {peer[0]} |" if peer else "— |"))
    if record["end_to_end"]:
        lines += ["" if lines else None, "| model phase batch | implementation | tokens/s | of bound | vs transformers |",
                  "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['model']} {r['phase']} B{r['batch']} | {r['impl']} | {r['tokens_per_s']:,.1f} | "
                  f"{100 * r['fraction_of_bound']:.1f}% | {_ratio(r['speedup_over_transformers'])} |"
                  for r in record["end_to_end"]]
    skipped = [r for r in record["skipped"] if "--budget-s" in r["reason"]]
    if skipped:
        lines.append(f"\nNot reached within the budget: {', '.join(sorted({r['case'] for r in skipped}))}")
    return "\n".join(line for line in lines if line is not None)


def train_summary(records: list[dict]) -> str:
    lines = ["| training run | iterations | seconds | val loss | reached target at | tokens/s | MFU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        run = f"{Path(r['config']['out_dir']).name} ({r['config']['preset']}{', compiled' if r['config']['compile'] else ''})"
        target = (f"{r['seconds_to_target']:.0f} s (iter {r['iter_to_target']})" if r.get("seconds_to_target")
                  else f"not {r['target_val_loss']}" if r.get("target_val_loss") else "—")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {run} | {r['iters']} | {r['seconds']:.0f} | {r['val_loss']:.4f} | {target} | "
                     f"{r['tokens_per_second']:,.0f} | {mfu} |")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _verdict(rows: list[dict]) -> str:
    if not rows:
        return "—"
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    refused = [r for r in rows if r["status"] == "refused"]
    errors = [r["error"] for r in rows if r["status"] in ("ok", "FAIL") and math.isfinite(r["error"])]
    worst = f" (max {max(errors):.1e})" if errors else ""
    if bad:
        return f"**{len(bad)}/{len(rows)} {bad[0]['status']}**{worst}: {bad[0]['case']}: {bad[0]['detail'][:80]}"
    if len(refused) == len(rows):
        return f"refused: {refused[0]['detail'][:45]}"
    return f"ok {len(rows) - len(refused)}/{len(rows)}{worst}" + (f", {len(refused)} refused" if refused else "")


def _available(backends: list[str]) -> list[str]:
    return [b for b in backends if ops.backends()[b].unavailable_reason() is None]


def _write(rows, out: str | None, what: str, started: float) -> None:
    from gpt2fast import env_info

    if out:
        record = dict(name=f"smoke {what}", environment=env_info.environment(), seconds=time.monotonic() - started,
                      backends={b: ops.backends()[b].unavailable_reason() or "available" for b in ops.backends()},
                      rows=rows)
        Path(out).write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["check", "sanitize", "decode", "summary"])
    parser.add_argument("records", nargs="*", help="summary: the check and decode records")
    parser.add_argument("--shapes", default=None, choices=list(SHAPES), help="default: gpt2 on CUDA, tiny on the CPU")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="decode: default gpt2 on CUDA, char on the CPU")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the rows to this JSON record")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.what == "summary":
        records = [json.loads(Path(p).read_text()) for p in args.records if Path(p).is_file()]
        records = [r for r in records if isinstance(r, dict)]
        named = {name: [r for r in records if r.get("name") == name] for name in ("smoke check", "smoke decode",
                                                                                   "bench", "train")}
        parts = [summary([row for r in named["smoke check"] for row in r["rows"]],
                         [row for r in named["smoke decode"] for row in r["rows"]]),
                 *map(bench_summary, named["bench"]), train_summary(named["train"]) if named["train"] else ""]
        print("\n\n".join(part for part in parts if part))
        return 0
    unknown = [b for b in args.backends.split(",") if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    backends = _available(args.backends.split(","))
    for name in set(args.backends.split(",")) - set(backends):
        print(f"{name}: not available: {ops.backends()[name].unavailable_reason()}", file=sys.stderr)
    if args.what == "decode":
        model = args.model or ("gpt2" if args.device == "cuda" else "char")
        rows = decode_speed(args.device, backends, model, args.prompt, args.new_tokens)
        print(summary([], rows))
    else:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
        shapes = args.shapes or ("gpt2" if args.device == "cuda" else "tiny")
        rows = check(shapes, args.device, dtypes, backends) if args.what == "check" else sanitize(args.device, backends)
        print(summary(rows, []))
    _write(rows, args.out, args.what, started)
    failed = [r for r in rows if r["status"] in ("FAIL", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
