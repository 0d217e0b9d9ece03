"""GPT-2 in one file: embeddings, pre-LN blocks, causal self-attention, GELU MLP, tied LM head.

Every hot path goes through `gpt2fast.ops`, which picks the backend; the model never branches on a backend
or a device.
The residual add is fused into the LayerNorm that follows it (llm.c's layout): each LayerNorm takes
the sub-layer output not yet added to the residual stream and returns (normed, new stream).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import GPT2Config
from .quantize import QuantizedEmbedding, QuantizedLinear, check_scheme


@dataclass
class KVCache:
    """Preallocated keys and values [n_layer, B, H, capacity, D] and the valid length of each sequence.

    Every layer sees the whole capacity, so the shapes of a decode step never change (what a CUDA graph or
    torch.compile needs); the attention op reads each sequence only up to its length.
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor  # [B] int64, on the cache's device

    @classmethod
    def allocate(cls, config: GPT2Config, batch: int, capacity: int, dtype, device) -> "KVCache":
        if capacity > config.n_positions:
            raise ValueError(f"KV cache capacity {capacity} exceeds n_positions = {config.n_positions}")
        shape = (config.n_layer, batch, config.n_head, capacity, config.head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


class Linear(nn.Module):
    """y = x @ weight + bias with weight stored [in, out]: the layout of HF's Conv1D, so checkpoints load
    untransposed, and the orientation CPU BLAS streams fastest when only a few rows come (decoding)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x, residual=None):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        self.n_head, self.layer = config.n_head, layer
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                new_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """With a cache and no new_lengths, x is a prompt filling the cache from position 0; with new_lengths
        [B], x holds tokens appended to each sequence, whose lengths become new_lengths."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = ops.causal_attention(q, k, v)
        elif new_lengths is None:  # the prompt attends to itself; its keys and values seed the cache
            cache.k[self.layer, :, :, :T] = k
            cache.v[self.layer, :, :, :T] = v
            y = ops.causal_attention(q, k, v)
        else:  # the new tokens' keys and values are appended by the attention op itself
            # The model keeps the lengths within [T, capacity]: no device check needed.
            y = ops.decode_attention(q, cache.k[self.layer], cache.v[self.layer], new_lengths, k, v,
                                     lengths_checked=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_width)
        self.c_proj = Linear(config.mlp_width, config.n_embd)

    def forward(self, x):
        fc, proj = self.c_fc, self.c_proj
        if isinstance(fc, QuantizedLinear):  # weight-only quantized: each matmul reads the stored weights
            return proj(ops.bias_gelu(fc(x, with_bias=False), fc.bias))
        return ops.gelu_mlp(x, fc.weight, fc.bias, proj.weight, proj.bias)


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, y, h, cache=None, new_lengths=None):
        """y: the previous sub-layer's output, still to be added to the residual stream h (None at the start)."""
        if h is None:
            a, h = self.ln_1(y), y
        else:
            a, h = self.ln_1(y, residual=h)
        a, h = self.ln_2(self.drop(self.attn(a, cache, new_lengths)), residual=h)
        return self.drop(self.mlp(a)), h


