"""Tokenizers: GPT-2 byte-level BPE (tiktoken or pure-Python engine) and a char-level one.

``Tokenizer.from_pretrained`` reads the GPT-2 vocabulary in any of its three common forms:

- a tiktoken ranks file (``*.tiktoken``: lines ``base64(token bytes) rank``),
- a Hugging Face folder (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``),
- an OpenAI folder (``encoder.json`` + ``vocab.bpe``),

and turns it into mergeable ranks (token bytes -> id), which both engines use.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import operator
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable
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
# The byte that each character of a byte-level vocab token stands for.
_BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}


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
    vocab = _read_json(vocab_file)
    _check_vocab(vocab, vocab_file)
    return ranks_from_vocab_and_merges(vocab, _read_merges(merges_file), source=str(merges_file))


def _read_tiktoken(file: Path) -> Vocabulary:
    ranks: dict[bytes, int] = {}
    line_of: dict[bytes, int] = {}
    for lineno, line in enumerate(file.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        token, rank = _parse_rank_line(line, f"{file}:{lineno}")
        if token in ranks:
            raise ValueError(f"{file}:{lineno}: token {token!r} is already on line {line_of[token]}")
        ranks[token], line_of[token] = rank, lineno
    if not ranks:
        raise ValueError(f"{file} holds no ranks")
    _check_ids(ranks, str(file), "rank", show=lambda token: f"{token!r} (line {line_of[token]})")
    missing = [bytes([byte]) for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise ValueError(f"{file}: no token for the byte {missing[0]!r} ({len(missing)} of the 256 bytes lack one)")
    # The special token is not stored in the file; GPT-2 puts it right after the ranks.
    return ranks, {ENDOFTEXT: len(ranks)}


def _parse_rank_line(line: bytes, where: str) -> tuple[bytes, int]:
    fields = line.split()
    # A minus sign parses, so that a negative rank is refused as a rank rather than as garbage.
    if len(fields) != 2 or not re.fullmatch(rb"-?[0-9]+", fields[1]):
        raise ValueError(f"{where}: expected 'base64(token bytes) rank', got {line[:60]!r}")
    try:
        token = base64.b64decode(fields[0], validate=True)
    except binascii.Error as err:
        raise ValueError(f"{where}: {fields[0][:60]!r} is not base64 ({err})") from err
    return token, int(fields[1])


def _read_tokenizer_json(file: Path) -> Vocabulary:
    data = _read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("merges"), list):
        raise ValueError(f"{file} does not describe a BPE model with 'model.vocab' and 'model.merges'")
    _check_vocab(model.get("vocab"), file)
    merges = [_merge_parts(merge, f"{file}: model.merges[{i}]") for i, merge in enumerate(model["merges"])]
    return ranks_from_vocab_and_merges(model["vocab"], merges, source=str(file))


def _read_merges(file: Path) -> list[tuple[str, str]]:
    lines = _read_text(file).splitlines()
    # Both merges.txt and vocab.bpe start with a "#version: ..." header.
    merges = [(n, line) for n, line in enumerate(lines, 1) if line and not line.startswith("#version")]
    return [_merge_parts(line, f"{file}:{n}") for n, line in merges]


def _merge_parts(merge: Any, where: str) -> tuple[str, str]:
    # Newer tokenizer.json files store each merge as a [left, right] list; merges files and older ones as "left right".
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(part, str) and part for part in parts):
        raise ValueError(f"{where}: expected a merge 'left right', got {merge!r:.60}")
    return parts[0], parts[1]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text: {err}") from err


def _read_json(file: Path) -> Any:
    text = _read_text(file)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError as err:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"{file}: {err}") from err


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of repeated keys silently, which would drop a token from a vocab.
    obj = dict(pairs)
    if len(obj) < len(pairs):
        repeated = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise ValueError(f"duplicate key {_show_token(repeated)}")
    return obj


def _check_vocab(vocab: Any, file: Path) -> None:
    """Refuse a vocab that is not token -> id with ids 0..n-1, or that lacks a byte's token."""
    if not isinstance(vocab, dict):
        raise ValueError(f"{file}: expected a JSON object of token -> id, got {type(vocab).__name__}")
    _check_ids(vocab, str(file), "id", show=_show_token)
    for byte, char in bytes_to_unicode().items():
        if char not in vocab:
            raise ValueError(f"{file}: no token for the byte {bytes([byte])!r} (spelled {char!r})")


