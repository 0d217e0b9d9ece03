"""The trainer: a short char-level run on tiny Shakespeare must beat the bigram model, and its checkpoint loads;
token files, resume, gradient accumulation, bf16, compile, the plot, the target time and the presets."""
import functools
import json
import math
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from gpt2fast import GPT2, GPT2Config
from gpt2fast.bigram import CountingBigram
from gpt2fast.cli import main
from gpt2fast.data import default_data_dir, load_text, split_text, tokenize_text
from gpt2fast.tokenizer import CharTokenizer, Tokenizer
from gpt2fast.train import (CHAR_VOCAB_FILE, TrainConfig, evaluate_full, flops_per_token, learning_rate,
                            peak_flops, train, train_config)

SHAKESPEARE = default_data_dir() / "tinyshakespeare.txt"
needs_data = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"tiny Shakespeare not found at {SHAKESPEARE}")


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    """Token files go to the test's own folder, not the user's cache."""
    monkeypatch.setenv("GPT2FAST_CACHE", str(tmp_path / "cache"))


def test_learning_rate_warms_up_then_decays_to_min():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [learning_rate(i, cfg) for i in range(cfg.max_iters + 5)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert lrs[cfg.max_iters] == pytest.approx(cfg.min_lr) and lrs[-1] == pytest.approx(cfg.min_lr)


def test_time_budget_anneals_the_schedule_by_the_deadline():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=10_000, max_seconds=60)
    assert learning_rate(20, cfg, elapsed=0.0) > 0.99e-3
    assert learning_rate(20, cfg, elapsed=30.0) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert learning_rate(20, cfg, elapsed=61.0) == pytest.approx(cfg.min_lr)


@needs_data
def test_short_char_run_beats_the_bigram_model_and_saves_a_loadable_checkpoint(tmp_path):
    # No time budget: on a loaded machine the default one ended the run before its evaluations.
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_iters=300, max_seconds=0.0, warmup_iters=30,
                      eval_interval=100, eval_iters=20, batch_size=16, block_size=64, progress=False)
    result = train(cfg)

    text = load_text(SHAKESPEARE)
    tok = CharTokenizer.from_text(text)
    train_text, val_text = split_text(text)
    bigram = CountingBigram().fit(tok.encode(train_text), tok.vocab_size)
    assert result["val_loss"] < bigram.loss(tok.encode(val_text))
    assert [h["iter"] for h in result["history"]] == [100, 200, 300]

    model = GPT2.from_pretrained(cfg.out_dir)
    assert model.config.vocab_size == tok.vocab_size and model.config.n_positions == 64
    saved = CharTokenizer.from_dict(json.loads((tmp_path / "run" / CHAR_VOCAB_FILE).read_text()))
    assert saved.chars == tok.chars
    out = model.generate(torch.tensor([tok.encode("ROMEO:")]), 20, seed=0)
    assert out.shape == (1, 26) and saved.decode(out[0].tolist()).startswith("ROMEO:")


@needs_data
def test_max_seconds_stops_early(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_iters=100_000, max_seconds=1.0, eval_iters=2,
                      block_size=32, progress=False)
    result = train(cfg)
    assert result["iters"] < cfg.max_iters


# ---- the training loop's pieces, on a small model and the first 40,000 characters of tiny Shakespeare ----

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, max_seconds=0.0, warmup_iters=2,
            eval_interval=4, eval_iters=2, log_interval=3, progress=False)


@pytest.fixture
def small_text(tmp_path):
    if not SHAKESPEARE.exists():
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE}")
    path = tmp_path / "small.txt"
    path.write_text(load_text(SHAKESPEARE)[:40_000])
    return path


def tiny(tmp_path, small_text, name="run", **overrides) -> TrainConfig:
    return TrainConfig(data=str(small_text), out_dir=str(tmp_path / name), **{**TINY, **overrides})


def test_token_files_are_written_once_and_reused(small_text, tmp_path, monkeypatch):
    first = tokenize_text(small_text, cache_dir=tmp_path / "tokens")
    train_text, val_text = split_text(small_text.read_text())
    assert first.train.dtype == torch.uint16 and first.tokenizer.decode(first.train.tolist()) == train_text
    assert first.tokenizer.decode(first.val.tolist()) == val_text
    assert {p.name for p in first.folder.iterdir()} == {"train.bin", "val.bin", "meta.json"}

    def no_encoding(self, text):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(CharTokenizer, "encode", no_encoding)
    again = tokenize_text(small_text, cache_dir=tmp_path / "tokens")
    assert again.folder == first.folder and again.tokenizer.chars == first.tokenizer.chars
    assert torch.equal(again.train, first.train) and torch.equal(again.val, first.val)

    monkeypatch.undo()
    small_text.write_text(small_text.read_text() + "A changed text gets files of its own.\n")
    assert tokenize_text(small_text, cache_dir=tmp_path / "tokens").folder != first.folder


