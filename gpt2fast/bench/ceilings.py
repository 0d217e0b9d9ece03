"""The device's limits, measured in the same run as the ops they judge.

Copy bandwidth: one large `dst.copy_(src)`, counted as bytes read plus bytes written, the ceiling of
a memory-bound op. Read bandwidth: one large `t.sum()`, counted as the bytes read, the ceiling of a
decode step, which reads every weight once and writes next to nothing. Matmul peak: one large square
matmul per dtype, 2 n^3 flops, the ceiling of a compute-bound op. Measured rather than taken from a
datasheet, so the fractions compare against what PyTorch itself reaches on this machine, clocks and all.
"""
from __future__ import annotations

import torch

from .suite import Setting, dtype_name
from .timing import time_kernel

# Sizes large enough to leave every cache far behind and keep the device busy, small enough to be quick.
COPY_BYTES = {"cuda": 2**30, "cuda quick": 2**30, "cpu": 256 * 2**20, "cpu quick": 64 * 2**20}
READ_BYTES = {"cuda": 2**30, "cuda quick": 2**30, "cpu": 512 * 2**20, "cpu quick": 256 * 2**20}
MATMUL_N = {"cuda": 8192, "cuda quick": 8192, "cpu": 2048, "cpu quick": 1024}
BUDGET_S = {"cuda": 0.5, "cuda quick": 0.2, "cpu": 1.0, "cpu quick": 0.2}


def peak_dtypes(s: Setting) -> list[torch.dtype]:
    """bf16 on CUDA, fp32 and bf16 on the CPU, and the run's own dtype."""
    base = [torch.bfloat16] if s.device == "cuda" else [torch.float32, torch.bfloat16]
    return base + ([s.dtype] if s.dtype not in base else [])


def measure(s: Setting) -> dict:
    budget = BUDGET_S[s.size]
    return {**copy_bandwidth(s, budget), **read_bandwidth(s, budget), **matmul_peaks(s, budget)}


def copy_bandwidth(s: Setting, budget: float) -> dict:
    n_bytes = COPY_BYTES[s.size]
    src = torch.randn(n_bytes // 4, device=s.device)
    dst = torch.empty_like(src)
    copy = time_kernel(lambda: dst.copy_(src), s.device, budget)
    return {"copy_gbps": 2 * n_bytes / copy.median_s / 1e9, "copy_bytes": n_bytes}


def read_bandwidth(s: Setting, budget: float) -> dict:
    n_bytes = READ_BYTES[s.size]
    # Ones, not random numbers: a sum runs as fast over any values, and drawing 512 MiB of them takes seconds
    # on a small CPU.
    t = torch.ones(n_bytes // 4, device=s.device)
    read = time_kernel(t.sum, s.device, budget)
    return {"read_gbps": n_bytes / read.median_s / 1e9, "read_bytes": n_bytes}


def matmul_peaks(s: Setting, budget: float) -> dict:
    n, peaks = MATMUL_N[s.size], {}
    for dtype in peak_dtypes(s):
        a, b = (torch.randn(n, n, device=s.device, dtype=dtype) for _ in range(2))
        peaks[dtype_name(dtype)] = 2 * n**3 / time_kernel(lambda: a @ b, s.device, budget).median_s / 1e12
    return {"matmul_tflops": peaks, "matmul_n": n}
