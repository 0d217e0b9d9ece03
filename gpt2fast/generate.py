"""Autoregressive generation with a KV cache: greedy or sampled, seeded, streamed, batched.

Prompts of different lengths are packed to the left (right padding) with a length per row, so the
causal prefill never lets a real token see padding and each sequence appends at its own length:
no attention is spent on padding and no mask is needed beyond each row's length.
"""
from __future__ import annotations

from typing import Iterator

import torch

from . import ops
from .model import GPT2


def pack_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T'], lengths [B]) with each row's attended tokens first, in order, whatever the padding side."""
    if attention_mask is None:
        return input_ids, torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                         f"input_ids {tuple(input_ids.shape)}")
    keep = attention_mask.to(device=input_ids.device) != 0
    lengths = keep.sum(dim=1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has no tokens to attend to")
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # attended tokens first, order kept
    packed = input_ids.gather(1, order)[:, : int(lengths.max())]
    return packed, lengths


@torch.inference_mode()
def stream(model: GPT2, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = True,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, attention_mask: torch.Tensor | None = None,
           eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, [B], one step at a time.

    A sequence that has produced eos_token_id keeps producing it; the stream ends when all have, or
    after max_new_tokens. Greedy when do_sample is False or temperature is 0.
    """
    if not do_sample:
        temperature = 0.0
    ops.check_sampling_params(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    model.check_input_ids(input_ids)
    ids, lengths = pack_prompts(input_ids, attention_mask)
    total = ids.shape[1] + max_new_tokens
    if total > model.config.n_positions:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} is longer "
                         f"than the context, n_positions = {model.config.n_positions}")
    if max_new_tokens == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout while generating, even from a model in the middle of training
    try:
        # The last step's token is never fed back, so the cache needs one position less than `total`.
        cache = model.new_cache(ids.shape[0], capacity=total - 1)
        logits = model._forward(ids, cache, input_lengths=lengths, last_only=True)[:, -1]
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            next_ids = ops.sample(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_ids = next_ids.masked_fill(finished, eos_token_id)
                finished |= next_ids == eos_token_id
            yield next_ids
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                return
            logits = model._forward(next_ids[:, None], cache, last_only=True)[:, -1]
    finally:
        model.train(was_training)


def generate(model: GPT2, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """input_ids [B, T] followed by the generated tokens: [B, T + new], new <= max_new_tokens (eos stops early).

    Takes the keyword arguments of `stream`. With padded prompts the new tokens of every row start at
    column T, whichever side the padding is on, as in transformers.
    """
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1) if new else input_ids.clone()
