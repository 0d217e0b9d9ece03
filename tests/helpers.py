"""Builders shared by the model, checkpoint and generation tests: small random HF GPT-2 models."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from gpt2fast import GPT2


def hf_config(vocab_size=101, n_positions=64, n_embd=60, n_layer=2, n_head=5, **kwargs) -> transformers.GPT2Config:
    """An HF GPT-2 config whose special tokens lie inside the (often small) vocabulary.

    Weights are drawn 10x wider than HF's default (std 0.2, not 0.02): with the default the MLP and
    LayerNorm inputs stay so small that, for example, the erf and tanh GELUs agree within 1e-5 of the
    logits, and a comparison with HF could not tell them apart.
    """
    kwargs.setdefault("initializer_range", 0.2)
    kwargs.setdefault("eos_token_id", vocab_size - 1)
    kwargs.setdefault("bos_token_id", vocab_size - 1)
    return transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                                   n_layer=n_layer, n_head=n_head, **kwargs)


def build_hf(seed: int = 0, **config) -> transformers.GPT2LMHeadModel:
    """A randomly initialised HF GPT2LMHeadModel in eval mode (dropout off), seeded."""
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(hf_config(**config)).eval()


def build_pair(seed: int = 0, **config) -> tuple[transformers.GPT2LMHeadModel, GPT2]:
    hf = build_hf(seed, **config)
    return hf, GPT2.from_hf(hf)


def random_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf: transformers.GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids).logits


def hf_greedy(hf: transformers.GPT2LMHeadModel, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """HF's greedy continuation of unpadded prompts, never stopping early at an eos token."""
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                      pad_token_id=0, eos_token_id=None)
    assert out.shape == (ids.shape[0], ids.shape[1] + max_new_tokens)
    return out


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs difference within `rel` times the largest logit magnitude."""
    assert got.shape == expected.shape
    err = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * max |logit| {scale:.3g}"


def write_config(folder: Path, hf: transformers.GPT2LMHeadModel, **changes) -> None:
    """config.json of `hf` in `folder`, with some fields changed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict() | changes, indent=2))
