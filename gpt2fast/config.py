"""GPT-2 hyper-parameters as a dataclass, with the four OpenAI presets and a small char-level one."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024  # the context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd, as in every OpenAI checkpoint
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # embedding and residual dropout, used only in training
    eos_token_id: int | None = 50256

    def __post_init__(self) -> None:
        # Values often come from a config.json, so a string or a bool must be refused here, not fail in torch later.
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if _not_integer(getattr(self, name)):
                raise ValueError(f"GPT2Config.{name} must be an integer, got {getattr(self, name)!r}")
            if getattr(self, name) < 1:
                raise ValueError(f"GPT2Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and (_not_integer(self.n_inner) or self.n_inner < 1):
            raise ValueError(f"GPT2Config.n_inner must be an integer >= 1 or None, got {self.n_inner!r}")
        if _not_real(self.layer_norm_epsilon) or not 0.0 < self.layer_norm_epsilon < math.inf:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a number > 0, got {self.layer_norm_epsilon!r}")
        if _not_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_params(self, include_embeddings: bool = True) -> int:
        c, f = self.n_embd, self.mlp_width
        per_layer = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
        n = self.n_layer * per_layer + 2 * c
        if include_embeddings:
            n += self.vocab_size * c + self.n_positions * c
        return n


def _not_integer(value) -> bool:
    return not isinstance(value, numbers.Integral) or isinstance(value, bool)  # True is an int to Python


def _not_real(value) -> bool:
    return not isinstance(value, numbers.Real) or isinstance(value, bool)


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    # The course's small char-level attention model; vocab_size is set from the text it trains on.
    "char": GPT2Config(vocab_size=65, n_positions=128, n_embd=128, n_layer=4, n_head=4, eos_token_id=None),
}
