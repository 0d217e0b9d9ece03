"""The README's table of where each op's pieces live: a row per op of OPS, and every path in it real.

The table is how a change to an op starts (which files to open), so it must not drift: each op has its row;
each path exists; a backend's cell names a file exactly where that backend implements the op, and the file
that registers it (or the kernel file its registration loads); the tests named call the op; the benchmark
suite named registers it.
"""
import itertools
import re
from pathlib import Path

from gpt2fast import ops
from gpt2fast.bench.suite import SUITES

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Where each op lives"
COLUMNS = ["op", "reference", "CPU arrangement", "Triton kernel", "C++/CUDA kernel", "tests", "benchmark suite"]
NONE = "—"
# The backend behind each column that names one, and the file registering that backend's ops.
BACKEND_COLUMNS = {"reference": ("torch", "gpt2fast/ops/reference.py"),
                   "CPU arrangement": ("torch_cpu", "gpt2fast/ops/torch_cpu_backend.py"),
                   "Triton kernel": ("triton", "gpt2fast/ops/triton_backend.py"),
                   "C++/CUDA kernel": ("native", "gpt2fast/ops/native_backend.py")}


def table() -> dict[str, dict[str, list[str]]]:
    """op -> column -> the paths in its cell ([] for NONE)."""
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md has no section {HEADING!r}"
    lines = text.split(HEADING, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start:])]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == COLUMNS, header
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        op = cells[0].strip("`")
        out[op] = {col: ([] if cell == NONE else re.findall(r"`([^`]+)`", cell)) for col, cell in zip(COLUMNS, cells)}
    return out


def test_every_op_has_a_row_and_no_row_names_another():
    assert set(table()) == set(ops.OPS)


def test_every_path_exists():
    missing = [(op, col, path) for op, row in table().items() for col in COLUMNS[1:] for path in row[col]
               if not (ROOT / path).exists()]
    assert not missing, missing


def test_a_backend_cell_is_filled_exactly_where_the_backend_implements_the_op():
    backends = ops.backends()
    for op, row in table().items():
        for column, (backend, registering_file) in BACKEND_COLUMNS.items():
            assert bool(row[column]) == (op in backends[backend].impls), (op, column)
            if row[column]:
                assert registering_file in row[column], (op, column, row[column])


def test_kernel_files_are_the_ops_own():
    """A Triton or C++/CUDA cell names, next to the registering file, the kernel source of the op."""
    for op, row in table().items():
        for column, suffixes in (("Triton kernel", (".py",)), ("C++/CUDA kernel", (".cu", ".cpp"))):
            kernels = [p for p in row[column] if p.startswith(("kernels/", "csrc/")) and p.endswith(suffixes)]
            assert bool(kernels) == bool(row[column]), (op, column, row[column])


def test_the_tests_named_call_the_op():
    for op, row in table().items():
        assert row["tests"], op
        for path in row["tests"]:
            text = (ROOT / path).read_text()
            assert f"ops.{op}(" in text or f'"{op}"' in text, (op, path)


def test_the_benchmark_suite_named_registers_the_op():
    """The suite `python -m gpt2fast bench` runs, and where an op has one, the standalone CUDA benchmark."""
    for op, row in table().items():
        assert "gpt2fast/bench/op_suites.py" in row["benchmark suite"] and op in SUITES, op
        others = set(row["benchmark suite"]) - {"gpt2fast/bench/op_suites.py"}
        assert others <= {f"benchmarks/cuda/bench_{op}.cu"}, (op, others)
