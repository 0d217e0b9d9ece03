"""`python -m gpt2fast`: generate (streamed), backends, bigram, train (flags, presets, the record), and its errors."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers

from gpt2fast import cli, ops
from gpt2fast.cli import main, stream_text
from gpt2fast.data import default_data_dir
from gpt2fast.ops import registry
from gpt2fast.tokenizer import Tokenizer
from gpt2fast.train import TrainConfig, train_config

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
    names = registry.choices()[1:]
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in names}
    assert set(lines) == set(names) >= {"torch", "torch_cpu", "triton", "native"}
    assert lines["torch"].split()[1] == "available"
    for name in names:
        status, reason = lines[name].split()[1], " ".join(lines[name].split()[2:])
        assert status in ("available", "unavailable") and reason
    assert "selected: torch" in out


def test_generate_takes_a_former_backend_name_with_a_future_warning(monkeypatch):
    """--backend cuda still runs, on the backend now called native, and says so."""
    selected = []
    monkeypatch.setattr(cli, "generate_text", lambda args: selected.append(ops.get_backend()))
    with pytest.warns(FutureWarning, match="'cuda' is now called 'native'"):
        main(["generate", "--model", "char", "--random-weights", "--backend", "cuda"])
    assert selected == ["native"]


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


@pytest.mark.parametrize("device, message", [
    ("bogus", r"device 'bogus' is not a device name torch knows"),
    ("cuda", r"device 'cuda': this torch sees no CUDA device"),
    ("cuda:7", r"device 'cuda:7': this torch sees no CUDA device"),
])
@pytest.mark.parametrize("command", ["generate", "train"])
def test_a_device_this_machine_lacks_is_named(command, device, message, tmp_path):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has a CUDA device")
    argv = {"generate": ["generate", "--model", "char", "--random-weights"],
            "train": ["train", "--out-dir", str(tmp_path / "run"), "--max-iters", "1"]}[command]
    with pytest.raises(SystemExit, match=f"^gpt2fast {command}: error: {message}"):
        main(argv + ["--device", device])


def run_cli(argv, timeout, **kwargs):
    return subprocess.run([sys.executable, "-m", "gpt2fast", *argv], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


@needs_vocab
@pytest.mark.parametrize("top_p", ["1e-300", "1e-50", "1e-46"])
def test_top_p_below_fp32_range_ends_and_keeps_only_the_top_token(hf_folder, top_p):
    """Such a top_p rounds to 0 in fp32; the nucleus is then the top token alone, as greedy decoding picks."""
    argv = ["generate", "--model", str(hf_folder), "--tokenizer", str(VOCAB), "--prompt", "Hi", "--max-new-tokens",
            "16"]
    sampled = run_cli(argv + ["--top-p", top_p, "--seed", "1"], timeout=300)
    greedy = run_cli(argv + ["--temperature", "0"], timeout=300)
    assert sampled.returncode == 0 and greedy.returncode == 0, sampled.stderr + greedy.stderr
    assert sampled.stdout == greedy.stdout


def test_ctrl_c_stops_generation_with_a_tiny_top_p(tmp_path):
    """SIGINT reaches Python while generations with a top_p that rounds to 0 in fp32 run back to back."""
    code = ("import sys, torch\n"
            "from gpt2fast import GPT2, GPT2Config\n"
            "model = GPT2(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()\n"
            "ids = torch.randint(50257, (4, 3), generator=torch.Generator().manual_seed(0))\n"
            "while True:\n"
            "    model.generate(ids, 60, top_p=1e-300, seed=0)\n"
            "    print('generated', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "generated\n", proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err


@pytest.mark.skipif(not (default_data_dir() / "tinyshakespeare.txt").exists(), reason="tiny Shakespeare not found")
def test_bigram_command_reports_both_models(capsys):
    main(["bigram", "--steps", "50"])
    out = capsys.readouterr().out
    assert "counting bigram" in out and "neural bigram" in out


class _Captured(Exception):
    pass


@pytest.mark.parametrize("argv, expected", [
    ([], TrainConfig()),
    (["--train-preset", "shakespeare-char", "--max-iters", "10", "--compile"],
     train_config("shakespeare-char", max_iters=10, compile=True)),
    (["--lr", "1e-3", "--no-progress", "--dtype", "bfloat16"], TrainConfig(lr=1e-3, progress=False, dtype="bfloat16")),
])
def test_train_flags_override_the_preset_and_nothing_else(argv, expected, monkeypatch):
    def capture(cfg):
        raise _Captured(cfg)

    monkeypatch.setattr(cli, "train", capture)
    with pytest.raises(_Captured) as got:
        main(["train", *argv])
    assert got.value.args[0] == expected


@pytest.mark.skipif(not (default_data_dir() / "tinyshakespeare.txt").exists(), reason="tiny Shakespeare not found")
def test_train_command_records_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2FAST_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "small.txt"
    text.write_text((default_data_dir() / "tinyshakespeare.txt").read_text()[:40_000])
    record_path = tmp_path / "results" / "train.json"
    main(["train", "--data", str(text), "--out-dir", str(tmp_path / "run"), "--n-layer", "2", "--n-head", "2",
          "--n-embd", "32", "--block-size", "16", "--batch-size", "4", "--max-iters", "6", "--eval-interval", "3",
          "--eval-iters", "2", "--target-val-loss", "10", "--sample-tokens", "10", "--no-progress",
          "--record", str(record_path)])
    out = capsys.readouterr().out
    assert "validation loss 10.0 reached at iteration 3" in out and "--- sample (10 tokens" in out

    record = json.loads(record_path.read_text())
    assert record["config"]["max_iters"] == 6 and record["config"]["n_layer"] == 2
    assert record["environment"]["torch"] == torch.__version__
    assert record["iters"] == 6 and record["completed"] and record["world_size"] == 1
    assert [h["iter"] for h in record["history"]] == [3, 6]
    assert record["target_val_loss"] == 10.0 and record["iter_to_target"] == 3
    assert record["seconds_to_target"] == record["history"][0]["seconds"] <= record["seconds"] <= record["wall_seconds"]
    assert record["train_tokens_per_second"] > 0 and record["mfu"] is None and record["peak_flops"] is None
    assert record["plot"] == str(tmp_path / "run" / "loss.png") and len(record["sample"]) == 10
    assert "losses" not in record and "out_dir" not in record
