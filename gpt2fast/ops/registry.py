"""One registry for every backend of every op, and the rules that pick one per call.

Selection, most specific first: a per-op override (`set_backend(sample="torch")`), then the
backend set for all ops (`set_backend("triton")`, the `use_backend(...)` context manager, or
the GPT2FAST_BACKEND environment variable read at import), default `auto`. `set_backend` holds for the
whole process; `use_backend` for its block, in its own thread, where it wins over `set_backend`. `auto` walks a
preference list per device type, fastest first as the benchmarks measured it. A backend that is
unavailable, lacks the op, or refuses an input falls back to the reference (`torch`) with one log
line per distinct reason.

Backends are open: `register_backend(name, description, probe)` adds one under any new name, and `register`
gives it implementations, op by op; the built-in ones (`torch`, `torch_cpu`, `triton`, `native`) register
themselves the same way.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

log = logging.getLogger("gpt2fast")

OPS = ("layer_norm", "causal_attention", "decode_attention", "gelu_mlp", "bias_gelu", "sample", "linear_cross_entropy",
       "linear", "lm_head", "quantized_linear")
REFERENCE = "torch"
AUTO = "auto"
# Old names that still select a backend, for one release, with a deprecation warning: old name -> new name.
RENAMED = {"cuda": "native"}
_NAME = re.compile(r"[a-z][a-z0-9_]*")

# Fastest first, per device type, and per op where the benchmarks rank that op's backends otherwise. A
# backend is ranked ahead of the reference for one op on one device only, never device-wide, and only
# where records in benchmarks/results/ show it never measurably slower than the reference in any case it
# takes and measurably faster in some, and, on CUDA, correct in every check of the GPU run's first stage
# (.ci/gpu smoke). AUTO_EVIDENCE cites those records, and tests/test_dispatch.py checks that they say so.
# No GPU run has measured the Triton or native kernels yet, so on CUDA `auto` runs the reference, and those
# kernels are chosen by name.
AUTO_ORDER: dict[str, list[str]] = {"cuda": [REFERENCE], "cpu": [REFERENCE]}
AUTO_ORDER_BY_OP: dict[tuple[str, str], list[str]] = {
    # The C++ sampler: 8.5x, 7.4x and 8.0x the reference at batch 1, 16 and 64, V = 50257, top-p 0.9; greedy
    # (its one-pass kernel) 25.7x and 17.5x at batch 16 and 64.
    ("cpu", "sample"): ["native", REFERENCE],
    # The C++ GELU (fp32, AVX-512; the quantized MLP's): 2.7x, 4.3x and 7.0x the reference at 16, 64 and 2048 rows
    # of 3072.
    ("cpu", "bias_gelu"): ["native", REFERENCE],
    # PyTorch arranged for the CPU, for the inputs it takes (torch_cpu_backend.py): split-K at 4 and 8 rows and
    # oneDNN on packed weights at 16 and 64, 1.2-1.3x for linear and gelu_mlp; oneDNN for the LM head, 1.0x at one
    # row, 1.2-2.0x at 4 to 64.
    ("cpu", "linear"): ["torch_cpu", REFERENCE],
    ("cpu", "gelu_mlp"): ["torch_cpu", REFERENCE],
    ("cpu", "lm_head"): ["torch_cpu", REFERENCE],
    # The C++ decode attention (fp32, AVX-512): 1.5x, 1.3x and 2.7x torch_cpu's SDPA path (itself 3.8-9.1x the
    # reference) for one sequence at 1024, four at 512 (ragged) and 64 at 128; torch_cpu takes the rest (other
    # dtypes, CPUs without AVX-512).
    ("cpu", "decode_attention"): ["native", "torch_cpu", REFERENCE],
    # The C++ weight-only matmul: int8 15.6x, 15.6x and 3.5x the reference (dequantize, then matmul) at 1, 16 and
    # 64 rows (768 -> 2304), 98x for the LM head at one row; bf16 5.1x, 4.6x, 3.6x and 30x (AMX at 16 and 64 rows).
    ("cpu", "quantized_linear"): ["native", REFERENCE],
}
CPU_MATMUL_RECORD = "benchmarks/results/bench-cpu-intel-r-xeon-r-processor-20261206-134248.json"
CPU_DECODE_RECORD = "benchmarks/results/bench-cpu-intel-r-xeon-r-processor-20261206-183959.json"
CPU_DECODE_STEP_RECORD = "benchmarks/results/bench-cpu-intel-r-xeon-r-processor-20261206-202257.json"
AUTO_EVIDENCE: dict[tuple[str, str], tuple[str, ...]] = {
    key: ({"linear": CPU_MATMUL_RECORD, "gelu_mlp": CPU_MATMUL_RECORD, "lm_head": CPU_MATMUL_RECORD,
           "decode_attention": CPU_DECODE_RECORD}.get(key[1], CPU_DECODE_STEP_RECORD),)
    for key in AUTO_ORDER_BY_OP}


_REFERENCE_ONLY = (REFERENCE,)


def auto_order(device_type: str, op: str) -> list[str]:
    """The backends `auto` tries for `op` on `device_type`, fastest first."""
    return list(AUTO_ORDER_BY_OP.get((device_type, op), AUTO_ORDER.get(device_type, _REFERENCE_ONLY)))


@dataclass
class Impl:
    fn: Callable
    # Returns None when the implementation takes these arguments, else the reason it does not.
    supports: Callable[..., str | None] | None = None


@dataclass
class Backend:
    name: str
    description: str
    # Returns None when the backend can run here, else the reason it cannot (shown by `backends`).
    probe: Callable[[], str | None]
    impls: dict[str, Impl] = field(default_factory=dict)
    _unavailable: str | None = field(default=None, init=False)
    _probed: bool = field(default=False, init=False)

    def unavailable_reason(self) -> str | None:
        if not self._probed:
            try:
                self._unavailable = self.probe()
            except Exception as e:  # a probe that crashes means the backend cannot be used
                self._unavailable = f"probe failed: {type(e).__name__}: {e}"
            self._probed = True
        return self._unavailable


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, description: str, probe: Callable[[], str | None]) -> Backend:
    """Add the backend `name` (lower case letters, digits, _), whose `probe()` returns None where it can run, else
    why it cannot; then give it ops with `register`. Registering a name again returns the backend already there."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == AUTO or name in RENAMED:
        raise ValueError(f"a backend name is lower case letters, digits and _, starting with a letter, and not "
                         f"{AUTO!r} or a former name ({', '.join(RENAMED)}); got {name!r}")
    _BACKENDS.setdefault(name, Backend(name, description, probe))
    return _BACKENDS[name]


