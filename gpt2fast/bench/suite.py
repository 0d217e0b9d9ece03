"""What a benchmark is made of: a Setting (device, dtype, quick), Cases, Impls, and the suite registry.

A suite is a function `Setting -> list[Case]` registered under an op's name with `@suite(op)`. A case
declares its inputs, the work a call must do (bytes to move or flops) and its peers; it never lists
backends: `implementations` measures every backend in `gpt2fast.ops.registry` on every case, so a
kernel registered there is benchmarked with no change here.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from .. import ops
from ..ops import registry

REFERENCE = registry.REFERENCE
DEFAULT_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Setting:
    device: str
    dtype: torch.dtype
    quick: bool = False

    @property
    def size(self) -> str:
        """The key of the size tables: "cuda", "cuda quick", "cpu" or "cpu quick"."""
        return self.device + (" quick" if self.quick else "")

    def pick(self, gpu: list, cpu: list, quick: list) -> list:
        """The shapes for this run: the GPU targets on CUDA (the first alone with --quick), smaller ones on the CPU."""
        if self.device == "cuda":
            return gpu[:1] if self.quick else gpu
        return quick if self.quick else cpu

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=self.device) * scale).to(self.dtype)


def default_setting(quick: bool = False) -> Setting:
    """This machine's: CUDA in bfloat16 where there is a GPU, else the CPU in float32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Setting(device, DEFAULT_DTYPE[device], quick)


@dataclass(frozen=True)
class Impl:
    fn: Callable  # called with the case's arguments
    kind: str = "peer"  # "backend" (a gpt2fast.ops backend) or "peer" (what gpt2fast is compared with)
    # Entered once around all the calls being timed (a backend selection, an SDPA kernel choice).
    context: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class Case:
    op: str  # the gpt2fast.ops function measured, called with make_args()'s arguments
    label: str  # the shape as tables and plots show it
    shape: dict
    make_args: Callable[[], tuple]  # fresh random inputs
    work: Callable[..., int]  # for the arguments: bytes that must move (inputs read, outputs written), or flops
    work_unit: str  # "bytes" or "flops"
    # Peer name -> Impl, or the reason it is not run in this setting.
    peers: dict[str, Impl | str] = field(default_factory=dict)


SUITES: dict[str, Callable[[Setting], list[Case]]] = {}


def suite(op: str):
    """Decorator: register `fn(setting) -> list[Case]` as the suite of `op`."""
    if op not in registry.OPS:
        raise ValueError(f"unknown op {op!r}; ops are {registry.OPS}")

    def wrap(fn):
        SUITES[op] = fn
        return fn

    return wrap


def backend_names() -> tuple[str, ...]:
    """Every registered backend, the reference included: what a case measures unless told otherwise."""
    return registry.choices()[1:]


def prepare(case: Case, backends=None) -> tuple[tuple, dict[str, Impl], dict[str, str]]:
    """Fresh (seeded) random inputs for the case, and its implementations on them (see `implementations`)."""
    torch.manual_seed(0)
    args = case.make_args()
    return (args, *implementations(case, args, backends))


def implementations(case: Case, args: tuple, backends=None) -> tuple[dict[str, Impl], dict[str, str]]:
    """(name -> Impl) to measure on these arguments, and (name -> reason) for those skipped.

    Each backend named (default: every registered one) is tried. One that is unavailable or refuses the input
    is skipped with dispatch's own reason (timing it would time the fallback under its name). Any
    implementation whose first call raises is skipped with the error; that first call also does any
    compiling before the timing starts.
    """
    impls, skipped = {}, {}
    for name in backend_names() if backends is None else backends:
        reason = registry._refusal(name, case.op, args, {})
        if reason:
            skipped[name] = reason
        else:
            impls[name] = Impl(getattr(ops, case.op), "backend", functools.partial(ops.use_backend, name))
    for name, peer in case.peers.items():
        if isinstance(peer, str):
            skipped[name] = peer
        else:
            impls[name] = peer
    for name, impl in list(impls.items()):
        error = _first_call(impl, args)
        if error:
            skipped[name] = error
            del impls[name]
    return impls, skipped


def _first_call(impl: Impl, args: tuple) -> str | None:
    try:
        with warnings.catch_warnings(), impl.context():
            warnings.simplefilter("ignore")  # SDPA explains each kernel it cannot use; the error says enough
            impl.fn(*args)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
