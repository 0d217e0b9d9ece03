"""Weight-only quantization for inference: the weights stored in int8 or bf16, activations and sums in fp32.

- "int8": each output channel (a row of the weight, [out, in]) scaled symmetrically to [-127, 127], with
  one fp32 scale per channel: w ~ q * scale[:, None]. A quarter of fp32's bytes to read per decode step.
- "bf16": the weights rounded to bfloat16 (half the bytes), no scale.

Every matmul of the model, the LM head included, reads the stored weights through
`gpt2fast.ops.quantized_linear`; LayerNorms, biases and the position table stay fp32. The token table is the
LM head's weight (tied), so the embedding looks its rows up in the same format.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops

SCHEMES = ("int8", "bf16")
INT8_MAX = 127


def check_scheme(scheme) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"weights must be one of {SCHEMES} (or None for fp32), got {scheme!r}")
    return scheme


def quantize_weight(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored weight, scale or None) for an fp32 weight [out, in]: int8 per output channel, or bf16."""
    if check_scheme(scheme) == "bf16":
        return weight.to(torch.bfloat16), None
    amax = weight.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, 1.0)  # an all-zero row: any scale, its weights are 0
    q = torch.round(weight / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.float()


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 weights from stored ones: the values every kernel must compute with."""
    return weight.float() if scale is None else weight.float() * scale[:, None]


class QuantizedLinear(nn.Module):
    """y = x @ (weight * scale[:, None]).T + bias: weight [out, in] int8 with scale [out], or bf16."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: str) -> "QuantizedLinear":
        """From a model.Linear, whose weight is [in, out] (HF's Conv1D layout)."""
        weight, scale = quantize_weight(linear.weight.detach().float().T, scheme)
        return cls(weight.contiguous(), scale, linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        return ops.quantized_linear(x, self.weight, self.scale, self.bias if with_bias else None)


class QuantizedEmbedding(nn.Module):
    """The token table [V, C], stored as the LM head's weight: rows looked up and dequantized by the
    embedding, and the logits x @ table.T by quantized_linear."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: str) -> "QuantizedEmbedding":
        return cls(*quantize_weight(embedding.weight.detach().float(), scheme))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids].float()
        return rows if self.scale is None else rows * self.scale[ids, None]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quantized_linear(x, self.weight, self.scale)
