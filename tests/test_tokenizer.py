"""Tokenizer tests: both engines against tiktoken's own GPT-2 encoding, on real data.

The reference is tiktoken built from ``gpt2.tiktoken`` with tiktoken's ``r50k_pat_str``,
a different (faster) pre-tokenizer regex than the one gpt2fast uses, so agreement checks
the pattern too, not only the merges.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regex
from gpt2fast.bpe import GPT2_PATTERN, bpe_merge, bytes_to_unicode
from gpt2fast.tokenizer import CharTokenizer, Tokenizer, load_vocabulary

tiktoken = pytest.importorskip("tiktoken")
from tiktoken.load import load_tiktoken_bpe  # noqa: E402
from tiktoken_ext.openai_public import r50k_pat_str  # noqa: E402

DATA = Path(os.environ.get("GPT2FAST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
if not (DATA / "gpt2.tiktoken").is_file():
    pytest.skip(f"GPT-2 vocabulary not found in {DATA} (set GPT2FAST_DATA)", allow_module_level=True)

GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENGINES = ["tiktoken", "python"]

# From the data README: each was checked with tiktoken, HF tokenizers and a pure-Python BPE.
REFERENCE_IDS = {
    "Hello world": [15496, 995],
    " Hello world": [18435, 995],
    "<|endoftext|>": [50256],
    "The quick brown fox jumps over the lazy dog.": [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    "naïve café 😀 日本": [2616, 38776, 40304, 30325, 222, 10545, 245, 98, 17312, 105],
    "x = 12345  +   6.78\n\n\tdef f():": [87, 796, 17031, 2231, 220, 1343, 220, 220, 718, 13, 3695, 628, 197, 4299, 277, 33529],
    "First Citizen:\nBefore we proceed any further, hear me speak.": [
        5962, 22307, 25, 198, 8421, 356, 5120, 597, 2252, 11, 3285, 502, 2740, 13
    ],
}

ADVERSARIAL = [
    "",
    " ",
    "naïve café 😀 日本語のテキスト 中文 한국어",
    "👨‍👩‍👧‍👦 🏳️‍🌈 flags 🇫🇷🇯🇵 and skin 👍🏽",
    "e\u0301 a\u0308\u0323 Z\u0351\u0334\u0322a\u0352\u0315l\u0356g\u0350o combining marks",
    "   leading, trailing   ",
    "tabs\t\there\t \t and\n\n\nnewlines \n \r\n\r\n  \n",
    "\u00a0nbsp\u2003em-space\u3000ideographic\u200bzero-width",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tif x != 0: print(x ** 2)\n",
    "31415926535897932384626433832795028841971693993751058209749445923078164062862089986",
    "١٢٣ ٤٥٦ Ⅻ ½ ²³ digits in other scripts",
    "I'm you're he's we've they'll she'd it't don't",
    "I'M YOU'RE HE'S WE'VE THEY'LL SHE'D 'S 'LL 'Re ''s '''",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|><|endoftext|> x<|endoftext",
    "<|endoftext|> only at start and at the end <|endoftext|>",
    "mixed\x00control\x01\x7fbytes\x1b[0m",
    "émoji😀at😀word😀boundaries😀",
    "!!!???... ---=== ``` '' \"\"",
    # Repeated bytes tie on rank: the leftmost pair must merge first.
    "!!!!!!!!!! \"\"\"\"\" ####### $$$ ========== ---------- ........ aaaaaaaaaaa 0000000000",
]


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(str(DATA / "gpt2.tiktoken"), expected_hash=GPT2_TIKTOKEN_SHA256)
    return tiktoken.Encoding(
        name="r50k_reference", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {engine: Tokenizer.from_pretrained(DATA, engine=engine) for engine in ENGINES}


@pytest.fixture(params=ENGINES)
def tok(request: pytest.FixtureRequest, tokenizers: dict[str, Tokenizer]) -> Tokenizer:
    return tokenizers[request.param]


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")


# --- loading -------------------------------------------------------------------------------


def _write_tokenizer_json(folder: Path, merges_as_lists: bool) -> Path:
    vocab = json.loads((DATA / "gpt2_hf" / "vocab.json").read_text(encoding="utf-8"))
    lines = (DATA / "gpt2_hf" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [line.split(" ") if merges_as_lists else line for line in lines if line]
    path = folder / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": merges}}))
    return path


@pytest.mark.parametrize(
    "source",
    ["gpt2.tiktoken", "gpt2_hf", "gpt2_hf/vocab.json", "gpt2_hf/merges.txt", "encoder.json", "vocab.bpe", "."],
)
def test_every_format_gives_the_reference_ranks(source: str, reference: tiktoken.Encoding) -> None:
    ranks, special_tokens = load_vocabulary(DATA / source)
    assert ranks == reference._mergeable_ranks
    assert special_tokens == {"<|endoftext|>": 50256}


@pytest.mark.parametrize("merges_as_lists", [False, True], ids=["merge-strings", "merge-lists"])
def test_tokenizer_json(tmp_path: Path, merges_as_lists: bool, reference: tiktoken.Encoding) -> None:
    _write_tokenizer_json(tmp_path, merges_as_lists)
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        ranks, special_tokens = load_vocabulary(source)
        assert ranks == reference._mergeable_ranks
        assert special_tokens == {"<|endoftext|>": 50256}


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ" and mapping[ord("A")] == "A"


def test_sizes_and_engine(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == 50257
    assert tok.eot_token == 50256
    assert tok.engine in ENGINES


def test_auto_engine_prefers_tiktoken() -> None:
    assert Tokenizer.from_pretrained(DATA / "gpt2.tiktoken").engine == "tiktoken"


def test_auto_engine_falls_back_to_python(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` raise ImportError
    with caplog.at_level(logging.INFO, logger="gpt2fast"):
        tok = Tokenizer.from_pretrained(DATA / "gpt2.tiktoken")
    assert tok.engine == "python"
    assert tok.encode("Hello world") == [15496, 995]
    assert [r.levelno for r in caplog.records if r.name == "gpt2fast"] == [logging.INFO]
    with pytest.raises(ImportError, match="tiktoken"):
        Tokenizer.from_pretrained(DATA / "gpt2.tiktoken", engine="tiktoken")


# --- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", REFERENCE_IDS)
def test_reference_ids(tok: Tokenizer, text: str) -> None:
    assert tok.encode(text) == REFERENCE_IDS[text]


def test_single_tokens(tok: Tokenizer) -> None:
    expected = {0: b"!", 198: b"\n", 220: b" ", 256: b" t", 50255: b" gazed", 50256: b"<|endoftext|>"}
    for token, data in expected.items():
        assert tok.decode_bytes([token]) == data


def test_tinyshakespeare(tok: Tokenizer, reference: tiktoken.Encoding, shakespeare: str) -> None:
    ids = tok.encode_ordinary(shakespeare)
    assert len(ids) == 338_025
    assert ids == reference.encode_ordinary(shakespeare)
    assert tok.decode(ids) == shakespeare
    # nanoGPT's 90/10 character split (data/shakespeare/readme.md).
    n = int(0.9 * len(shakespeare))
    assert (len(tok.encode_ordinary(shakespeare[:n])), len(tok.encode_ordinary(shakespeare[n:]))) == (301_966, 36_059)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_text_matches_reference(tok: Tokenizer, reference: tiktoken.Encoding, text: str) -> None:
    assert tok.encode(text) == reference.encode(text, allowed_special="all")
    assert tok.encode_ordinary(text) == reference.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_adversarial_text_matches_transformers(tokenizers: dict[str, Tokenizer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(DATA / "gpt2_hf"))
    for text in ADVERSARIAL:
        expected = hf.encode(text)
        for tok in tokenizers.values():
            assert tok.encode(text) == expected, text


def test_special_token_handling(tok: Tokenizer, reference: tiktoken.Encoding) -> None:
    text = "a<|endoftext|>b"
    assert tok.encode(text) == [64, 50256, 65]
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    ordinary = reference.encode_ordinary(text)
    assert 50256 not in ordinary
    assert tok.encode(text, allowed_special=()) == tok.encode(text, allowed_special=set()) == ordinary
    assert tok.encode_ordinary(text) == ordinary
    with pytest.raises(ValueError, match="<|im_start|>"):
        tok.encode(text, allowed_special={"<|im_start|>"})


def test_lone_surrogates_are_replaced_like_tiktoken(tok: Tokenizer, reference: tiktoken.Encoding) -> None:
    text = "a\ud800b \udfff"
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == "a\ufffdb \ufffd"


def test_decode_partial_utf8_uses_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1
    assert tok.decode_bytes(ids[:1]) == "😀".encode()[: len(tok.decode_bytes(ids[:1]))]
    assert "\ufffd" in tok.decode(ids[:1])


# --- properties ----------------------------------------------------------------------------

# Characters where the GPT-2 regex has its corner cases: spaces, contractions, digits, marks.
_TRICKY = st.text(alphabet=st.sampled_from(list(" \t\n\r'sSlLtdD0123456789aZé\u0301日😀<|>endoftext.-_\u00a0")), max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80) | _TRICKY)
def test_engines_agree_and_round_trip(tokenizers: dict[str, Tokenizer], text: str) -> None:
    ids = tokenizers["tiktoken"].encode(text)
    assert tokenizers["python"].encode(text) == ids
    assert tokenizers["python"].encode_ordinary(text) == tokenizers["tiktoken"].encode_ordinary(text)
    assert tokenizers["python"].decode(ids) == tokenizers["tiktoken"].decode(ids) == text


# --- long words and random text against tiktoken -------------------------------------------


# Letters of many scripts: random 1- to 3-byte UTF-8 that the regex keeps as one word.
_BLOCKS = [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x391, 0x3C9), (0x410, 0x44F), (0x5D0, 0x5EA), (0x627, 0x64A),
           (0x4E00, 0x9FFF), (0xAC00, 0xD7A3)]
_LETTERS = [c for lo, hi in _BLOCKS for c in map(chr, range(lo, hi + 1)) if c.isalpha()]


def _random_word(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(_LETTERS, k=length))


# One pre-token each, so the whole input reaches the merge loop at once; a merge loop that
# rescans the word after every merge needs minutes here (tiktoken: milliseconds).
LONG_WORDS = {
    "a-100k": "a" * 100_000,
    "cjk-10k": "".join(chr(c) for c in random.Random(1).choices(range(0x4E00, 0xA000), k=10_000)),
    "random-letters-20k": _random_word(random.Random(2), 20_000),
    "spaces-50k": " " * 50_000,
    "digits-50k": "".join(random.Random(3).choices("0123456789", k=50_000)),
}


@pytest.mark.parametrize("name", LONG_WORDS)
def test_long_word_matches_tiktoken(tokenizers: dict[str, Tokenizer], reference: tiktoken.Encoding, name: str) -> None:
    text = LONG_WORDS[name]
    assert regex.findall(GPT2_PATTERN, text) == [text]
    assert tokenizers["python"].encode_ordinary(text) == reference.encode_ordinary(text)


def test_bpe_merge_matches_tiktoken_on_random_bytes(reference: tiktoken.Encoding) -> None:
    rng = random.Random(4)
    # Words the regex would never form (invalid UTF-8 too) still merge as tiktoken merges them;
    # few distinct bytes make many equal-rank pairs, where the leftmost must merge first.
    words = [rng.randbytes(20_000), *(rng.randbytes(rng.randint(1, 50)) for _ in range(300))]
    words += [bytes(rng.choices(b"ab \n!\xe6", k=rng.randint(1, 400))) for _ in range(300)]
    for word in words:
        assert bpe_merge(word, reference._mergeable_ranks) == reference._encode_single_piece(word), word[:40]


_WHITESPACE = " \t\n\r\x0b\x0c\u00a0\u2003\u3000"
_EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🇫🇷🇯🇵", "🏳️\u200d🌈", "❤️", "🤖"]
_CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'", "''", "n't"]
_NUMBERS = ["0", "42", "3.14159", "1,000,000", "١٢٣", "½", "Ⅻ", "²³", "007"]
_PUNCTUATION = "!?.,;:-_()[]{}<>\"'`#$%^&*+=/\\|~@"


# Each draws one piece of a random text; a text strings 1 to 25 of them together.
_PIECES = [
    lambda rng: _random_word(rng, rng.randint(1, 12)),
    lambda rng: "".join(rng.choices(_WHITESPACE, k=rng.randint(1, 6))),
    lambda rng: rng.choice(_EMOJI),
    lambda rng: rng.choice(_NUMBERS),
    lambda rng: str(rng.randrange(10 ** rng.randint(1, 15))),
    lambda rng: rng.choice(_CONTRACTIONS),
    lambda rng: "".join(rng.choices(_PUNCTUATION, k=rng.randint(1, 4))),
    lambda rng: rng.choice(["<|endoftext|>", "<|endoftext", "e\u0301", "a\u0308\u0323", "\x00\x1b[0m"]),
    lambda rng: rng.choice(["a", "ab", " ", "\n", "!", "日"]) * rng.randint(20, 300),  # runs that merge many times
]


def _random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_PIECES)(rng) for _ in range(rng.randint(1, 25))) for _ in range(count)]


_FORMAT_PATHS = {"gpt2.tiktoken": "gpt2.tiktoken", "vocab.json+merges.txt": "gpt2_hf", "encoder.json+vocab.bpe": "encoder.json"}


@pytest.fixture(scope="module", params=[*_FORMAT_PATHS, "tokenizer.json"])
def vocabulary_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "tokenizer.json":
        return _write_tokenizer_json(tmp_path_factory.mktemp("tokenizer_json"), merges_as_lists=True)
    return DATA / _FORMAT_PATHS[request.param]


def test_random_text_matches_tiktoken_for_every_format(vocabulary_path: Path, reference: tiktoken.Encoding) -> None:
    ranks, special_tokens = load_vocabulary(vocabulary_path)
    engines = {engine: Tokenizer(ranks, special_tokens, engine=engine) for engine in ENGINES}
    for text in _random_texts(seed=5, count=400):
        expected, ordinary = reference.encode(text, allowed_special="all"), reference.encode_ordinary(text)
        for engine, tok in engines.items():
            assert tok.encode(text) == expected, (engine, text)
            assert tok.encode_ordinary(text) == ordinary, (engine, text)


# --- errors --------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.*tiktoken.*vocab\.json.*encoder\.json"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("present", "missing"),
    [("vocab.json", "merges.txt"), ("merges.txt", "vocab.json"), ("encoder.json", "vocab.bpe"), ("vocab.bpe", "encoder.json")],
)
def test_half_a_pair_names_the_missing_file(tmp_path: Path, present: str, missing: str) -> None:
    (tmp_path / present).write_text("{}")
    for source in (tmp_path, tmp_path / present):
        with pytest.raises(FileNotFoundError, match=f"{missing} is missing"):
            Tokenizer.from_pretrained(source)


# Tiny vocabularies, valid in every format, so that each bad file below differs from a good one
# by the one defect its test names: 256 byte tokens (rank = byte), "ab" and " t", then <|endoftext|>.
TINY_RANKS = {**{bytes([byte]): byte for byte in range(256)}, b"ab": 256, b" t": 257}
TINY_VOCAB = {**{char: byte for byte, char in bytes_to_unicode().items()}, "ab": 256, "Ġt": 257, "<|endoftext|>": 258}
TINY_MERGES = ["a b", "Ġ t"]
_DROP = object()  # in a vocab change: remove the token


def _tiktoken_text(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())


def _vocab_text(changes: dict[str, Any] | None = None) -> str:
    vocab = {**TINY_VOCAB, **(changes or {})}
    return json.dumps({token: i for token, i in vocab.items() if i is not _DROP}, ensure_ascii=False)


def _merges_text(extra: list[str] | None = None) -> str:
    return "\n".join(["#version: 0.2", *TINY_MERGES, *(extra or [])]) + "\n"


def _tokenizer_json(vocab: Any = TINY_VOCAB, merges: Any = TINY_MERGES) -> str:
    return json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges}}, ensure_ascii=False)


_TINY_TIKTOKEN = _tiktoken_text(TINY_RANKS)
_MERGES = _merges_text()


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("layout", ["tiktoken", "vocab.json", "encoder.json", "tokenizer.json"])
def test_tiny_vocabularies_load_in_every_format(tmp_path: Path, layout: str) -> None:
    if layout == "tiktoken":
        path = _write(tmp_path / "tiny.tiktoken", _TINY_TIKTOKEN)
    elif layout == "tokenizer.json":
        path = _write(tmp_path / "tokenizer.json", _tokenizer_json())
    else:
        merges_name = {"vocab.json": "merges.txt", "encoder.json": "vocab.bpe"}[layout]
        _write(tmp_path / merges_name, _MERGES)
        path = _write(tmp_path / layout, _vocab_text())
    assert load_vocabulary(path) == (TINY_RANKS, {"<|endoftext|>": 258})
    oracle = tiktoken.Encoding(name="tiny", pat_str=r50k_pat_str, mergeable_ranks=TINY_RANKS, special_tokens={})
    text = "ab t abab tt<|endoftext|>"
    assert Tokenizer.from_pretrained(path, engine="python").encode_ordinary(text) == oracle.encode_ordinary(text)


_XY = base64.b64encode(b"xy").decode()
# defect -> (file content, error). The tiny file has 258 lines: bytes 0..255, then "ab" and " t".
_BAD_TIKTOKEN_FILES = {
    "duplicate-token": (_TINY_TIKTOKEN + "YWI= 258\n", r"tiny\.tiktoken:259: token b'ab' is already on line 257"),
    "duplicate-rank": (_TINY_TIKTOKEN + f"{_XY} 257\n", r"tokens b' t' \(line 258\) and b'xy' \(line 259\) both have rank 257"),
    "rank-beyond-vocab": (
        _TINY_TIKTOKEN + f"{_XY} 300\n",
        r"tiny\.tiktoken: token b'xy' \(line 259\) has rank 300, but 259 tokens need ranks 0\.\.258 \(rank 258 is missing\)",
    ),
    "rank-gap": (
        _tiktoken_text({**TINY_RANKS, b" t": 258}),
        r"tiny\.tiktoken: token b' t' \(line 258\) has rank 258, .*\(rank 257 is missing\)",
    ),
    "negative-rank": (_TINY_TIKTOKEN + f"{_XY} -1\n", r"tiny\.tiktoken: token b'xy' \(line 259\) has rank -1"),
    "missing-byte": (
        _tiktoken_text({token: rank - 1 for token, rank in TINY_RANKS.items() if token != b"\x00"}),
        r"tiny\.tiktoken: no token for the byte b'\\x00' \(1 of the 256 bytes lack one\)",
    ),
    "empty-file": ("", r"tiny\.tiktoken holds no ranks"),
    "blank-lines-only": ("\n  \n\t\n", r"tiny\.tiktoken holds no ranks"),
    "garbage-line": (_TINY_TIKTOKEN + "hello\n", r"tiny\.tiktoken:259: expected 'base64\(token bytes\) rank', got b'hello'"),
    "three-fields": (_TINY_TIKTOKEN + f"{_XY} 258 1\n", r"tiny\.tiktoken:259: expected 'base64"),
    "rank-not-integer": (_TINY_TIKTOKEN + f"{_XY} 2_58\n", r"tiny\.tiktoken:259: expected 'base64"),
    "bad-base64": (_TINY_TIKTOKEN + "eHk 258\n", r"tiny\.tiktoken:259: b'eHk' is not base64"),
    "binary-garbage": (random.Random(0).randbytes(2000), r"tiny\.tiktoken:1: expected 'base64"),
}


@pytest.mark.parametrize("defect", _BAD_TIKTOKEN_FILES)
def test_bad_tiktoken_file_is_refused(tmp_path: Path, defect: str) -> None:
    content, match = _BAD_TIKTOKEN_FILES[defect]
    path = _write(tmp_path / "tiny.tiktoken", content)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(path)


# defect -> (vocab file content, merges file content, error), where {vocab} and {merges} stand for
# the two file names. The tiny merges file has 3 lines: its header, "a b" and "Ġ t".
_BAD_VOCAB_AND_MERGES = {
    "duplicate-token": (_vocab_text()[:-1] + ', "Ġt": 259}', _MERGES, r"{vocab}: duplicate key 'Ġt' \(b' t'\)"),
    "duplicate-id": (_vocab_text({"xy": 256}), _MERGES, r"{vocab}: tokens 'ab' and 'xy' both have id 256"),
    "id-beyond-vocab": (
        _vocab_text({"<|endoftext|>": 300}),
        _MERGES,
        r"{vocab}: token '<\|endoftext\|>' has id 300, but 259 tokens need ids 0\.\.258 \(id 258 is missing\)",
    ),
    "id-gap": (_vocab_text({"Ġt": 258, "<|endoftext|>": 259}), _MERGES, r"{vocab}: token .* \(id 257 is missing\)"),
    "negative-id": (_vocab_text({"ab": -1}), _MERGES, r"{vocab}: token 'ab' has id -1"),
    "id-not-integer": (_vocab_text({"ab": "256"}), _MERGES, r"{vocab}: token 'ab' has id '256', not an integer"),
    "id-boolean": (_vocab_text({"ab": True}), _MERGES, r"{vocab}: token 'ab' has id True, not an integer"),
    "vocab-not-object": ("[1, 2]", _MERGES, r"{vocab}: expected a JSON object of token -> id, got list"),
    "vocab-empty-file": ("", _MERGES, r"{vocab}: Expecting value"),
    "vocab-not-json": ("{'a': 0}", _MERGES, r"{vocab}: Expecting property name"),
    "vocab-not-utf8": (b'{"\xff": 0}', _MERGES, r"{vocab} is not UTF-8 text"),
    "missing-byte": (
        _vocab_text({"Ā": _DROP, "<|endoftext|>": 0}),
        _MERGES,
        r"{vocab}: no token for the byte b'\\x00' \(spelled 'Ā'\)",
    ),
    "merge-names-unknown-token": (
        _vocab_text(),
        _merges_text(["xy z"]),
        r"{merges}: merge 3 \(xy z\) names 'xy', which is not in the vocab",
    ),
    "merge-makes-unknown-token": (
        _vocab_text(),
        _merges_text(["b a"]),
        r"{merges}: merge 3 \(b a\) makes 'ba', which is not in the vocab",
    ),
    "merge-repeated": (_vocab_text(), _merges_text(["a b"]), r"{merges}: merge 3 \(a b\) makes 'ab' a second time"),
    "merge-not-byte-level": (
        _vocab_text({"€": 259, "€a": 260}),
        _merges_text(["€ a"]),
        r"{merges}: merge 3 \(€ a\): '€a' is not byte-level BPE text",
    ),
    "merge-three-parts": (_vocab_text(), _merges_text(["a b c"]), r"{merges}:4: expected a merge 'left right', got 'a b c'"),
    "merge-one-part": (_vocab_text(), _merges_text(["ab"]), r"{merges}:4: expected a merge 'left right'"),
    "merges-not-utf8": (_vocab_text(), b"#version: 0.2\na b\n\xff \xfe\n", r"{merges} is not UTF-8 text"),
    "token-never-made": (
        _vocab_text({"zz": 259}),
        _MERGES,
        r"{merges}: vocab token 'zz' \(id 259\) is neither a byte nor made by a merge",
    ),
    "merges-empty-file": (_vocab_text(), "", r"{merges}: vocab token 'ab' \(id 256\) is neither a byte nor made by a merge"),
}


@pytest.mark.parametrize("pair", [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")], ids=["hf", "openai"])
@pytest.mark.parametrize("defect", _BAD_VOCAB_AND_MERGES)
def test_bad_vocab_and_merges_are_refused(tmp_path: Path, pair: tuple[str, str], defect: str) -> None:
    vocab_content, merges_content, match = _BAD_VOCAB_AND_MERGES[defect]
    vocab_file = _write(tmp_path / pair[0], vocab_content)
    merges_file = _write(tmp_path / pair[1], merges_content)
    match = match.format(vocab=regex.escape(str(vocab_file)), merges=regex.escape(str(merges_file)))
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(tmp_path)


# defect -> (file content, error).
_BAD_TOKENIZER_JSON = {
    "duplicate-token": (_tokenizer_json().replace('"ab": 256', '"ab": 256, "ab": 259'), r"tokenizer\.json: duplicate key 'ab'"),
    "id-beyond-vocab": (_tokenizer_json({**TINY_VOCAB, "ab": 999}), r"tokenizer\.json: token 'ab' has id 999, but 259 tokens"),
    "duplicate-id": (_tokenizer_json({**TINY_VOCAB, "xy": 257}), r"tokenizer\.json: tokens 'Ġt' \(b' t'\) and 'xy' both have"),
    "merge-names-unknown-token": (_tokenizer_json(merges=[*TINY_MERGES, ["q", "xy"]]), r"tokenizer\.json: merge 3 \(q xy\)"),
    "merge-not-a-pair": (_tokenizer_json(merges=[*TINY_MERGES, ["a"]]), r"tokenizer\.json: model\.merges\[2\]: expected a"),
    "merge-not-text": (_tokenizer_json(merges=[*TINY_MERGES, [1, 2]]), r"tokenizer\.json: model\.merges\[2\]: expected a"),
    "vocab-not-object": (_tokenizer_json(vocab=["a"]), r"tokenizer\.json: expected a JSON object of token -> id, got list"),
    "not-json": ("{", r"tokenizer\.json: Expecting property name"),
    "not-an-object": ("[]", r"tokenizer\.json does not describe a BPE model"),
    "merges-not-a-list": (_tokenizer_json(merges="a b"), r"tokenizer\.json does not describe a BPE model"),
}


@pytest.mark.parametrize("defect", _BAD_TOKENIZER_JSON)
def test_bad_tokenizer_json_is_refused(tmp_path: Path, defect: str) -> None:
    content, match = _BAD_TOKENIZER_JSON[defect]
    _write(tmp_path / "tokenizer.json", content)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(tmp_path)


def test_unknown_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unrecognised tokenizer file"):
        Tokenizer.from_pretrained(DATA / "tinyshakespeare.txt")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:2"):
        Tokenizer.from_pretrained(bad)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="BPE"):
        load_vocabulary(tmp_path / "tokenizer.json")


def test_merges_out_of_id_order_are_rejected(tmp_path: Path) -> None:
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({"ab": 257, "cd": 256})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nc d\n")
    with pytest.raises(ValueError, match="merge"):
        load_vocabulary(tmp_path)


def test_bad_engine() -> None:
    with pytest.raises(ValueError, match="engine"):
        Tokenizer.from_pretrained(DATA / "gpt2.tiktoken", engine="rust")


@pytest.mark.parametrize("bad_id", [50257, -1, 2**70, 1.5, "7"])
def test_decode_invalid_id_names_it(tok: Tokenizer, bad_id: object) -> None:
    with pytest.raises(ValueError, match=f"invalid token id {bad_id!r}".replace(".", r"\.")):
        tok.decode([15496, bad_id, 995])


def test_decode_accepts_numpy_and_torch_ids(tok: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    assert tok.decode(np.array([15496, 995])) == tok.decode(torch.tensor([15496, 995])) == "Hello world"


# --- char-level ----------------------------------------------------------------------------


def test_char_tokenizer(shakespeare: str) -> None:
    char = CharTokenizer.from_text(shakespeare)
    assert char.vocab_size == len(char) == 65
    assert char.chars == sorted(set(shakespeare))
    assert char.encode("\n !") == [0, 1, 2]
    sample = shakespeare[:2000]
    assert char.decode(char.encode(sample)) == sample
    restored = CharTokenizer.from_dict(json.loads(json.dumps(char.to_dict())))
    assert restored.chars == char.chars
    assert restored.encode(sample) == char.encode(sample)


def test_char_tokenizer_errors() -> None:
    char = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z'"):
        char.encode("abz")
    with pytest.raises(ValueError, match="invalid token id 3"):
        char.decode([0, 3])
    with pytest.raises(ValueError, match="CharTokenizer"):
        CharTokenizer.from_dict({"type": "bpe"})
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer(["a", "a"])
