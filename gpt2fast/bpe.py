"""GPT-2's byte-level BPE in pure Python, written to be read.

Encoding a text takes two steps:

1. Pre-tokenize: the GPT-2 regex splits the text into words such as ``"Hello"``,
   ``" world"``, ``"'s"``, ``" 123"`` or a run of whitespace. Merges never cross a
   word boundary, so each word can be encoded on its own.
2. Merge: a word starts as its UTF-8 bytes, one token per byte. Repeatedly join
   the adjacent pair whose concatenation has the lowest rank in the vocabulary,
   until no adjacent pair forms a known token. The rank of a token is its id.

Most words repeat (tiny Shakespeare has ~300k words but only ~15k distinct ones), so
the ids of each word are cached, which makes the merge loop's cost almost vanish.

This module is the fallback engine of :class:`gpt2fast.tokenizer.Tokenizer`; tiktoken
does the same work in Rust and gives identical ids.
"""
from __future__ import annotations

import functools
import heapq
import operator
from collections.abc import Iterable, Iterator, Set

import regex

# The original GPT-2 pre-tokenizer. `regex` (not `re`) is needed for the \p{..} classes.
# The contractions are case-sensitive on purpose: GPT-2 splits "'S" into "'" and "S".
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Distinct words kept in the cache; a bound keeps memory flat on endless streams.
_CACHE_LIMIT = 200_000

# Marks a byte offset where no part starts any more, in bpe_merge's linked list of parts.
_NO_PART = -1


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte value to a printable unicode character.

    The HF and OpenAI vocabulary files store tokens as text, so every byte needs a
    visible stand-in: printable Latin-1 bytes map to themselves, the other 68 bytes
    (control characters, space, ...) map to chr(256), chr(257), ... in byte order.
    That is why a leading space shows up as "Ġ" (chr(256 + 32)) in those files.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_merge(word: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-token: merge its lowest-rank adjacent pair until none is left.

    Ties go to the leftmost pair, as in tiktoken. Rescanning the word for the best pair after
    every merge costs O(n^2) (minutes for a 100k-letter word), so the candidate pairs wait in a
    heap keyed by (rank, start) and the parts form a linked list: O(n log n) in all. A merge
    retires the pairs on either side of it; they stay in the heap and are skipped when popped.
    """
    whole = ranks.get(word)
    if whole is not None:  # tiktoken takes a known word as one token without merging
        return [whole]
    n = len(word)
    # end[i]: where the part starting at byte i ends, or _NO_PART. end[n] is there so that
    # end[end[i]] needs no bounds check when part i is the last one.
    end = [*range(1, n + 1), _NO_PART]
    prev = list(range(-1, n - 1))  # prev[i]: where the part before part i starts
    heap = [(rank, i, i + 2) for i in range(n - 1) if (rank := ranks.get(word[i : i + 2])) is not None]
    heapq.heapify(heap)
    while heap:
        _, start, stop = heapq.heappop(heap)
        mid = end[start]
        if mid == _NO_PART or end[mid] != stop:
            continue  # one side of the pair was merged with something else since it was pushed
        end[start], end[mid] = stop, _NO_PART
        if stop < n:
            prev[stop] = start
            _push_pair(heap, word, ranks, start, end[stop])
        if start > 0:
            _push_pair(heap, word, ranks, prev[start], stop)
    return [ranks[word[i : end[i]]] for i in _part_starts(end)]


def _push_pair(heap: list[tuple[int, int, int]], word: bytes, ranks: dict[bytes, int], start: int, stop: int) -> None:
    rank = ranks.get(word[start:stop])
    if rank is not None:
        heapq.heappush(heap, (rank, start, stop))


def _part_starts(end: list[int]) -> Iterator[int]:
    i = 0
    while i < len(end) - 1:
        yield i
        i = end[i]


def replace_surrogates(text: str) -> str:
    """Replace lone surrogates, which cannot be UTF-8 encoded, by U+FFFD (as tiktoken does)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@functools.lru_cache(maxsize=32)
def _special_splitter(specials: frozenset[str]) -> regex.Pattern:
    # Longest first, so that a special token that contains another one wins.
    alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.compile(f"({alternatives})")


class BytePairEncoder:
    """Pure-Python byte-level BPE over mergeable ranks (token bytes -> id)."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str = GPT2_PATTERN) -> None:
        self.ranks = ranks
        self.special_tokens = special_tokens
        self.pattern = regex.compile(pattern)
        self.decoder: dict[int, bytes] = {i: b for b, i in ranks.items()}
        self.decoder.update((i, s.encode("utf-8")) for s, i in special_tokens.items())
        self._cache: dict[str, list[int]] = {}

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special tokens: "<|endoftext|>" is ordinary text here."""
        try:
            return self._encode_words(text)
        except UnicodeEncodeError:
            return self._encode_words(replace_surrogates(text))

    def encode(self, text: str, allowed_special: Set[str]) -> list[int]:
        """Encode text; occurrences of the allowed special tokens become their ids."""
        if not allowed_special:
            return self.encode_ordinary(text)
        ids: list[int] = []
        # With a capturing group, split() alternates ordinary text and special tokens.
        for i, piece in enumerate(_special_splitter(frozenset(allowed_special)).split(text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenate the bytes of the tokens; an unknown id raises KeyError, a non-integer TypeError."""
        # operator.index accepts numpy and torch integers (a torch scalar would miss the dict by hash).
        return b"".join(map(self.decoder.__getitem__, map(operator.index, ids)))

    def _encode_words(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for word in self.pattern.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = bpe_merge(word.encode("utf-8"), self.ranks)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids
