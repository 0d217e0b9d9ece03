"""`gpt2fast.GPT2`: the network of model.py with the entry points users expect, loading, saving and generation.

They live up here, above the model, because they use modules (checkpoint.py, generate.py) that themselves
build on the model.
"""
from __future__ import annotations

import torch

from . import checkpoint
from . import generate as generation
from .model import Transformer


class GPT2(Transformer):
    @classmethod
    def from_pretrained(cls, name_or_path, dtype: torch.dtype | None = None, device=None,
                        weights: str | None = None) -> "GPT2":
        """A Hugging Face GPT-2 checkpoint: a local folder or a hub name (see `gpt2fast.checkpoint`). weights="int8"
        or "bf16" stores the weights so, for inference (see `gpt2fast.quantize`); None keeps the checkpoint's."""
        return checkpoint.from_pretrained(name_or_path, cls=cls, dtype=dtype, device=device, weights=weights)

    @classmethod
    def from_hf(cls, hf_model) -> "GPT2":
        """A copy of a live transformers GPT2LMHeadModel (or GPT2Model), on its device and in its dtype."""
        return checkpoint.from_hf(hf_model, cls=cls)

    def save_pretrained(self, path) -> None:
        """config.json and model.safetensors: a folder transformers.GPT2LMHeadModel.from_pretrained loads, unless
        the weights are quantized (then gpt2fast alone reads it; transformers refuses its quantization_config)."""
        checkpoint.save_pretrained(self, path)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """input_ids [B, T] followed by the new tokens; see `gpt2fast.generate.stream` for the arguments."""
        return generation.generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs):
        """The new tokens of every sequence, [B] per step; see `gpt2fast.generate.stream`."""
        return generation.stream(self, input_ids, max_new_tokens, **kwargs)
