"""The trainer: a short char-level run on tiny Shakespeare must beat the bigram model, and its checkpoint loads."""
import json

import pytest
import torch

from gpt2fast import GPT2
from gpt2fast.bigram import CountingBigram
from gpt2fast.data import default_data_dir, load_text, split_text
from gpt2fast.tokenizer import CharTokenizer
from gpt2fast.train import CHAR_VOCAB_FILE, TrainConfig, learning_rate, train

SHAKESPEARE = default_data_dir() / "tinyshakespeare.txt"
needs_data = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"tiny Shakespeare not found at {SHAKESPEARE}")


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