class Transformer(nn.Module):
    """GPT-2's network: token ids in, logits out, with or without a KV cache. `gpt2fast.GPT2` adds loading,
    saving and generation to it."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), the residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.startswith("ln_f") or ".ln_" in name:
                nn.init.ones_(p)
            else:
                std = 0.02 / (2 * self.config.n_layer) ** 0.5 if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    @property
    def device(self) -> torch.device:
        return self.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the weights' too, unless quantized)."""
        return self.ln_f.weight.dtype

    @property
    def quantization(self) -> str | None:
        """How the weights are stored: None (in `dtype`), or a scheme of gpt2fast.quantize ("int8", "bf16")."""
        if not isinstance(self.wte, QuantizedEmbedding):
            return None
        return "bf16" if self.wte.weight.dtype == torch.bfloat16 else "int8"

    def quantize(self, scheme: str) -> "Transformer":
        """Store every matmul's weights, the LM head's included, in `scheme` ("int8": per output channel, with
        fp32 scales; "bf16"), for inference; activations stay fp32. In place; returns the model."""
        check_scheme(scheme)
        if self.quantization is not None:
            raise ValueError(f"the model's weights are already quantized ({self.quantization})")
        if self.dtype != torch.float32:
            raise ValueError(f"quantize takes a float32 model (activations stay fp32), got {self.dtype}")
        for block in self.h:
            for owner, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                (block.mlp, "c_proj")):
                setattr(owner, name, QuantizedLinear.from_linear(getattr(owner, name), scheme))
        self.wte = QuantizedEmbedding.from_embedding(self.wte, scheme)
        return self.eval()

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .half() and the like: a quantized model moves between devices, but its formats stay
        (a cast would turn bf16 weights or fp32 scales into something the kernels do not read)."""
        if self.quantization is not None and fn(torch.empty(0, device=self.device)).dtype != torch.float32:
            raise ValueError(f"a model with {self.quantization} weights keeps its dtypes (activations fp32); "
                             f"cast the model before quantizing it")
        return super()._apply(fn, recurse)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor [B, T] of token ids, got {type(input_ids).__name__} "
                            f"(a list of ids: torch.tensor([ids]))")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {self.device}")
        ops.check_token_ids(input_ids, self.config.vocab_size)

    def _check_fits(self, n: int, cache: KVCache | None = None) -> None:
        """Refuse a forward that would need n positions, more than the context or the cache holds."""
        if n > self.config.n_positions:
            raise ValueError(f"sequence of {n} tokens is longer than the context, "
                             f"n_positions = {self.config.n_positions}")
        if cache is not None and n > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, {n} needed")

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                input_lengths: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for input_ids [B, T]; with targets, the loss instead.

        With a cache, an empty one is filled with the tokens (a prefill), and a filled one has them appended
        to each sequence at its current length. To tell which and to check the cache's capacity, this reads
        the lengths on the host: off the CPU, one wait for the device. Generation calls `prefill` and
        `decode_step`, which never do. input_lengths [B] says how many of the T tokens are real in each row
        (right padding; default all T), and last_only returns the logits of each row's last real token.
        With targets [B, T] it returns `loss(input_ids, targets)`, the fused LM head + cross-entropy (so that
        a wrapper such as DDP, which only sees forward, trains through it).
        """
        if targets is not None:
            if cache is not None or input_lengths is not None or last_only:
                raise ValueError("targets (training) take no cache, input_lengths or last_only")
            return self.loss(input_ids, targets)
        self.check_input_ids(input_ids)
        T = input_ids.shape[1]
        last = self._last_positions(input_ids, input_lengths) if last_only else None
        if cache is None:
            self._check_fits(T)
            positions = torch.arange(T, device=input_ids.device)[None, :]
            return self.lm_head(self._blocks(input_ids, positions, last=last))
        start = int(cache.lengths.max())
        self._check_fits(start + T, cache)
        if start == 0:
            return self._prefill(input_ids, cache, input_lengths, last)
        new_lengths = cache.lengths + T
        positions = cache.lengths[:, None] + torch.arange(T, device=input_ids.device)
        x = self._blocks(input_ids, positions, cache=cache, new_lengths=new_lengths, last=last)
        cache.lengths += T if input_lengths is None else input_lengths
        return self.lm_head(x)

    def prefill(self, input_ids: torch.Tensor, cache: KVCache, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] of each row's last real token, the cache started afresh with input_ids [B, T].

        lengths [B] says how many of the T tokens are real in each row (right padding; default all T). The
        ids are taken as checked (`check_input_ids` reads their values, a wait for the device), and nothing
        is read on the host.
        """
        self._check_fits(input_ids.shape[1], cache)
        return self._prefill(input_ids, cache, lengths, self._last_positions(input_ids, lengths))[:, 0]

    @staticmethod
    def _last_positions(input_ids, lengths):
        """The position of each row's last real token: [B]."""
        B, T = input_ids.shape
        return (torch.full((B,), T, device=input_ids.device) if lengths is None else lengths) - 1

    def _prefill(self, input_ids, cache, lengths, last):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        x = self._blocks(input_ids, positions, cache=cache, last=last)
        if lengths is None:
            cache.lengths.fill_(input_ids.shape[1])
        else:
            cache.lengths.copy_(lengths)
        return self.lm_head(x)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] after appending one token per sequence, tokens [B], to the cache.

        Fixed shapes, device-side lengths, and no host-side state read or written: this is the step a CUDA
        graph captures and torch.compile compiles. The caller makes sure a position is left in the cache;
        see `gpt2fast.generate.Decoder`.
        """
        new_lengths = cache.lengths + 1
        x = self._blocks(tokens[:, None], cache.lengths[:, None], cache=cache, new_lengths=new_lengths)
        cache.lengths.copy_(new_lengths)
        return self.lm_head(x)[:, 0]

    def _blocks(self, input_ids, positions, *, cache=None, new_lengths=None, last=None):
        """Embeddings, every block and the final LayerNorm: [B, T, C], or [B, 1, C] with last [B], the
        position of the one token of each row that goes on (the LM head then runs on those only)."""
        y = self.drop(self.wte(input_ids) + self.wpe(positions))
        h = None
        for block in self.h:
            y, h = block(y, h, cache, new_lengths)
        if last is not None:
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            y, h = y[rows, last][:, None], h[rows, last][:, None]
        return self.ln_f(y, residual=h)[0]

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: x @ wte^T, the head tied to the token embedding."""
        if isinstance(self.wte, QuantizedEmbedding):
            return self.wte.head(x)
        return ops.lm_head(x, self.wte.weight)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of the logits of input_ids [B, T] against targets [B, T] (ignore_index skipped).

        The LM head and the loss run together in ops.linear_cross_entropy, a chunk of rows at a time, so
        the [B*T, V] logits (and their gradient) are never all held at once: at GPT-2's vocabulary they
        would outweigh every other activation of a training step.
        """
        self.check_input_ids(input_ids)
        T = input_ids.shape[1]
        self._check_fits(T)
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets have shape {tuple(targets.shape)}, input_ids {tuple(input_ids.shape)}")
        x = self._blocks(input_ids, torch.arange(T, device=input_ids.device)[None, :])
        if self.quantization is not None:  # evaluation (quantized weights are for inference): all the logits at once
            return F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return ops.linear_cross_entropy(x, self.wte.weight, targets, ignore_index)

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        return KVCache.allocate(self.config, batch, capacity or self.config.n_positions, self.dtype, self.device)
