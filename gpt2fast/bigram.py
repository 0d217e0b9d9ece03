"""Bigram language models: the simplest baseline a GPT has to beat.

A bigram model predicts the next token from the current one only. Two ways to build it:

* `CountingBigram` counts how often each pair (a, b) occurs and normalises the rows.
  Without smoothing this is the maximum-likelihood estimate: no bigram model can do
  better on the training data.
* `NeuralBigram` holds a [V, V] table of logits and learns it by gradient descent on
  cross-entropy. Row a of softmax(table) plays the role of the counting model's row a,
  so training converges to the same loss: same model family, different route there.

On character-level tiny Shakespeare both land at about 2.45-2.50 nats per character on
the validation split, against ln(65) ~ 4.17 for a uniform guess.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gpt2fast.data import default_data_dir, get_batch, load_text, split_text
from gpt2fast.tokenizer import CharTokenizer

Ids = torch.Tensor | Sequence[int]


def _as_long(ids: Ids) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).flatten()


def bigram_counts(ids: Ids, vocab_size: int) -> torch.Tensor:
    """Count matrix N [V, V] with N[a, b] = number of times b directly follows a.

    Each pair is encoded as one integer a * V + b, so a single bincount counts them all.
    """
    ids = _as_long(ids)
    pair_codes = ids[:-1] * vocab_size + ids[1:]
    return torch.bincount(pair_codes, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size)


class CountingBigram:
    """Bigram model from normalised pair counts."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None
        self.probs: torch.Tensor | None = None

    def fit(self, ids: Ids, vocab_size: int, smoothing: float = 1.0) -> CountingBigram:
        """Estimate P(b | a) = (N[a, b] + k) / sum_b' (N[a, b'] + k) with k = `smoothing`.

        Add-k smoothing keeps pairs never seen in training at a small non-zero probability;
        with k = 0 a single unseen pair in validation text makes the loss infinite.
        """
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.counts = bigram_counts(ids, vocab_size)
        smoothed = self.counts.double() + smoothing
        # A token never followed by anything (k = 0) has an all-zero row; give it a uniform
        # row instead of 0/0 so that sampling from it still works.
        row_sums = smoothed.sum(dim=1, keepdim=True)
        uniform = torch.full_like(smoothed, 1.0 / vocab_size)
        self.probs = torch.where(row_sums > 0, smoothed / row_sums.clamp_min(1e-300), uniform)
        return self

    def loss(self, ids: Ids) -> float:
        """Mean negative log-likelihood (nats) over the bigrams of `ids`."""
        ids = _as_long(ids)
        if len(ids) < 2:
            raise ValueError("need at least 2 tokens to form a bigram")
        probs = self._fitted_probs()
        return -probs[ids[:-1], ids[1:]].log().mean().item()

    def sample(self, n: int, start: int, generator: torch.Generator | None = None) -> list[int]:
        """Return `start` followed by `n` tokens, each drawn from the row of the previous one."""
        probs = self._fitted_probs()
        out = [start]
        for _ in range(n):
            out.append(torch.multinomial(probs[out[-1]], 1, generator=generator).item())
        return out

    def _fitted_probs(self) -> torch.Tensor:
        if self.probs is None:
            raise RuntimeError("call fit() before using the model")
        return self.probs


