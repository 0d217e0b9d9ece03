"""The process group of a torchrun launch, and the few collectives the trainer needs.

Outside torchrun (no RANK in the environment) everything here is a no-op on one process, so the
trainer has one code path.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def resolve_device(device: str) -> str:
    """"auto": CUDA when there is a GPU, else the CPU; any other name is checked: a device torch knows, and,
    for CUDA, one this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name torch knows ({e})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch sees no CUDA device (torch.cuda.is_available() "
                             f"is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # destroy the group at the end only if this object made it

    @classmethod
    def start(cls, device: str) -> "Distributed":
        """One process, or under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) this rank of the group:
        NCCL with one GPU per rank (the LOCAL_RANK-th), gloo on the CPU."""
        device = torch.device(resolve_device(device))
        if "RANK" not in os.environ:
            return cls(0, 1, device)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world_size, device, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block before the others do: it writes what they then read (the token files)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of t over the ranks (gloo has no AVG, hence the sum)."""
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def agree(self, value: float) -> float:
        """Rank 0's value on every rank: decisions taken from a clock must be the same everywhere."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return t.item()

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
