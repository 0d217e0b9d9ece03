"""Text data helpers: load a corpus, split it, and cut random training windows."""
from __future__ import annotations

import os
from pathlib import Path

import torch

DATA_ENV_VAR = "GPT2FAST_DATA"


def default_data_dir() -> Path:
    """Folder holding the data files: $GPT2FAST_DATA, else ../shared/data next to the repo.

    The folder may not exist; callers decide whether that is an error or a reason to skip.
    """
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        return Path(override)
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "data"


def load_text(path: str | os.PathLike[str]) -> str:
    """Read a whole text file as UTF-8."""
    return Path(path).read_text(encoding="utf-8")


def split_text(text: str, frac: float = 0.9) -> tuple[str, str]:
    """Split into (first `frac`, rest) by characters.

    A contiguous split, not a shuffled one, so validation text is truly unseen prose
    rather than fragments interleaved with training text.
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    n = int(frac * len(text))
    return text[:n], text[n:]


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `batch_size` random windows of `block_size` tokens.

    Returns (x, y), both long tensors of shape [batch_size, block_size], where y is x
    shifted left by one: y[b, t] is the token that follows x[b, t].
    `data` is a 1-D tensor of token ids (long, or uint16 to halve memory on disk-backed data).
    """
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(
            f"data has {len(data)} tokens, need at least block_size + 1 = {block_size + 1}"
        )
    # Last valid start is len - block_size - 1, so that y's final token exists.
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    # Index first, then widen: converting only the window avoids copying all of `data`.
    windows = data[starts[:, None] + offsets].long()
    # Contiguous so callers can .view() them, as training loops commonly do.
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y