def choices() -> tuple[str, ...]:
    """The names a selection takes: `auto` and every registered backend (former names are not listed)."""
    return (AUTO, *_BACKENDS)


def register(op: str, backend: str, supports: Callable[..., str | None] | None = None):
    """Decorator: make `fn` the `backend` implementation of `op`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")

    def wrap(fn: Callable) -> Callable:
        if backend not in _BACKENDS:
            raise ValueError(f"register_backend({backend!r}, ...) must come before registering its ops")
        _BACKENDS[backend].impls[op] = Impl(fn, supports)
        return fn

    return wrap


def backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def _check_choice(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"a backend name is a string, got {name!r}")
    name = name.strip().lower()
    if name in RENAMED:
        warnings.warn(f"gpt2fast: the backend {name!r} is now called {RENAMED[name]!r}; the old name will stop "
                      f"working in the next release", FutureWarning, stacklevel=4)
        name = RENAMED[name]
    if name not in choices():
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(choices())}")
    return name


def _from_env() -> str:
    """GPT2FAST_BACKEND, or `auto` (with one warning naming the bad value) when it names no backend: a typo in
    the environment must not stop `import gpt2fast`, nor `--help`."""
    value = os.environ.get("GPT2FAST_BACKEND") or AUTO
    try:
        return _check_choice(value)
    except ValueError as e:
        log.warning("gpt2fast: GPT2FAST_BACKEND: %s; using auto", e)
        return AUTO


Selection = tuple[str, dict[str, str]]  # (the backend for all ops, per-op overrides)

# set_backend's selection holds for the whole process, every thread and executor worker included;
# use_backend's holds in its block, in its own thread (or asyncio task) only, and wins there.
# Read from GPT2FAST_BACKEND by `select_from_environment`, once the built-in backends are registered.
_process_selection: Selection = (AUTO, {})
_local_selection: contextvars.ContextVar[Selection | None] = contextvars.ContextVar("gpt2fast_backend", default=None)
_set_lock = threading.Lock()


def _current() -> Selection:
    return _local_selection.get() or _process_selection


def _parse(base: Selection, backend: str | None, per_op: dict[str, str]) -> Selection:
    current, overrides = base
    overrides = dict(overrides)
    for op, name in per_op.items():
        if op not in OPS:
            raise ValueError(f"unknown op {op!r} in backend override; ops are {', '.join(OPS)}")
        overrides[op] = _check_choice(name)
    return (_check_choice(backend) if backend is not None else current), overrides


# Dynamo cannot trace a ContextVar but reads (and guards on) a plain dict, so compiled code reads this
# copy of the selection last made, and recompiles when it changes.
_compiled_view: dict[str, Selection] = {"selection": _current()}


def select_from_environment() -> None:
    """The process's selection from GPT2FAST_BACKEND (gpt2fast.ops calls it at import, after registering its
    backends; a backend registered later is selected with set_backend)."""
    global _process_selection
    with _set_lock:
        _process_selection = (_from_env(), {})
        _compiled_view["selection"] = _current()


def set_backend(backend: str | None = None, **per_op: str) -> None:
    """Set the backend for all ops (`set_backend("triton")`) and/or per op (`set_backend(sample="torch")`),
    for the whole process. Inside a `use_backend` block that block's selection still wins, until it ends."""
    global _process_selection
    with _set_lock:  # two threads setting different ops at once both land
        _process_selection = _parse(_process_selection, backend, per_op)
        _compiled_view["selection"] = _current()


