"""Tokenizers: GPT-2 byte-level BPE (tiktoken or pure-Python engine) and a char-level one.

``Tokenizer.from_pretrained`` reads the GPT-2 vocabulary in any of its three common forms:

- a tiktoken ranks file (``*.tiktoken``: lines ``base64(token bytes) rank``),
- a Hugging Face folder (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``),
- an OpenAI folder (``encoder.json`` + ``vocab.bpe``),

and turns it into mergeable ranks (token bytes -> id), which both engines use.
"""
from __future__ import annotations

import base64
import json
import logging
import operator
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Literal

from gpt2fast.bpe import GPT2_PATTERN, BytePairEncoder, bytes_to_unicode

logger = logging.getLogger("gpt2fast")

ENDOFTEXT = "<|endoftext|>"
ACCEPTED_FORMATS = (
    "a tiktoken ranks file (*.tiktoken), a Hugging Face tokenizer (vocab.json + merges.txt, or tokenizer.json), "
    "an OpenAI GPT-2 encoder (encoder.json + vocab.bpe), or a folder that holds one of these"
)

Engine = Literal["auto", "tiktoken", "python"]
AllowedSpecial = Literal["all"] | Collection[str]
Vocabulary = tuple[dict[bytes, int], dict[str, int]]  # mergeable ranks, special tokens
# (vocab, merges) file pairs: Hugging Face names first, then OpenAI's original ones.
_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


