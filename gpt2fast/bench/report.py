"""A record as markdown tables and plots, and the README table regenerated from a record."""
from __future__ import annotations

import json
import os
from pathlib import Path

TABLE_START = "<!-- gpt2fast bench table: start -->"
TABLE_END = "<!-- gpt2fast bench table: end -->"


def record_file(path: Path) -> Path:
    """A record's JSON file: `path` itself, or the newest record (by its recorded date) in the folder `path`."""
    if not path.is_dir():
        return path
    files = list(path.glob("bench-*.json"))
    if not files:
        raise FileNotFoundError(f"no bench-*.json record in {path}")
    return max(files, key=lambda p: json.loads(p.read_text())["environment"]["date"])


def readme_section(path: Path, readme: Path) -> str:
    """The tables of the record at `path` (a file or a folder, as record_file takes), then its plots, the
    PNGs written beside it, linked from the README's folder."""
    path = record_file(path)
    plots = sorted(path.parent.glob(f"{path.stem}-*.png"))
    links = [f"![{p.stem.removeprefix(path.stem + '-')}]({os.path.relpath(p, readme.parent)})" for p in plots]
    return markdown(json.loads(path.read_text())) + ("\n\nPlots:\n\n" + "\n".join(links) if links else "")


def markdown(record: dict) -> str:
    ops = _group(record["ops"], "op")
    parts = [_header(record), *(_op_table(op, rows) for op, rows in ops.items())]
    if record["end_to_end"]:
        parts.append(_e2e_table(record["end_to_end"]))
    if record["skipped"]:
        parts.append(_skipped(record["skipped"]))
    return "\n\n".join(parts)


def update_readme(path: Path, table: str) -> None:
    """Replace what lies between the table markers in `path` with `table`."""
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{path} has no table markers: add the lines {TABLE_START} and {TABLE_END}")
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def plots(record: dict, out: Path, stem: str) -> list[Path]:
    """One PNG per op: achieved GB/s or TFLOP/s per case, a bar per implementation, the ceiling dotted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for op, rows in _group(record["ops"], "op").items():
        cases, impls = list(_group(rows, "case")), _group(rows, "impl")
        width = 0.8 / len(impls)
        fig = Figure(figsize=(3 + 1.8 * len(cases), 4.5))
        FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
        ax = fig.subplots()
        for i, (impl, impl_rows) in enumerate(impls.items()):
            bars = ax.bar([cases.index(r["case"]) + (i - (len(impls) - 1) / 2) * width for r in impl_rows],
                          [r["achieved"] for r in impl_rows], width, label=f"{impl} ({impl_rows[0]['kind']})")
            ax.bar_label(bars, fmt="%.3g", fontsize=7)  # readable even where a bar is small beside the ceiling
        unit, ceiling = rows[0]["unit"], rows[0]["ceiling"]
        ax.axhline(ceiling, color="black", linestyle=":", label=f"measured ceiling, {ceiling:.3g} {unit}")
        ax.set_xticks(range(len(cases)), cases, rotation=15, ha="right")
        ax.set_ylabel(f"achieved {unit}")
        ax.set_title(f"{op}: {record['device']['name']}, {record['settings']['dtype']}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths.append(out / f"{stem}-{op}.png")
        fig.savefig(paths[-1], dpi=100)
    return paths


def _group(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _table(header: list[str], lines: list[list[str]], text_columns: int) -> str:
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *lines])


def _header(record: dict) -> str:
    device, env, limits, settings = record["device"], record["environment"], record["ceilings"], record["settings"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "triton", "cuda") if env.get(k))
    driver = f", driver {device['driver']}" if device.get("driver") else ""
    n = limits["matmul_n"]
    peaks = ", ".join(f"{dtype} {tflops:.3g}" for dtype, tflops in limits["matmul_tflops"].items())
    # Records from before the read bandwidth was measured have the copy bandwidth only.
    read = (f"read bandwidth **{limits['read_gbps']:.1f} GB/s** ({limits['read_bytes'] >> 20} MiB sum, read only); "
            if "read_gbps" in limits else "")
    return (f"### {device['name']}{driver}, {settings['dtype']}{' (--quick)' if settings['quick'] else ''}\n\n"
            f"Recorded {env['date']} at commit {env['commit']}; {versions}. "
            f"Ceilings measured in the same run: copy bandwidth **{limits['copy_gbps']:.1f} GB/s** "
            f"({limits['copy_bytes'] >> 20} MiB copy_, read + write); {read}"
            f"matmul peak in TFLOP/s ({n}x{n}): {peaks}. "
            f"Times: {record['timing']['statistics']}; ops timed with {record['timing']['ops']}.")


def _op_table(op: str, rows: list[dict]) -> str:
    unit = rows[0]["unit"]
    peers = list(dict.fromkeys(p for r in rows for p in r["speedup_over_peers"]))
    header = ["case", "implementation", "time", "p20–p80", unit, "of ceiling", "vs torch",
              *(f"vs {p}" for p in peers)]
    lines = [[r["case"], r["impl"], _time(r["median_s"]), f"{_time(r['p20_s'])} – {_time(r['p80_s'])}",
              f"{r['achieved']:.3g}", f"{100 * r['fraction_of_ceiling']:.0f}%", _ratio(r["speedup_over_reference"]),
              *(_ratio(r["speedup_over_peers"].get(p)) for p in peers)] for r in rows]
    bound = "copy bandwidth" if unit == "GB/s" else "matmul peak"
    return f"#### {op} ({unit}; ceiling: {bound}, {rows[0]['ceiling']:.3g} {unit})\n\n" + _table(header, lines, 2)


def _e2e_table(rows: list[dict]) -> str:
    # The speed-up over CTranslate2 where it ran (records from before it have no such column).
    speedups = {"speedup_over_transformers": "vs transformers"} | (
        {"speedup_over_ctranslate2_float32": "vs ctranslate2 float32"}
        if any(r.get("speedup_over_ctranslate2_float32") for r in rows) else {})
    header = ["model", "phase", "implementation", "batch", "time", "p20–p80", "tokens/s", "bound tokens/s",
              "of bound", *speedups.values()]
    lines = [[r["model"], r["phase"], r["impl"], str(r["batch"]), _time(r["median_s"]),
              f"{_time(r['p20_s'])} – {_time(r['p80_s'])}", f"{r['tokens_per_s']:,.1f}",
              f"{r['bound_tokens_per_s']:,.0f} ({r['bound_by']})", f"{100 * r['fraction_of_bound']:.1f}%",
              *(_ratio(r[column]) for column in speedups)] for r in rows]
    return ("#### End to end (random weights of each preset's real size; for the training step the fraction "
            "of the bound is the MFU)\n\n" + _table(header, lines, 3))


def _skipped(rows: list[dict]) -> str:
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        where = r["case"] if r["op"] == "end to end" else r["op"]
        reasons.setdefault((r["impl"], r["reason"]), [])
        if where not in reasons[r["impl"], r["reason"]]:
            reasons[r["impl"], r["reason"]].append(where)
    return "Not measured:\n\n" + "\n".join(f"- {impl} ({', '.join(where)}): {reason}"
                                           for (impl, reason), where in reasons.items())