@pytest.mark.skipif(not (default_data_dir() / "gpt2_hf").exists(), reason="GPT-2 vocabulary not found")
def test_bpe_token_files_hold_the_tokenizers_ids(small_text, tmp_path):
    vocab = default_data_dir() / "gpt2_hf"
    tokens = tokenize_text(small_text, str(vocab), cache_dir=tmp_path / "tokens")
    train_text, val_text = split_text(small_text.read_text())
    bpe = Tokenizer.from_pretrained(vocab)
    assert tokens.train.tolist() == bpe.encode(train_text) and tokens.val.tolist() == bpe.encode(val_text)
    assert tokenize_text(small_text, "char", cache_dir=tmp_path / "tokens").folder != tokens.folder


def test_cosine_schedule_values():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, max_seconds=0)
    assert learning_rate(4, cfg) == pytest.approx(5e-4)
    assert learning_rate(35, cfg) == pytest.approx(1e-4 + 0.45e-3 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(60, cfg) == pytest.approx(0.55e-3)
    assert learning_rate(85, cfg) == pytest.approx(1e-4 + 0.45e-3 * (1 + math.cos(3 * math.pi / 4)))


# Stopped at an evaluation, and between two.
@pytest.mark.parametrize("stop_at, dtype", [(4, "float32"), (6, "float32"), (6, "bfloat16")])
def test_resume_continues_the_same_loss_curve(small_text, tmp_path, stop_at, dtype):
    whole = train(tiny(tmp_path, small_text, "whole", max_iters=12, dropout=0.1, dtype=dtype))
    first = train(tiny(tmp_path, small_text, "split", max_iters=12, dropout=0.1, dtype=dtype, stop_at_iter=stop_at))
    assert not first["completed"] and len(first["losses"]) == stop_at
    second = train(tiny(tmp_path, small_text, "split", max_iters=12, dropout=0.1, dtype=dtype, resume=True))

    assert second["losses"] == whole["losses"]  # bitwise: dropout masks and batches continue where they were
    without_time = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in (whole, second)]
    assert without_time[0] == without_time[1] and [h["iter"] for h in whole["history"]] == [4, 8, 12]
    assert second["val_loss"] == whole["val_loss"]
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_final_validation_loss_is_the_saved_models(small_text, tmp_path):
    # Evaluation reuses the model between training steps: nothing it caches may outlive a weight update.
    cfg = tiny(tmp_path, small_text, max_iters=8)
    result = train(cfg)
    model, tokens = GPT2.from_pretrained(cfg.out_dir), tokenize_text(small_text)
    assert result["val_loss"] == pytest.approx(evaluate_full(model, tokens.val, cfg, "cpu"), rel=1e-6)


def test_resume_without_a_checkpoint_is_refused(small_text, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no committed checkpoint"):
        train(tiny(tmp_path, small_text, resume=True))


def test_gradient_accumulation_equals_one_batch_as_big(small_text, tmp_path):
    big = train(tiny(tmp_path, small_text, "big", max_iters=5, batch_size=8))
    accumulated = train(tiny(tmp_path, small_text, "accumulated", max_iters=5, batch_size=2,
                             gradient_accumulation_steps=4))
    assert accumulated["losses"] == pytest.approx(big["losses"], rel=1e-5)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("big", "accumulated"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_bfloat16_run_keeps_fp32_weights_and_finite_losses(small_text, tmp_path):
    fp32 = train(tiny(tmp_path, small_text, "fp32", max_iters=6))
    bf16 = train(tiny(tmp_path, small_text, "bf16", max_iters=6, dtype="bfloat16"))
    assert all(math.isfinite(x) for x in bf16["losses"]) and math.isfinite(bf16["val_loss"])
    assert bf16["losses"] != fp32["losses"]  # the matmuls did run in bf16 ...
    assert bf16["losses"] == pytest.approx(fp32["losses"], abs=0.05)  # ... on the same curve
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_compiled_model_trains_on_the_same_curve(small_text, tmp_path, monkeypatch):
    # aot_eager: dynamo traces the model and autograd as inductor would see them, without compiling C++ (minutes here).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = train(tiny(tmp_path, small_text, "eager", max_iters=4))
    compiled = train(tiny(tmp_path, small_text, "compiled", max_iters=4, compile=True))
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-5)


def test_loss_plot_and_log_are_written(small_text, tmp_path):
    result = train(tiny(tmp_path, small_text, max_iters=8))
    assert result["plot"] == str(tmp_path / "run" / "loss.png")
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["losses"] == result["losses"] and len(log["losses"]) == 8 and log["history"] == result["history"]


def test_without_matplotlib_the_plot_is_skipped_with_one_line(small_text, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    result = train(tiny(tmp_path, small_text, max_iters=4))
    assert result["plot"] is None and not (tmp_path / "run" / "loss.png").exists()
    assert [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()] == [
        "gpt2fast: matplotlib is not installed, so no loss plot (pip install matplotlib)"]


def test_target_val_loss_records_when_it_is_first_reached(small_text, tmp_path):
    result = train(tiny(tmp_path, small_text, max_iters=8, target_val_loss=10.0))
    assert result["iter_to_target"] == 4 and result["seconds_to_target"] == result["history"][0]["seconds"]
    missed = train(tiny(tmp_path, small_text, "missed", max_iters=4, target_val_loss=0.01))
    assert missed["iter_to_target"] is None and missed["seconds_to_target"] is None


def test_flops_per_token_and_peak_flops():
    config = GPT2Config.from_preset("gpt2")
    # nanoGPT's count for GPT-2 small at T = 1024: N = 124.44M weights without the position table.
    n = config.num_params() - 1024 * 768
    assert flops_per_token(config, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("") is None and peak_flops("NVIDIA GeForce RTX 4090") is None


def test_shakespeare_char_preset_is_nanogpts_run():
    cfg = train_config("shakespeare-char", max_iters=10)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout) == (6, 6, 384, 256, 0.2)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.lr, cfg.min_lr) == (64, 1, 1e-3, 1e-4)
    assert (cfg.weight_decay, cfg.beta2, cfg.warmup_iters, cfg.grad_clip) == (0.1, 0.99, 100, 1.0)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.max_seconds, cfg.max_iters) == (250, 200, 0.0, 10)
    with pytest.raises(ValueError, match="unknown training preset"):
        train_config("shakespeare")


