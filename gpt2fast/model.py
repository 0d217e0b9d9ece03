"""GPT-2 in one file: embeddings, pre-LN blocks, causal self-attention, GELU MLP, tied LM head.

Every hot path goes through `gpt2fast.ops`, which picks the backend; the model never branches on one.
The residual add is fused into the LayerNorm that follows it (llm.c's layout): each LayerNorm takes
the sub-layer output not yet added to the residual stream and returns (normed, new stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import GPT2Config
from .ops import linear


@dataclass
class KVCache:
    """Preallocated keys and values [n_layer, B, H, capacity, D] and the valid length of each sequence.

    A static cache hands every layer its whole capacity, so that the shapes of a decode step never
    change (what a CUDA graph or torch.compile needs); otherwise each layer gets the positions any
    sequence can have used so far, a host-side bound that needs no device sync.
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor  # [B] int64
    filled: int = 0  # host-side upper bound of lengths, so capacity checks need no device sync
    static: bool = False
    # Set for the forward in flight: the lengths after it (the new tokens included), and the bound above.
    step_lengths: torch.Tensor | None = field(default=None, init=False)
    _bound: int = field(default=0, init=False, repr=False)

    @classmethod
    def allocate(cls, config: GPT2Config, batch: int, capacity: int, dtype, device, static: bool = False) -> "KVCache":
        if capacity > config.n_positions:
            raise ValueError(f"KV cache capacity {capacity} exceeds n_positions = {config.n_positions}")
        shape = (config.n_layer, batch, config.n_head, capacity, config.head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device), static=static)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def start_step(self, n_new: int) -> None:
        """Computed once per forward that appends n_new tokens to every sequence, used by every layer."""
        self.step_lengths = self.lengths + n_new
        if not self.static:
            self._bound = self.filled + n_new

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values [B, H, S, D]: the whole capacity if static, else cut to the bound."""
        if self.static:
            return self.k[i], self.v[i]
        return self.k[i, :, :, :self._bound], self.v[i, :, :, :self._bound]


class Linear(nn.Module):
    """y = x @ weight + bias with weight stored [in, out]: the layout of HF's Conv1D, so checkpoints load
    untransposed, and the orientation CPU BLAS streams fastest when only a few rows come (decoding)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, prefill: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = ops.causal_attention(q, k, v)
        elif prefill:  # the prompt attends to itself; its keys and values seed the cache
            cache.k[self.layer, :, :, :T] = k
            cache.v[self.layer, :, :, :T] = v
            y = ops.causal_attention(q, k, v)
        else:  # the new tokens' keys and values are appended by the attention op itself
            k_cache, v_cache = cache.layer(self.layer)
            # The model keeps the lengths within [T, capacity] (its host-side checks): no device check needed.
            y = ops.decode_attention(q, k_cache, v_cache, cache.step_lengths, k, v, lengths_checked=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_width)
        self.c_proj = Linear(config.mlp_width, config.n_embd)

    def forward(self, x):
        return ops.gelu_mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, y, h, cache=None, prefill=False):
        """y: the previous sub-layer's output, still to be added to the residual stream h (None at the start)."""
        if h is None:
            a, h = self.ln_1(y), y
        else:
            a, h = self.ln_1(y, residual=h)
        a, h = self.ln_2(self.drop(self.attn(a, cache, prefill)), residual=h)
        return self.drop(self.mlp(a)), h


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self._drop_head_copy()  # see lm_head
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
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

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
        if torch.compiler.is_compiling() or not input_ids.numel():
            return  # the range check reads the values: eager only (compiled, the embedding still bounds-checks)
        if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                input_lengths: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for input_ids [B, T]; with targets, the loss instead.

        With a cache, the tokens are appended to each sequence at its current length; input_lengths [B]
        says how many of the T tokens are real in each row (right padding; default all T), and
        last_only returns the logits of each row's last real token. With targets [B, T] it returns
        `loss(input_ids, targets)`, the fused LM head + cross-entropy (so that a wrapper such as DDP, which
        only sees forward, trains through it).
        """
        if targets is not None:
            if cache is not None or input_lengths is not None or last_only:
                raise ValueError("targets (training) take no cache, input_lengths or last_only")
            return self.loss(input_ids, targets)
        self.check_input_ids(input_ids)
        return self._forward(input_ids, cache, input_lengths, last_only)

    def _forward(self, input_ids, cache=None, input_lengths=None, last_only=False):
        B, T = input_ids.shape
        start = 0 if cache is None else cache.filled
        if start + T > self.config.n_positions:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context, "
                             f"n_positions = {self.config.n_positions}")
        if cache is not None and start + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, {start + T} needed")
        positions = torch.arange(T, device=input_ids.device)[None, :]
        prefill = cache is not None and cache.filled == 0
        if cache is not None:
            positions = positions + cache.lengths[:, None]
            cache.start_step(T)
        x = self._blocks(input_ids, positions, cache, prefill, input_lengths if last_only else None, last_only)
        if cache is not None:
            cache.lengths += T if input_lengths is None else input_lengths
            cache.filled += T
        return self.lm_head(x)

    def _blocks(self, input_ids, positions, cache, prefill, input_lengths, last_only):
        """Embeddings, every block and the final LayerNorm: [B, T, C], or [B, 1, C] with last_only (each
        row's last real token, by input_lengths when given)."""
        y = self.drop(self.wte(input_ids) + self.wpe(positions))
        h = None
        for block in self.h:
            y, h = block(y, h, cache, prefill)
        if input_lengths is not None:
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            y, h = y[rows, input_lengths - 1][:, None], h[rows, input_lengths - 1][:, None]
        elif last_only:
            y, h = y[:, -1:], h[:, -1:]
        return self.ln_f(y, residual=h)[0]

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of the logits of input_ids [B, T] against targets [B, T] (ignore_index skipped).

        The LM head and the loss run together in ops.linear_cross_entropy, a chunk of rows at a time, so
        the [B*T, V] logits (and their gradient) are never all held at once: at GPT-2's vocabulary they
        would outweigh every other activation of a training step.
        """
        self.check_input_ids(input_ids)
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence of {T} tokens is longer than the context, n_positions = {self.config.n_positions}")
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets have shape {tuple(targets.shape)}, input_ids {tuple(input_ids.shape)}")
        positions = torch.arange(T, device=input_ids.device)[None, :]
        x = self._blocks(input_ids, positions, None, False, None, False)
        return ops.linear_cross_entropy(x, self.wte.weight, targets, ignore_index)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] after appending one token per sequence, tokens [B], to a static cache.

        Fixed shapes, device-side lengths, and no host-side state read or written: this is the step a CUDA
        graph captures and torch.compile compiles. The caller keeps the count of positions (cache.filled)
        and makes sure a position is left; see `gpt2fast.generate.Decoder`.
        """
        if not cache.static:
            raise ValueError("decode_step needs a static KV cache (model.new_cache(..., static=True))")
        cache.start_step(1)
        x = self._blocks(tokens[:, None], cache.lengths[:, None], cache, False, None, True)
        cache.lengths += 1
        return self.lm_head(x)[:, 0]

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: x @ wte^T, the head tied to the token embedding.

        On a CPU, x @ W with W [in, out] streams twice as fast as x @ W^T for a few rows (25 against 13
        GB/s measured at [1, 768] x [768, 50257]), so eager inference there keeps a transposed copy of
        wte, remade whenever wte changes. Training, compiled code and other devices use wte itself.

        A change is seen by wte's address and version counter, and the copy is dropped whenever the model
        switches between train and eval mode or is moved or cast: fused AdamW on the CPU updates weights
        without bumping their version counter, and a cast may put new weights at a freed address.
        """
        w = self.wte.weight
        if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.linear(x, w)
        key = (w.data_ptr(), w._version, w.dtype)
        if self._head_key != key:
            self._head_t, self._head_key = w.detach().t().contiguous(), key
        return linear(x, self._head_t)

    def _drop_head_copy(self) -> None:
        self._head_t, self._head_key = None, None

    def train(self, mode: bool = True) -> "GPT2":
        if mode != self.training:
            self._drop_head_copy()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._drop_head_copy()
        return super()._apply(fn, recurse)

    def new_cache(self, batch: int, capacity: int | None = None, static: bool = False) -> KVCache:
        return KVCache.allocate(self.config, batch, capacity or self.config.n_positions, self.dtype, self.device,
                                static)

    # Loading, saving and generation live in their own modules; these are the entry points users expect.
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, device=None) -> "GPT2":
        from .checkpoint import from_pretrained
        return from_pretrained(name_or_path, dtype=dtype, device=device)

    @classmethod
    def from_hf(cls, hf_model) -> "GPT2":
        from .checkpoint import from_hf
        return from_hf(hf_model)

    def save_pretrained(self, path) -> None:
        from .checkpoint import save_pretrained
        save_pretrained(self, path)

    def generate(self, input_ids, max_new_tokens, **kwargs) -> torch.Tensor:
        from .generate import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids, max_new_tokens, **kwargs):
        from .generate import stream
        return stream(self, input_ids, max_new_tokens, **kwargs)