class Tokenizer:
    """GPT-2 byte-level BPE with a tiktoken engine (fast, Rust) or a pure-Python one.

    Both engines give identical ids. ``engine`` tells which one is in use.
    """

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None, engine: Engine = "auto") -> None:
        self.ranks = ranks
        self.special_tokens = {ENDOFTEXT: len(ranks)} if special_tokens is None else dict(special_tokens)
        self.engine = _pick_engine(engine)
        if self.engine == "tiktoken":
            import tiktoken

            self._impl = tiktoken.Encoding(
                name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
            )
        else:
            self._impl = BytePairEncoder(ranks, self.special_tokens)
        self._vocab_size = max([*ranks.values(), *self.special_tokens.values()]) + 1

    @classmethod
    def from_pretrained(cls, path: str | Path, engine: Engine = "auto") -> Tokenizer:
        """Load the vocabulary at ``path`` (see the module docstring for the formats)."""
        ranks, special_tokens = load_vocabulary(path)
        return cls(ranks, special_tokens, engine=engine)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_token(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, engine={self.engine!r})"

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Encode ``text`` to token ids.

        By default "<|endoftext|>" in the text becomes the single token 50256, because
        GPT-2 was trained with it as the document separator and that is what users of
        GPT-2 expect (tiktoken instead raises by default). Pass ``allowed_special=()``
        to encode it as ordinary text, e.g. for untrusted input, or a set to allow only some.
        """
        allowed = self._allowed(allowed_special)
        if self.engine == "tiktoken":
            return self._impl.encode(text, allowed_special=allowed, disallowed_special=())
        return self._impl.encode(text, allowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` with every special token treated as ordinary text."""
        return self._impl.encode_ordinary(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the tokens ``ids``; an id outside the vocabulary raises ValueError."""
        ids = list(ids)
        try:
            return self._impl.decode_bytes(ids)
        except (KeyError, TypeError, OverflowError) as err:
            raise ValueError(f"invalid token id {self._first_invalid(ids)!r} (vocab_size={self.vocab_size})") from err

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        allowed = frozenset(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; known: {sorted(self.special_tokens)}")
        return allowed

    def _first_invalid(self, ids: list[Any]) -> Any:
        known = set(self.ranks.values()) | set(self.special_tokens.values())
        return next(i for i in ids if _as_int(i) not in known)


def _as_int(i: Any) -> int | None:
    """``i`` as an int if it is integer-like (int, numpy or torch integer), else None."""
    try:
        return operator.index(i)
    except TypeError:
        return None


def _pick_engine(engine: str) -> str:
    if engine not in ("auto", "tiktoken", "python"):
        raise ValueError(f"unknown engine {engine!r}; expected 'auto', 'tiktoken' or 'python'")
    if engine == "python":
        return engine
    try:
        import tiktoken  # noqa: F401
    except ImportError as err:
        if engine == "tiktoken":
            raise ImportError("engine='tiktoken' needs the tiktoken package: pip install tiktoken") from err
        logger.info("tiktoken is not installed; using the pure-Python BPE engine")
        return "python"
    return "tiktoken"


# --- reading the vocabulary ----------------------------------------------------------------


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Read the GPT-2 vocabulary at ``path`` as (mergeable ranks, special tokens)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}; expected {ACCEPTED_FORMATS}")
    if path.is_dir():
        return _load_dir(path)
    if path.suffix == ".tiktoken":
        return _read_tiktoken(path)
    if path.name == "tokenizer.json":
        return _read_tokenizer_json(path)
    for pair in _PAIRS:
        if path.name in pair:
            return _read_pair(path.parent, *pair)
    raise ValueError(f"unrecognised tokenizer file {path}; expected {ACCEPTED_FORMATS}")


def _load_dir(folder: Path) -> Vocabulary:
    tiktoken_files = sorted(folder.glob("*.tiktoken"))
    if len(tiktoken_files) > 1:
        raise ValueError(f"several *.tiktoken files in {folder}; pass the one to use: {[p.name for p in tiktoken_files]}")
    if tiktoken_files:
        return _read_tiktoken(tiktoken_files[0])
    if (folder / "tokenizer.json").is_file():
        return _read_tokenizer_json(folder / "tokenizer.json")
    for pair in _PAIRS:
        if any((folder / name).is_file() for name in pair):
            return _read_pair(folder, *pair)
    raise FileNotFoundError(f"no tokenizer files in {folder}; expected {ACCEPTED_FORMATS}")


def _read_pair(folder: Path, vocab_name: str, merges_name: str) -> Vocabulary:
    vocab_file, merges_file = folder / vocab_name, folder / merges_name
    for file in (vocab_file, merges_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: {vocab_name} and {merges_name} go together")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    return ranks_from_vocab_and_merges(vocab, _read_merges(merges_file), source=str(folder))


def _read_tiktoken(file: Path) -> Vocabulary:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(file.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:  # binascii.Error is a ValueError too
            raise ValueError(f"{file}:{lineno}: expected 'base64(token bytes) rank', got {line[:60]!r}") from err
    if not ranks:
        raise ValueError(f"{file} holds no ranks")
    # The special token is not stored in the file; GPT-2 puts it right after the ranks.
    return ranks, {ENDOFTEXT: len(ranks)}


def _read_tokenizer_json(file: Path) -> Vocabulary:
    model = json.loads(file.read_text(encoding="utf-8")).get("model", {})
    if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
        raise ValueError(f"{file} does not describe a BPE model with 'model.vocab' and 'model.merges'")
    # Newer tokenizers files store each merge as a [left, right] list, older ones as "left right".
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return ranks_from_vocab_and_merges(model["vocab"], merges, source=str(file))


def _read_merges(file: Path) -> list[tuple[str, ...]]:
    lines = file.read_text(encoding="utf-8").splitlines()
    # Both merges.txt and vocab.bpe start with a "#version: ..." header.
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def ranks_from_vocab_and_merges(vocab: dict[str, int], merges: list[tuple[str, ...]], source: str) -> Vocabulary:
    """Turn a byte-level vocab (unicode token -> id) and its ordered merges into mergeable ranks.

    The vocab spells bytes through GPT-2's :func:`bytes_to_unicode` map. The ranks are the
    vocab ids, so merge priority must follow id order; both engines rely on that.
    """
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(byte_of[char] for char in token)
        except KeyError as err:
            raise ValueError(f"{source}: token {token!r} is not byte-level BPE text") from err

    def id_of(token: str) -> int:
        if token not in vocab:
            raise ValueError(f"{source}: token {token!r} is missing from the vocab")
        return vocab[token]

    ranks = {bytes([byte]): id_of(char) for byte, char in bytes_to_unicode().items()}
    previous = -1
    for merge in merges:
        if len(merge) != 2:
            raise ValueError(f"{source}: a merge must have two parts, got {merge!r}")
        merged = merge[0] + merge[1]
        rank = id_of(merged)
        if rank <= previous:
            raise ValueError(f"{source}: merge {merge!r} has id {rank}, not above the previous merge's {previous}")
        ranks[to_bytes(merged)] = previous = rank
    return ranks, {ENDOFTEXT: vocab.get(ENDOFTEXT, len(ranks))}


# --- char-level ----------------------------------------------------------------------------


class CharTokenizer:
    """One token per character, over a fixed alphabet (e.g. tiny Shakespeare's 65 chars)."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = list(chars)
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise ValueError("chars must be distinct single characters")
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The alphabet of ``text``, sorted, so that the ids do not depend on text order."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        out = []
        for i in ids:
            index = _as_int(i)
            if index is None or not 0 <= index < len(chars):
                raise ValueError(f"invalid token id {i!r} (vocab_size={len(chars)})")
            out.append(chars[index])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, e.g. to store inside a checkpoint."""
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        if data.get("type") != "char" or not isinstance(data.get("chars"), str):
            raise ValueError(f"not a CharTokenizer description: {data!r:.80}")
        return cls(data["chars"])
