"""Text data helpers: load a corpus, split it, tokenise it once into uint16 files, and cut random training windows."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizer import CharTokenizer, Tokenizer

DATA_ENV_VAR = "GPT2FAST_DATA"
CACHE_ENV_VAR = "GPT2FAST_CACHE"


def default_data_dir() -> Path:
    """Folder holding the data files: $GPT2FAST_DATA, else ../shared/data next to the repo.

    The folder may not exist; callers decide whether that is an error or a reason to skip.
    """
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        return Path(override)
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "data"


def default_cache_dir() -> Path:
    """Folder for derived files (token files): $GPT2FAST_CACHE, else $XDG_CACHE_HOME/gpt2fast or ~/.cache/gpt2fast."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2fast"


def _text_file(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path, refused by name unless a file is there."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a text file")
    if not path.exists():
        raise FileNotFoundError(f"no text file at {path}")
    return path


def load_text(path: str | os.PathLike[str]) -> str:
    """Read a whole text file as UTF-8."""
    path = _text_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start}") from None


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
        x, y = to_device(x, device), to_device(y, device)
    return x, y


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t on `device`; to a GPU from pinned memory without waiting, so the copy overlaps the step running there."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class TokenizedText:
    """A text split 90/10 into training and validation tokens, each a uint16 tensor mapped from its file."""

    tokenizer: CharTokenizer | Tokenizer
    train: torch.Tensor
    val: torch.Tensor
    folder: Path  # holds train.bin, val.bin and meta.json


def tokenize_text(text_path: str | os.PathLike[str], tokenizer: str | CharTokenizer = "char",
                  cache_dir: str | os.PathLike[str] | None = None) -> TokenizedText:
    """The tokens of a text file, tokenised on first use into uint16 files that later calls map.

    `tokenizer` is "char" (the text's own characters), a CharTokenizer (its characters, which must cover
    the text's) or a GPT-2 vocabulary for Tokenizer.from_pretrained. The files live in a folder of
    `cache_dir` (default: default_cache_dir()/tokens) named by a key of the text file (path, size,
    modification time) and the vocabulary, so an edited text or another vocabulary gets fresh files and
    nothing stale is ever read.
    """
    text_path = _text_file(text_path)
    vocab = Tokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) and tokenizer != "char" else tokenizer
    folder = Path(cache_dir or default_cache_dir() / "tokens") / _cache_name(text_path, vocab)
    if not (folder / "meta.json").exists():
        _write_tokens(folder, text_path, vocab)
    meta = json.loads((folder / "meta.json").read_text())
    return TokenizedText(vocab if isinstance(vocab, Tokenizer) else CharTokenizer.from_dict(meta["char_vocab"]),
                         _map_tokens(folder / "train.bin"), _map_tokens(folder / "val.bin"), folder)


def _cache_name(text_path: Path, vocab: str | CharTokenizer | Tokenizer) -> str:
    stat = text_path.stat()
    key = hashlib.sha256(f"{text_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    if isinstance(vocab, CharTokenizer):
        key.update(f"|chars {''.join(vocab.chars)}".encode())
    if isinstance(vocab, Tokenizer):
        key.update(json.dumps(vocab.special_tokens, sort_keys=True).encode())
        for token, rank in sorted(vocab.ranks.items(), key=lambda item: item[1]):
            key.update(token + rank.to_bytes(4, "little"))
    return f"{text_path.stem}-{'gpt2' if isinstance(vocab, Tokenizer) else 'char'}-{key.hexdigest()[:16]}"


def _write_tokens(folder: Path, text_path: Path, vocab: str | CharTokenizer | Tokenizer) -> None:
    text = load_text(text_path)
    if len(text) < 2:
        raise ValueError(f"{text_path} holds {len(text)} characters: too short to split into training and "
                         f"validation text")
    tokenizer = CharTokenizer.from_text(text) if isinstance(vocab, str) else vocab
    if isinstance(tokenizer, CharTokenizer) and not set(text) <= set(tokenizer.chars):
        missing = "".join(sorted(set(text) - set(tokenizer.chars)))
        raise ValueError(f"{text_path} holds characters that the char vocabulary lacks: {missing!r}")
    if tokenizer.vocab_size > 2**16:
        raise ValueError(f"uint16 token files hold ids below 65536; this vocabulary has {tokenizer.vocab_size}")
    # Written aside, then renamed into place: an interrupted or concurrent run never sees half a folder.
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write token files in {folder.parent} ({e.strerror or e}); choose another "
                         f"cache_dir or ${CACHE_ENV_VAR}") from None
    for name, part in zip(("train", "val"), split_text(text)):
        np.array(tokenizer.encode(part), dtype=np.uint16).tofile(staging / f"{name}.bin")
    meta = {"text": str(text_path.resolve()), "vocab_size": tokenizer.vocab_size}
    if isinstance(tokenizer, CharTokenizer):
        meta["char_vocab"] = tokenizer.to_dict()
    (staging / "meta.json").write_text(json.dumps(meta) + "\n")
    try:
        staging.rename(folder)
    except OSError:  # another process got there first with the same files
        shutil.rmtree(staging)


def _map_tokens(path: Path) -> torch.Tensor:
    n = path.stat().st_size // 2
    if n == 0:
        raise ValueError(f"{path} holds no tokens: the text is too short to split")
    # shared=False maps the file copy-on-write: pages are read as batches touch them, and never written back.
    return torch.from_file(str(path), shared=False, size=n, dtype=torch.uint16)