def _check_ids(ids: dict[Any, Any], source: str, noun: str, show: Callable[[Any], str]) -> None:
    """Refuse ids other than 0..len(ids)-1, each once: a clash or a hole makes the vocabulary size a lie."""
    for token, i in ids.items():
        if type(i) is not int:  # bool is an int subclass, but no id
            raise ValueError(f"{source}: token {show(token)} has {noun} {i!r}, not an integer")
    owner: dict[int, Any] = {}
    n = len(ids)
    for token, i in ids.items():
        if not 0 <= i < n:
            hole = min(set(range(n)) - set(ids.values()))
            raise ValueError(
                f"{source}: token {show(token)} has {noun} {i}, but {n} tokens need {noun}s 0..{n - 1}"
                f" ({noun} {hole} is missing)"
            )
        if i in owner:
            raise ValueError(f"{source}: tokens {show(owner[i])} and {show(token)} both have {noun} {i}")
        owner[i] = token


def ranks_from_vocab_and_merges(vocab: dict[str, int], merges: list[tuple[str, ...]], source: str) -> Vocabulary:
    """Turn a byte-level vocab (unicode token -> id) and its ordered merges into mergeable ranks.

    The vocab spells bytes through GPT-2's :func:`bytes_to_unicode` map. The ranks are the
    vocab ids, so merge priority must follow id order; both engines rely on that. The readers
    check the vocab on its own first (ids 0..n-1, every byte); here each merge must join two
    vocab tokens into a new one, and every vocab token but "<|endoftext|>" must come out as a rank.
    """
    ranks = {bytes([byte]): vocab[char] for byte, char in bytes_to_unicode().items()}
    previous = -1
    for number, (left, right) in enumerate(merges, 1):
        where = f"{source}: merge {number} ({left} {right})"
        token = _merged_token(vocab, left, right, where)
        if token in ranks:
            raise ValueError(f"{where} makes {_show_token(left + right)} a second time")
        rank = vocab[left + right]
        if rank <= previous:
            raise ValueError(f"{where} has id {rank}, not above the previous merge's {previous}")
        ranks[token] = previous = rank
    made = set(ranks.values())
    stray = next((token for token, i in vocab.items() if i not in made and token != ENDOFTEXT), None)
    if stray is not None:
        raise ValueError(
            f"{source}: vocab token {_show_token(stray)} (id {vocab[stray]}) is neither a byte nor made by a merge"
        )
    return ranks, {ENDOFTEXT: vocab.get(ENDOFTEXT, len(ranks))}


def _merged_token(vocab: dict[str, int], left: str, right: str, where: str) -> bytes:
    """The bytes that a merge makes, after checking that it joins vocab tokens into a vocab token."""
    for part in (left, right):
        if part not in vocab:
            raise ValueError(f"{where} names {_show_token(part)}, which is not in the vocab")
    if left + right not in vocab:
        raise ValueError(f"{where} makes {_show_token(left + right)}, which is not in the vocab")
    token = _byte_level_bytes(left + right)
    if token is None:
        raise ValueError(f"{where}: {left + right!r} is not byte-level BPE text")
    return token


def _byte_level_bytes(token: str) -> bytes | None:
    """The bytes that a vocab token spells through bytes_to_unicode, or None if it is not such a spelling."""
    try:
        return bytes(_BYTE_OF[char] for char in token)
    except KeyError:
        return None


def _show_token(token: str) -> str:
    """A vocab token as spelled in its file, with its bytes where the spelling hides them: 'Ġthe' (b' the')."""
    data = _byte_level_bytes(token)
    if data is None or data == token.encode("utf-8"):
        return repr(token)
    return f"{token!r} ({data!r})"


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
