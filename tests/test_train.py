"""The trainer: a short char-level run on tiny Shakespeare must beat the bigram model, and its checkpoint loads;
token files, resume, gradient accumulation, bf16, compile, the plot, the target time and the presets."""
import functools
import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from gpt2fast import GPT2, GPT2Config
from gpt2fast.bigram import CountingBigram
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
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_iters=300, warmup_iters=30, eval_interval=100,
                      eval_iters=20, batch_size=16, block_size=64, progress=False)
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
    with pytest.raises(FileNotFoundError, match="no training_state.pt"):
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