def get_backend(op: str | None = None) -> str:
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    current, overrides = _compiled_view["selection"] if torch.compiler.is_compiling() else _current()
    return overrides.get(op, current) if op else current


@contextlib.contextmanager
def use_backend(backend: str | None = None, **per_op: str) -> Iterator[None]:
    """`set_backend` for a block, in this thread (or asyncio task) only; the previous selection comes back on
    exit. Blocks nest, each on top of the selection in effect where it starts."""
    selection = _parse(_current(), backend, per_op)
    token = _local_selection.set(selection)
    _compiled_view["selection"] = selection
    try:
        yield
    finally:
        _local_selection.reset(token)
        _compiled_view["selection"] = _current()


_logged: set[str] = set()


def _log_once(message: str, level: int = logging.WARNING) -> None:
    if torch.compiler.is_compiling():
        return  # logging breaks a full graph; the same choice in eager code logs it
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def _refusal(name: str, op: str, args: tuple, kwargs: dict) -> str | None:
    taken = _take(name, op, args, kwargs)
    return taken if isinstance(taken, str) else None


def _take(name: str, op: str, args: tuple, kwargs: dict) -> Callable | str:
    """The implementation of `op` in backend `name` if it takes these arguments, else the reason it does not.
    (resolve runs this once per op call or more: it is kept to a few lookups.)"""
    backend = _BACKENDS.get(name)
    if backend is None:
        return "not installed"
    reason = backend.unavailable_reason()
    if reason:
        return reason
    impl = backend.impls.get(op)
    if impl is None:
        return f"no {op} implementation"
    if impl.supports is not None:
        reason = impl.supports(*args, **kwargs) if kwargs else impl.supports(*args)
        if reason is not None:
            return reason
    return impl.fn


def resolve(op: str, device_type: str, args: tuple, kwargs: dict) -> Callable:
    """The implementation of `op` to run for these arguments.

    A backend chosen by name runs the ops it implements; one it does not implement at all (linear has no Triton
    kernel, by design) runs as `auto` would run it, with an INFO line; one it cannot run here, or refuses these
    inputs, falls back to the reference with a WARNING line.
    """
    # get_backend(op) and auto_order, inlined: this runs for every op call, a hundred times a decode step.
    current, overrides = _compiled_view["selection"] if torch.compiler.is_compiling() else (
        _local_selection.get() or _process_selection)
    choice = overrides.get(op, current) if overrides else current
    if choice != AUTO and choice != REFERENCE:
        backend = _BACKENDS.get(choice)
        if backend is not None and backend.unavailable_reason() is None and op not in backend.impls:
            _log_once(f"gpt2fast: backend {choice!r} has no {op} implementation; {op} runs as auto picks", logging.INFO)
            choice = AUTO
    if choice == AUTO:
        order = AUTO_ORDER_BY_OP.get((device_type, op))
        for name in AUTO_ORDER.get(device_type, _REFERENCE_ONLY) if order is None else order:
            taken = _take(name, op, args, kwargs)
            if not isinstance(taken, str):
                return taken
            _log_once(f"gpt2fast: auto skips backend {name!r} for {op} on {device_type}: {taken}", logging.INFO)
    elif choice != REFERENCE:
        taken = _take(choice, op, args, kwargs)
        if not isinstance(taken, str):
            return taken
        _log_once(f"gpt2fast: {op} falls back to the torch reference: backend {choice!r}: {taken}")
    return _BACKENDS[REFERENCE].impls[op].fn
