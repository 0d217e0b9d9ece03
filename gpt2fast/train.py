"""Train (or fine-tune) a GPT-2 on a text file: the char-level course model by default.

AdamW, linear warm-up then cosine decay, gradient clipping, periodic evaluation on the last 10% of
the text, a progress bar with loss and tokens/s, and a checkpoint in the Hugging Face format (plus
the char vocabulary) that `GPT2.from_pretrained` and `python -m gpt2fast generate` load.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import GPT2Config
from .data import default_data_dir, get_batch, load_text, split_text
from .model import GPT2
from .tokenizer import CharTokenizer, Tokenizer

CHAR_VOCAB_FILE = "char_vocab.json"


@dataclass
class TrainConfig:
    data: str = ""  # a text file; empty: tiny Shakespeare from the data folder
    out_dir: str = "runs/char"
    preset: str = "char"
    tokenizer: str = "char"  # "char", or a GPT-2 vocabulary path for Tokenizer.from_pretrained
    init_from: str = ""  # an HF GPT-2 folder to fine-tune instead of a fresh preset
    block_size: int = 128
    batch_size: int = 16
    max_iters: int = 5000
    # A time budget (0: none): the schedule ends at max_iters or max_seconds, whichever comes first.
    # The default is the demo's: the char model on tiny Shakespeare in 4 minutes of a 2-core CPU.
    max_seconds: float = 240.0
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_interval: int = 500
    eval_iters: int = 20  # batches per periodic estimate; the final evaluation reads the whole split
    seed: int = 1337
    device: str = "cpu"
    progress: bool = True


def learning_rate(it: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr by max_iters or, with a time budget, by max_seconds.

    Decaying by the clock as well makes a time-boxed run anneal fully on any machine, fast or slow.
    """
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    if cfg.max_seconds:
        progress = max(progress, elapsed / cfg.max_seconds)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def _tokenizer(cfg: TrainConfig, text: str):
    return CharTokenizer.from_text(text) if cfg.tokenizer == "char" else Tokenizer.from_pretrained(cfg.tokenizer)


def _model(cfg: TrainConfig, vocab_size: int) -> GPT2:
    if cfg.init_from:
        model = GPT2.from_pretrained(cfg.init_from)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"{cfg.init_from} has {model.config.vocab_size} tokens, the tokenizer {vocab_size}")
        return model.train()
    config = GPT2Config.from_preset(cfg.preset, vocab_size=vocab_size, n_positions=cfg.block_size,
                                    dropout=cfg.dropout)
    return GPT2(config)


def _optimizer(model: GPT2, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying biases, LayerNorm gains and embeddings' rows hurts small models.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=True)  # one kernel per step, CPU and GPU


def loss_fn(model: GPT2, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))


@torch.no_grad()
def evaluate(model: GPT2, data: torch.Tensor, cfg: TrainConfig, seed: int) -> float:
    """Mean loss over eval_iters random windows, the same windows every call (a fixed seed)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    losses = [loss_fn(model, *get_batch(data, cfg.batch_size, cfg.block_size, g, cfg.device)).item()
              for _ in range(cfg.eval_iters)]
    model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the history and final losses, and writes the checkpoint to cfg.out_dir."""
    torch.manual_seed(cfg.seed)
    text = load_text(cfg.data or default_data_dir() / "tinyshakespeare.txt")
    tokenizer = _tokenizer(cfg, text)
    train_text, val_text = split_text(text)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    model = _model(cfg, tokenizer.vocab_size).to(cfg.device)
    optimizer = _optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start = time.perf_counter()
    tokens_per_iter = cfg.batch_size * cfg.block_size
    bar = tqdm(range(cfg.max_iters), disable=not cfg.progress, desc="train", dynamic_ncols=True, mininterval=0.5)
    it = 0
    for it in bar:
        if it % cfg.eval_interval == 0 and it > 0:
            history.append(_eval_record(model, train_ids, val_ids, cfg, it, start))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, cfg, time.perf_counter() - start)
        loss = loss_fn(model, *get_batch(train_ids, cfg.batch_size, cfg.block_size, g, cfg.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{(it + 1) * tokens_per_iter / elapsed:,.0f}",
                        val=f"{history[-1]['val_loss']:.3f}" if history else "-")
        if cfg.max_seconds and elapsed > cfg.max_seconds:
            break
    seconds = time.perf_counter() - start
    history.append(_eval_record(model, train_ids, val_ids, cfg, it + 1, start))
    val_loss = evaluate_full(model, val_ids, cfg)
    tqdm.write(f"final: validation loss over the whole split {val_loss:.4f}")
    save_checkpoint(model.eval(), tokenizer, cfg, history)
    return {"history": history, "train_loss": history[-1]["train_loss"], "val_loss": val_loss,
            "iters": it + 1, "seconds": round(seconds, 2), "tokens_per_second": (it + 1) * tokens_per_iter / seconds,
            "out_dir": cfg.out_dir}


@torch.no_grad()
def evaluate_full(model: GPT2, data: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean loss over every token of `data`, in consecutive windows of block_size (each from a fresh context)."""
    model.eval()
    T = cfg.block_size
    n = (len(data) - 1) // T
    x, y = data[: n * T].view(n, T), data[1: n * T + 1].view(n, T)
    total = sum(loss_fn(model, xb.to(cfg.device), yb.to(cfg.device)).item() * len(xb)
                for xb, yb in zip(x.split(4 * cfg.batch_size), y.split(4 * cfg.batch_size)))
    model.train()
    return total / n


def _eval_record(model, train_ids, val_ids, cfg, it, start) -> dict:
    seconds = time.perf_counter() - start
    record = {"iter": it, "seconds": round(seconds, 2), "train_loss": evaluate(model, train_ids, cfg, seed=1),
              "val_loss": evaluate(model, val_ids, cfg, seed=2)}
    tqdm.write(f"iter {it:>6}  {seconds:7.1f} s  train loss {record['train_loss']:.4f}  val loss {record['val_loss']:.4f}")
    return record


def save_checkpoint(model: GPT2, tokenizer, cfg: TrainConfig, history: list[dict]) -> None:
    out = Path(cfg.out_dir)
    model.save_pretrained(out)
    if isinstance(tokenizer, CharTokenizer):
        (out / CHAR_VOCAB_FILE).write_text(json.dumps(tokenizer.to_dict()) + "\n")
    (out / "train_log.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "history": history}, indent=2) + "\n")
