import re
from pathlib import Path

import pytest
import torch

from gpt2fast.data import DATA_ENV_VAR, default_data_dir, get_batch, load_text, split_text, tokenize_text
from gpt2fast.tokenizer import CharTokenizer


def test_default_data_dir_is_shared_folder_next_to_repo(monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    repo_root = Path(__file__).resolve().parents[1]
    assert default_data_dir() == repo_root.parent / "shared" / "data"


def test_default_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "missing"))
    # An absent folder is returned, not an error: callers choose to fail or skip.
    assert default_data_dir() == tmp_path / "missing"


def test_load_text_roundtrip(tmp_path):
    text = "First Citizen:\nBefore we proceed\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert load_text(path) == text
    assert load_text(str(path)) == text


def test_split_text_is_contiguous_90_10():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_text(text)
    assert train + val == text
    assert len(train) == 900 and len(val) == 100


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_split_text_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match="frac"):
        split_text("abcdef", frac)


def test_get_batch_shapes_and_shift():
    data = torch.arange(1000)
    x, y = get_batch(data, batch_size=4, block_size=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == torch.long
    # With data = 0..999 every window is a run of consecutive ids, and y is x shifted by one.
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.long))
    assert x.is_contiguous() and y.is_contiguous()


def test_get_batch_deterministic_with_seed():
    data = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(1))
    a = get_batch(data, 8, 16, generator=torch.Generator().manual_seed(42))
    b = get_batch(data, 8, 16, generator=torch.Generator().manual_seed(42))
    c = get_batch(data, 8, 16, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_batch_accepts_uint16_and_device():
    data = torch.arange(300).to(torch.uint16)
    x, y = get_batch(data, 3, 5, generator=torch.Generator().manual_seed(0), device="cpu")
    assert x.dtype == torch.long
    assert torch.equal(y, x + 1)


def test_get_batch_minimum_length_covers_whole_data():
    data = torch.arange(9)
    x, y = get_batch(data, 2, 8)
    assert torch.equal(x[0], data[:8]) and torch.equal(y[0], data[1:])


def test_get_batch_errors():
    with pytest.raises(ValueError, match="block_size \\+ 1"):
        get_batch(torch.arange(8), 2, 8)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(torch.arange(100).view(10, 10), 2, 4)
    with pytest.raises(ValueError, match=">= 1"):
        get_batch(torch.arange(100), 0, 4)


# ---- bad text files and cache folders: errors that name the path ----

def test_load_text_names_a_folder_a_missing_file_and_a_non_utf8_one(tmp_path):
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))} is a folder, not a text file"):
        load_text(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no text file at {re.escape(str(tmp_path / 'missing.txt'))}"):
        load_text(tmp_path / "missing.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Où\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{re.escape(str(latin))} is not UTF-8 text: byte 0xf9 at offset 1"):
        load_text(latin)


@pytest.mark.parametrize("text", ["", "a"])
def test_tokenize_text_refuses_a_text_too_short_to_split(text, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"short.txt holds {len(text)} characters: too short to split"):
        tokenize_text(path, cache_dir=tmp_path / "tokens")


def test_tokenize_text_names_a_cache_dir_it_cannot_write(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("First Citizen:\nBefore we proceed\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for cache_dir in (blocker, blocker / "below"):
        with pytest.raises(ValueError, match=f"cannot write token files in {re.escape(str(cache_dir))} "):
            tokenize_text(text, cache_dir=cache_dir)


def test_tokenize_text_with_a_given_char_vocabulary(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abba cab\n" * 4)
    vocab = CharTokenizer(" \nabcdefz")  # more characters than the text's, in an order of its own
    tokens = tokenize_text(text, vocab, cache_dir=tmp_path / "tokens")
    train, val = split_text(text.read_text())
    assert tokens.tokenizer.chars == vocab.chars and tokens.train.tolist() == vocab.encode(train)
    assert tokens.val.tolist() == vocab.encode(val)
    # The text's own alphabet numbers the same characters otherwise, so it gets files of its own.
    assert tokenize_text(text, cache_dir=tmp_path / "tokens").folder != tokens.folder
    with pytest.raises(ValueError, match=re.escape("t.txt holds characters that the char vocabulary lacks: '\\n '")):
        tokenize_text(text, CharTokenizer("abc"), cache_dir=tmp_path / "tokens")
