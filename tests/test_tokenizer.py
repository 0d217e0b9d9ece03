"""Tokenizer tests: both engines against tiktoken's own GPT-2 encoding, on real data.

The reference is tiktoken built from ``gpt2.tiktoken`` with tiktoken's ``r50k_pat_str``,
a different (faster) pre-tokenizer regex than the one gpt2fast uses, so agreement checks
the pattern too, not only the merges.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fast.bpe import bytes_to_unicode
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


# --- errors --------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.*tiktoken.*vocab\.json.*encoder\.json"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        Tokenizer.from_pretrained(tmp_path)


def test_half_a_pair_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
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