class NeuralBigram(nn.Module):
    """Bigram model as a single [V, V] lookup table of next-token logits."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.logits_table = nn.Embedding(vocab_size, vocab_size)
        # Zero logits = uniform prediction, so training starts from loss ln(V) exactly
        # instead of the higher, seed-dependent loss of random logits.
        nn.init.zeros_(self.logits_table.weight)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] -> logits [B, T, V]; loss is mean cross-entropy when targets are given."""
        logits = self.logits_table(idx)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, self.vocab_size), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def evaluate(self, ids: Ids) -> float:
        """Exact mean NLL (nats) over all bigrams of `ids`.

        A bigram model only ever sees pairs, so the loss over a whole text is the
        count-weighted average of -log p(b | a): one [V, V] product, however long the text.
        """
        counts = bigram_counts(ids, self.vocab_size).to(self.logits_table.weight.device)
        log_probs = F.log_softmax(self.logits_table.weight.double(), dim=-1)
        return (-(counts * log_probs).sum() / counts.sum()).item()

    def fit(
        self,
        train_ids: torch.Tensor,
        val_ids: torch.Tensor,
        steps: int = 500,
        batch_size: int = 256,
        lr: float = 0.1,
        generator: torch.Generator | None = None,
        progress: bool = True,
        block_size: int = 32,
        optimizer: str = "adamw",
    ) -> dict[str, float]:
        """Train on random windows of `train_ids`; return final train and val loss (nats).

        The loss surface of a single softmax table is convex, so a large learning rate is
        safe and a few hundred steps reach the counting model's loss.
        """
        opt = self._make_optimizer(optimizer, lr)
        device = self.logits_table.weight.device
        bar = tqdm(range(steps), desc="neural bigram", disable=not progress)
        for step in bar:
            x, y = get_batch(train_ids, batch_size, block_size, generator=generator, device=device)
            _, loss = self(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # .item() forces a sync on accelerators, so only refresh the bar now and then.
            if step % 25 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        return {"train_loss": self.evaluate(train_ids), "val_loss": self.evaluate(val_ids)}

    def _make_optimizer(self, name: str, lr: float) -> torch.optim.Optimizer:
        if name == "adamw":
            # No weight decay: it would pull the logits towards uniform and away from
            # the count-based optimum this model is meant to reach.
            return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
        if name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=lr)
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Extend idx [B, T] by `n` sampled tokens; returns [B, T + n]."""
        for _ in range(n):
            # Only the last token matters to a bigram model.
            logits, _ = self(idx[:, -1])
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def run_bigrams(
    text_path: str | os.PathLike[str] | None = None,
    steps: int = 500,
    batch_size: int = 256,
    lr: float = 0.1,
    smoothing: float = 1.0,
    sample_len: int = 200,
    seed: int = 1337,
    progress: bool = True,
    block_size: int = 32,
) -> dict[str, Any]:
    """Fit both bigram models on a char-level text and report their losses and samples.

    Defaults to tiny Shakespeare in the data folder. Returns
    {"vocab_size", "uniform_loss", "counting": {...}, "neural": {...}}, where each model
    entry has "train_loss", "val_loss" (nats per character) and "sample" (text).
    """
    _check_options(lr, steps=steps, sample_len=sample_len, smoothing=smoothing, batch_size=batch_size,
                   block_size=block_size)
    if text_path is None:
        text_path = default_data_dir() / "tinyshakespeare.txt"
    text = load_text(text_path)
    tokenizer = CharTokenizer.from_text(text)
    train_text, val_text = split_text(text)
    # Training windows need block_size + 1 characters, a validation loss one bigram.
    if len(train_text) <= block_size or len(val_text) < 2:
        raise ValueError(f"{text_path} is too short for the bigram models: {len(text)} characters, split "
                         f"{len(train_text)} for training (at least {block_size + 1}) and {len(val_text)} for "
                         f"validation (at least 2)")
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    # Start samples at a line break when there is one, i.e. at the start of a line.
    start = tokenizer.encode("\n")[0] if "\n" in tokenizer.chars else 0

    counting = CountingBigram().fit(train_ids, tokenizer.vocab_size, smoothing)
    counting_sample = counting.sample(sample_len, start, torch.Generator().manual_seed(seed))

    gen = torch.Generator().manual_seed(seed)
    neural = NeuralBigram(tokenizer.vocab_size)
    neural_losses = neural.fit(
        train_ids, val_ids, steps=steps, batch_size=batch_size, lr=lr,
        generator=gen, progress=progress, block_size=block_size,
    )
    neural_sample = neural.generate(torch.tensor([[start]]), sample_len, gen)[0].tolist()

    return {
        "vocab_size": tokenizer.vocab_size,
        "uniform_loss": math.log(tokenizer.vocab_size),
        "counting": {
            "train_loss": counting.loss(train_ids),
            "val_loss": counting.loss(val_ids),
            "sample": tokenizer.decode(counting_sample),
        },
        "neural": {**neural_losses, "sample": tokenizer.decode(neural_sample)},
    }


def _check_options(lr: float, **counts: float) -> None:
    """run_bigrams' options by name, before the text is read: lr > 0, sizes >= 1, the rest >= 0, all finite."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    for name, value in counts.items():
        least = 1 if name.endswith("size") else 0
        if not (math.isfinite(value) and value >= least):
            raise ValueError(f"{name} must be a finite number >= {least}, got {value}")
