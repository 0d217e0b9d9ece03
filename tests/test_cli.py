"""`python -m gpt2fast`: generate (streamed), backends, bigram, and its errors."""
import os
import subprocess
import sys

import pytest
import torch
import transformers

from gpt2fast.cli import main, stream_text
from gpt2fast.data import default_data_dir
from gpt2fast.tokenizer import Tokenizer

VOCAB = default_data_dir() / "gpt2.tiktoken"
needs_vocab = pytest.mark.skipif(not VOCAB.exists(), reason=f"GPT-2 vocabulary not found at {VOCAB}")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random GPT-2 with the real vocabulary size, saved in the HF format."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)
    folder = tmp_path_factory.mktemp("hf")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@needs_vocab
def test_generate_streams_the_same_text_for_the_same_seed(hf_folder, capsys):
    argv = ["generate", "--model", str(hf_folder), "--prompt", "Hello world", "--max-new-tokens", "12",
            "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--tokenizer", str(VOCAB)]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert first.startswith("Hello world") and len(first) > len("Hello world\n")
    assert capsys.readouterr().out == first


@needs_vocab
def test_greedy_generation_prints_the_models_greedy_tokens(hf_folder, capsys):
    from gpt2fast import GPT2

    tok = Tokenizer.from_pretrained(VOCAB)
    main(["generate", "--model", str(hf_folder), "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0",
          "--tokenizer", str(VOCAB)])
    model = GPT2.from_pretrained(hf_folder)
    ids = model.generate(torch.tensor([tok.encode("The")]), 8, do_sample=False)
    assert capsys.readouterr().out == tok.decode(ids[0].tolist()) + "\n"


@needs_vocab
def test_stream_text_holds_back_split_utf8_characters():
    tok = Tokenizer.from_pretrained(VOCAB)
    text = "naïve café 😀 日本"
    ids = tok.encode(text)
    pieces = list(stream_text(tok, iter(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_backends_lists_every_backend_with_a_reason():
    out = subprocess.run([sys.executable, "-m", "gpt2fast", "backends"], capture_output=True, text=True, check=True,
                         env={**os.environ, "GPT2FAST_BACKEND": "torch"}).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
             ("torch", "triton", "cuda")}
    assert set(lines) == {"torch", "triton", "cuda"}
    assert lines["torch"].split()[1] == "available"
    for name in ("triton", "cuda"):
        status, reason = lines[name].split()[1], " ".join(lines[name].split()[2:])
        assert status in ("available", "unavailable") and reason
    assert "selected: torch" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/nonexistent/folder/x", "--max-new-tokens", "1"], "could not be fetched"),
    (["generate", "--model", "nope", "--random-weights"], "needs a preset name"),
    (["generate", "--model", "char", "--random-weights", "--tokenizer", str(VOCAB)], "tokenizer has"),
])
def test_generate_errors_are_clear(argv, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=message):
        main(argv)


@needs_vocab
def test_bad_sampling_parameter_is_named(hf_folder):
    with pytest.raises(SystemExit, match="top_p must be in"):
        main(["generate", "--model", str(hf_folder), "--top-p", "1.5", "--tokenizer", str(VOCAB)])


@pytest.mark.skipif(not (default_data_dir() / "tinyshakespeare.txt").exists(), reason="tiny Shakespeare not found")
def test_bigram_command_reports_both_models(capsys):
    main(["bigram", "--steps", "50"])
    out = capsys.readouterr().out
    assert "counting bigram" in out and "neural bigram" in out
