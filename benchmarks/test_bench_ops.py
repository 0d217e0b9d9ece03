"""pytest-benchmark over the suites of `python -m gpt2fast bench` (gpt2fast/bench/op_suites.py): one
benchmark per op, case and implementation, every registered backend and every peer.

    python -m pytest benchmarks/test_bench_ops.py --benchmark-only
    GPT2FAST_BENCH_QUICK=1 python -m pytest benchmarks --benchmark-only     # the --quick shapes

The runner is the one that flushes L2 and compares against ceilings; this suite feeds pytest-benchmark's
history and comparisons (--benchmark-autosave, --benchmark-compare).
"""
import os

import pytest

from gpt2fast.bench.suite import SUITES, backend_names, default_setting, prepare
from gpt2fast.bench.timing import sync

SETTING = default_setting(quick=os.environ.get("GPT2FAST_BENCH_QUICK") == "1")
CASES = [case for op in SUITES for case in SUITES[op](SETTING)]
_prepared: dict[int, tuple] = {}  # the case being benchmarked: its inputs and implementations, made once


def _prepare(case):
    if id(case) not in _prepared:
        _prepared.clear()
        _prepared[id(case)] = prepare(case)
    return _prepared[id(case)]


@pytest.mark.parametrize("case,name", [pytest.param(case, name, id=f"{case.op}-{case.label}-{name}")
                                       for case in CASES for name in (*backend_names(), *case.peers)])
def test_op(benchmark, case, name):
    args, impls, skipped = _prepare(case)
    if name in skipped:
        pytest.skip(skipped[name])
    impl = impls[name]
    benchmark.group = f"{case.op} {case.label}"
    benchmark.extra_info.update(work=case.work(*args), work_unit=case.work_unit, kind=impl.kind)

    def call():
        impl.fn(*args)
        sync(SETTING.device)

    with impl.context():
        benchmark(call)
