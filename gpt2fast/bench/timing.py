"""How a call is timed: warm-up first, then many calls; the median and the spread (p20, p80).

Kernels (`time_kernel`): on CUDA, `triton.testing.do_bench` when triton imports, else CUDA events
around each call; either way a 256 MB buffer is written between calls so that no call finds its
inputs in L2 left there by the one before. On the CPU, `time.perf_counter` around each call.
Whole-model calls (`time_wall`): the wall clock around each call, the device synchronised, since
host work (sampling, Python, syncs) is part of what a user waits for. A `Prepared` call has set-up that
must run before every call and is not timed (the prefill before the decode steps).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB)
MAX_REPS = 1000


@dataclass(frozen=True)
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int | None  # None where do_bench chose the count itself


@dataclass(frozen=True)
class Prepared:
    """A call whose set-up runs before every timed call, untimed: `run(prepare())`."""
    prepare: Callable[[], object]
    run: Callable[[object], object]


def method(device: str) -> str:
    """What `time_kernel` uses on this device, for the record."""
    if device != "cuda":
        return "time.perf_counter"
    return "triton.testing.do_bench" if _do_bench() else "CUDA events, L2 flushed between calls"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_kernel(fn: Callable[[], object], device: str, budget_s: float) -> Timing:
    """Time a short call, spending about budget_s on it after warm-up."""
    if device != "cuda":
        return time_wall(fn, device, budget_s, min_reps=5)
    do_bench = _do_bench()
    if do_bench is None:
        return _cuda_events(fn, budget_s)
    ms = do_bench(fn, warmup=budget_s * 250, rep=budget_s * 1000, quantiles=[0.5, 0.2, 0.8])
    return Timing(*(t / 1e3 for t in ms), reps=None)


def time_wall(fn: Callable[[], object] | Prepared, device: str, budget_s: float, min_reps: int = 3) -> Timing:
    """Wall-clock time per call, at least min_reps calls, about budget_s of timed calls after warm-up."""
    last = _warm_up(fn, device, budget_s / 4)
    return summary([_wall(fn, device) for _ in range(_reps(budget_s, last, min_reps))])


def _wall(fn: Callable[[], object] | Prepared, device: str) -> float:
    """Seconds of one call, the device synchronised after it; a Prepared call's set-up runs first, untimed,
    the device synchronised before the clock starts."""
    if isinstance(fn, Prepared):
        state = fn.prepare()
        sync(device)
        start = time.perf_counter()
        fn.run(state)
    else:
        start = time.perf_counter()
        fn()
    sync(device)
    return time.perf_counter() - start


def summary(times: list[float]) -> Timing:
    cuts = statistics.quantiles(times, n=10, method="inclusive")  # deciles: cuts[1] is p20, cuts[7] is p80
    return Timing(statistics.median(times), cuts[1], cuts[7], len(times))


def _warm_up(fn, device: str, budget_s: float) -> float:
    """Call fn until budget_s has passed (at least twice: the first call may compile or allocate);
    returns the last call's time, the estimate of a steady call."""
    spent, calls = 0.0, 0
    while calls < 2 or spent < budget_s:
        last = _wall(fn, device)
        spent, calls = spent + last, calls + 1
    return last


def _reps(budget_s: float, per_call_s: float, min_reps: int) -> int:
    return max(min_reps, min(MAX_REPS, int(budget_s / max(per_call_s, 1e-9))))


def _do_bench():
    try:
        from triton.testing import do_bench
    except Exception:  # triton missing or broken: CUDA events serve
        return None
    return do_bench


def _cuda_events(fn, budget_s: float) -> Timing:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    last = _warm_up(fn, "cuda", budget_s / 4)
    reps = _reps(budget_s, last, min_reps=5)
    starts, ends = ([torch.cuda.Event(enable_timing=True) for _ in range(reps)] for _ in range(2))
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summary([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])
