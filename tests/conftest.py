"""Fixtures and helpers shared by the op tests.

`backend` runs a test once per registered backend that can run on this machine (the reference
`torch` and `torch_cpu` always; `triton` on a GPU, else on the CPU under TRITON_INTERPRET=1, which this
file sets; `native` where gpt2fast._C is built), and `device` once per device (cpu always, cuda when
present). Op tests compare against fp64 math written out in the test files, never against the reference
backend, so the reference is tested too.

Tests marked `gpu` run full GPT-2 shapes and are skipped without CUDA.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
# Without a GPU the Triton kernels run on the CPU in triton's interpreter, chosen when they are
# decorated, so before gpt2fast (and through it the kernels) is imported.
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpt2fast import ops  # noqa: E402

AVAILABLE_BACKENDS = [name for name, b in ops.backends().items() if b.unavailable_reason() is None]
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])

# (rtol, atol) against an fp64 oracle, for inputs of O(1) and outputs of O(1).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
    torch.float64: (1e-10, 1e-10),
}
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: full GPT-2 shapes on a CUDA device; skipped without CUDA")
    # triton 3.6's interpreter reads a loop bound through int(array of one element), which numpy < 2.4
    # allows with this warning (and numpy 2.4 refuses: triton-lang/triton#9171).
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_log(monkeypatch):
    """The registry's log-once memory, emptied, so that a fallback logs here even if another test saw it."""
    from gpt2fast.ops import registry

    monkeypatch.setattr(registry, "_logged", set())


def fallback_records(caplog) -> list[str]:
    """The messages of the gpt2fast log lines saying an op fell back to the reference."""
    return [r.getMessage() for r in caplog.records if r.name == "gpt2fast" and "falls back" in r.getMessage()]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns floating-point tensors full of NaN and integer ones full of -1, so that an
    element a kernel fails to write shows (the launchers allocate every output and scratch buffer with it)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture(params=AVAILABLE_BACKENDS)
def backend(request) -> str:
    """The name of one available backend; run the op under `gpt2fast.use_backend(backend)`."""
    return request.param


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0, shift=0.0) -> torch.Tensor:
    """Seeded N(shift, scale^2) values, drawn on the CPU so that every device and dtype sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale + shift
    return x.to(device=device, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, **kw) -> None:
    """Compare an op's output with an fp64 oracle, within the tolerance of `dtype` (default: actual's).

    `scale` widens the tolerance for outputs or error sums larger than O(1).
    """
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    kw.setdefault("rtol", rtol * scale)
    kw.setdefault("atol", atol * scale)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "output holds inf or NaN"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **kw)