# ---- options are checked by name before any work ----

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("option, value, message", [
    ("grad_clip", -1.0, r"grad_clip must be >= 0, got -1.0"),
    ("max_iters", -5, r"max_iters must be >= 0, got -5"),
    ("warmup_iters", -1, r"warmup_iters must be >= 0, got -1"),
    ("max_seconds", -1.0, r"max_seconds must be >= 0, got -1.0"),
    ("stop_at_iter", -1, r"stop_at_iter must be >= 0, got -1"),
    ("target_val_loss", NAN, r"target_val_loss must be a finite number, got nan"),
    ("lr", INF, r"lr must be a finite number, got inf"),
    ("lr", NAN, r"lr must be a finite number, got nan"),
    ("lr", 0.0, r"lr must be > 0, got 0.0"),
    ("lr", -1.0, r"lr must be > 0, got -1.0"),
    ("min_lr", 1.0, r"min_lr \(1.0\) must not exceed lr \(0.003\)"),
    ("weight_decay", NAN, r"weight_decay must be a finite number, got nan"),
    ("weight_decay", -1.0, r"weight_decay must be >= 0, got -1.0"),
    ("beta2", 1.0, r"beta2 must be in \[0, 1\), got 1.0"),
    ("beta2", -0.5, r"beta2 must be >= 0, got -0.5"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
    ("dropout", -0.1, r"dropout must be >= 0, got -0.1"),
    ("n_layer", -1, r"n_layer must be >= 0, got -1"),
    ("n_head", -2, r"n_head must be >= 0, got -2"),
    ("n_embd", -32, r"n_embd must be >= 0, got -32"),
])
def test_a_bad_option_is_refused_by_name(option, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{option: value})


@pytest.mark.parametrize("flag", ["--grad-clip=-1", "--lr=inf", "--weight-decay=nan", "--min-lr=1", "--beta2=1",
                                  "--dropout=1", "--n-layer=-1", "--max-iters=-5", "--target-val-loss=nan"])
def test_cli_refuses_a_bad_option_in_one_line_before_any_work(flag, small_text, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["train", f"--data={small_text}", f"--out-dir={tmp_path / 'run'}", flag])
    message = str(exit_.value)
    option = flag.removeprefix("--").split("=")[0].replace("-", "_")
    assert message.startswith(f"gpt2fast train: error: {option} ") and "\n" not in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_an_out_dir_that_cannot_be_a_folder_is_refused_before_the_data_is_read(small_text, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    for out_dir in (blocker, blocker / "run"):
        with pytest.raises(SystemExit, match=f"gpt2fast train: error: out_dir {re.escape(str(out_dir))} is not a "
                                             f"writable folder"):
            main(["train", f"--data={small_text}", f"--out-dir={out_dir}", "--no-progress"])
    assert not (tmp_path / "cache").exists()  # refused before tokenising


# ---- bad data: one line naming the path ----

def bad_data(tmp_path, kind):
    path = tmp_path / kind
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_text("")
    elif kind == "short":
        path.write_text("To be, or not to be: that is the question.\n" * 2)  # validation: 9 characters
    elif kind == "latin-1":
        path.write_bytes("Où est la plume de ma tante?\n".encode("latin-1") * 100)
    return path


@pytest.mark.parametrize("kind, message", [
    ("folder", "{path} is a folder, not a text file"),
    ("missing", "no text file at {path}"),
    ("empty", "{path} holds 0 characters: too short to split into training and validation text"),
    ("short", "{path} is too short: its validation split has 9 tokens, and block_size 16 needs at least 17"),
    ("latin-1", "{path} is not UTF-8 text: byte 0xf9 at offset 1"),
])
def test_cli_refuses_bad_data_naming_the_path(kind, message, tmp_path):
    path = bad_data(tmp_path, kind)
    with pytest.raises(SystemExit) as exit_:
        main(["train", f"--data={path}", f"--out-dir={tmp_path / 'run'}", "--block-size=16", "--no-progress"])
    assert str(exit_.value) == "gpt2fast train: error: " + message.format(path=path)


def test_cli_refuses_a_cache_dir_that_cannot_be_written(small_text, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    with pytest.raises(SystemExit, match=f"gpt2fast train: error: cannot write token files in "
                                         f"{re.escape(str(blocker))} "):
        main(["train", f"--data={small_text}", f"--out-dir={tmp_path / 'run'}", f"--cache-dir={blocker}"])


# ---- fine-tuning a char model: its own alphabet, and the run's dropout ----

@pytest.fixture
def char_model(small_text, tmp_path):
    """A char model trained on small_text: the checkpoint to fine-tune, and its vocabulary."""
    train(tiny(tmp_path, small_text, "base", max_iters=2))
    vocab = json.loads((tmp_path / "base" / CHAR_VOCAB_FILE).read_text())
    return tmp_path / "base", CharTokenizer.from_dict(vocab)


def fine_tune(tmp_path, text, name, base, **overrides) -> dict:
    return train(tiny(tmp_path, text, name, init_from=str(base), n_layer=0, n_head=0, n_embd=0, **overrides))


def test_fine_tuning_a_char_model_reads_the_text_in_its_own_alphabet(char_model, small_text, tmp_path):
    base, vocab = char_model
    lower = tmp_path / "lower.txt"  # fewer characters than the model's: a text of its own would number them anew
    lower.write_text("".join(c for c in small_text.read_text() if c.islower() or c in " \n"))
    fine_tune(tmp_path, lower, "tuned", base, max_iters=2)

    saved = CharTokenizer.from_dict(json.loads((tmp_path / "tuned" / CHAR_VOCAB_FILE).read_text()))
    assert saved.chars == vocab.chars
    tokens = tokenize_text(lower, vocab)  # the token files the run read, from the cache
    assert tokens.train.tolist() == vocab.encode(split_text(lower.read_text())[0])


def test_fine_tuning_a_char_model_refuses_characters_it_lacks(char_model, small_text, tmp_path):
    base, _ = char_model
    odd = tmp_path / "odd.txt"
    odd.write_text(small_text.read_text() + "mail@example ~home\n")
    with pytest.raises(ValueError, match=re.escape("holds characters that the char vocabulary lacks: '@~'")):
        fine_tune(tmp_path, odd, "tuned", base)


def test_fine_tuning_at_char_level_refuses_a_checkpoint_without_a_char_vocabulary(small_text, tmp_path):
    GPT2(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "bpe")
    with pytest.raises(ValueError, match="init_from .*bpe has no char_vocab.json, so its token ids are not characters"):
        fine_tune(tmp_path, small_text, "tuned", tmp_path / "bpe")


def test_fine_tuning_honours_dropout(char_model, small_text, tmp_path):
    base, _ = char_model
    plain = fine_tune(tmp_path, small_text, "plain", base, max_iters=3)
    dropped = fine_tune(tmp_path, small_text, "dropped", base, max_iters=3, dropout=0.5)
    assert dropped["losses"] != plain["losses"]
    assert json.loads((tmp_path / "dropped" / "config.json").read_text())["resid_pdrop"] == 0.5


def test_fine_tuning_refuses_shape_options_and_a_longer_context(char_model, small_text, tmp_path):
    base, _ = char_model
    with pytest.raises(ValueError, match="n_layer \\(2\\) cannot reshape the init_from checkpoint"):
        TrainConfig(init_from=str(base), n_layer=2)
    with pytest.raises(ValueError, match="block_size \\(32\\) exceeds the context of .* \\(16 positions\\)"):
        fine_tune(tmp_path, small_text, "long", base, block_size=32)
