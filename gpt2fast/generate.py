"""Autoregressive generation with a KV cache: greedy or sampled, seeded, streamed, batched.

Prompts of different lengths are packed to the left (right padding) with a length per row, so the
causal prefill never lets a real token see padding and each sequence appends at its own length:
no attention is spent on padding and no mask is needed beyond each row's length.

Threads: a model serves any number of generations at once, interleaved in one thread or run from
several: each live generation holds a decoder (KV cache and buffers) of its own, and the model keeps
the newest one for the next generation with the same settings. The weights must not change (training
steps, `model.to(...)`) while a generation runs.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from typing import Iterator

import numpy as np
import torch

from . import ops
from .model import Transformer


def pack_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T'], lengths [B]) with each row's attended tokens first, in order, whatever the padding side."""
    if attention_mask is None:
        return input_ids, torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor shaped as input_ids, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                         f"input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.to(device=input_ids.device)
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)  # NaN too
        if bool(bad.any()):
            row, col = bad.nonzero()[0].tolist()
            raise ValueError(f"attention_mask must hold only 0 and 1, got {mask[row, col].item()!r} "
                             f"at row {row}, column {col}")
    keep = mask != 0
    lengths = keep.sum(dim=1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has no tokens to attend to")
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # attended tokens first, order kept
    packed = input_ids.gather(1, order)[:, : int(lengths.max())]
    return packed, lengths


# How many decode steps may run ahead of the host's eos check on CUDA: the host waits on the flags of the
# step `LOOKAHEAD` back, by which time that step has long finished, so the GPU never waits for the host.
LOOKAHEAD = 3
DECODE_MODES = ("auto", "graph", "compile", "eager")


class Decoder:
    """Decodes a batch one token per step over static buffers.

    The buffers: a KV cache, each sequence's last token, and the eos flags. One step (the model's
    `decode_step`: embed the last tokens, every layer with its KV append, the final LayerNorm, the LM head on
    the new position; then sampling and the eos bookkeeping) reads and writes only them and never waits for
    the host, so that on CUDA it is captured once in a CUDA graph and then replayed per token ("graph");
    "compile" runs the model's step through torch.compile (and captures that in a graph on CUDA); "eager"
    calls it as it is. The host keeps its own count of the positions used, for the check that one is left.

    A decoder serves any number of generations with the same batch size, capacity and sampling settings:
    `start` prefills a new batch of prompts into the same buffers, so the graph is captured once.
    """

    def __init__(self, model: Transformer, batch: int, capacity: int, *, temperature: float, top_k: int | None,
                 top_p: float | None, eos_token_id: int | None, seeded: bool, mode: str):
        device = model.device
        self.mode = _resolved_mode(mode, device)
        # A weak reference: the model keeps its decoder (see decoder_for), and the decoder must not keep the model.
        self._model = weakref.ref(model)
        self.temperature, self.top_k, self.top_p, self.eos = temperature, top_k, top_p, eos_token_id
        self.cache = model.new_cache(batch, capacity)
        self.used = 0  # positions of the cache the longest sequence may have filled
        self.last = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.all_finished = torch.zeros((), dtype=torch.bool, device=device)
        # A seeded decoder draws from its own generator, re-seeded by each `start`; else from torch's.
        self.generator = torch.Generator(device=device) if seeded else None
        # Only the model's step is compiled; sampling stays a call to our kernels (torch.compile takes no
        # generator, and its own top-p fails inside inductor at batch > 1).
        decode_step = type(model).decode_step
        self._decode_step = torch.compile(decode_step, fullgraph=True) if self.mode == "compile" else decode_step
        self.key: tuple = ()  # set by decoder_for
        self.busy = False  # a live generation holds it (see `_held_decoder`): no other may use it
        self._graph = None
        self._warm = False  # a step has run eagerly: kernels compiled, as capture needs (CUDA graph modes)
        # Steps the host's eos check may lag behind (see `tokens`); on the CPU every step runs before the
        # host goes on anyway.
        self.lookahead = LOOKAHEAD if device.type == "cuda" else 0
        if device.type == "cuda":
            self._capture_stream = torch.cuda.Stream(device)
            # One slot per step in flight (see `tokens`).
            self._host_flags = torch.empty(self.lookahead + 1, dtype=torch.bool, pin_memory=True)
            self._events = [torch.cuda.Event() for _ in range(self.lookahead + 1)]

    @property
    def model(self) -> Transformer:
        return self._model()

    def start(self, ids: torch.Tensor, lengths: torch.Tensor, seed: int | None = None) -> None:
        """Prefill packed prompts (ids [B, T], lengths [B]) and choose each sequence's first new token."""
        self.finished.zero_()
        if self.generator is not None:
            self.generator.manual_seed(seed)
        self._choose(self.model.prefill(ids, self.cache, lengths))
        self.used = ids.shape[1]

    def step(self) -> None:
        """The next token of every sequence, into `last`."""
        if self.used >= self.cache.capacity:
            raise ValueError(f"the decoder's KV cache is full ({self.cache.capacity} positions)")
        if self._graph is not None:
            self._graph.replay()
        elif self.mode in ("graph", "compile") and self.model.device.type == "cuda":
            if self._warm:
                self._capture()
                self._graph.replay()
            else:  # warm-up, a real step, on the stream capture will use (cuBLAS sets up per stream)
                self._capture_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._capture_stream):
                    self._step()
                torch.cuda.current_stream().wait_stream(self._capture_stream)
                self._warm = True
        else:
            self._step()
        self.used += 1

    def _step(self) -> None:
        self._choose(self._decode_step(self.model, self.last, self.cache))

    def _choose(self, logits: torch.Tensor) -> None:
        ids = ops.sample(logits, self.temperature, self.top_k, self.top_p, self.generator)
        if self.eos is not None:
            ids = ids.masked_fill(self.finished, self.eos)
            self.finished |= ids == self.eos
            self.all_finished.copy_(self.finished.all())
        self.last.copy_(ids)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:  # torch's default generator is registered with every graph already
            graph.register_generator_state(self.generator)
        # One capture at a time; thread_local: another thread's generation (its event waits) may go on meanwhile.
        with _CAPTURE_LOCK, torch.cuda.graph(graph, stream=self._capture_stream, capture_error_mode="thread_local"):
            self._step()  # records one step's kernels; none runs now
        self._graph = graph

    def tokens(self, n: int) -> Iterator[torch.Tensor]:
        """Run up to n steps (the first token is `start`'s); yield each step's tokens [B], a fresh tensor each.

        With eos, the stream ends after the step where every sequence has finished. On CUDA the host learns
        that a few steps late (LOOKAHEAD), from flags copied without blocking, and yields with that lag, so
        that it ends on exactly that step without ever waiting on the step in flight.
        """
        out = torch.empty(n, self.last.shape[0], dtype=torch.long, device=self.last.device)
        pending: deque = deque()
        for s in range(n):
            if s:
                self.step()
            out[s].copy_(self.last)
            if self.eos is None:
                yield out[s]
                continue
            pending.append((s, self._flag_of_step(s)))
            if len(pending) > self.lookahead:
                s0, flag = pending.popleft()
                yield out[s0]
                if flag():
                    return
        for s0, flag in pending:
            yield out[s0]
            if flag():
                return

    def _flag_of_step(self, s: int):
        """A callable answering whether every sequence had finished after step s, the one just launched."""
        if self.all_finished.device.type != "cuda":
            done = bool(self.all_finished)
            return lambda: done
        slot = s % len(self._events)
        host, event = self._host_flags[slot], self._events[slot]
        host.copy_(self.all_finished, non_blocking=True)
        event.record()
        return lambda: event.synchronize() or bool(host)


def _resolved_mode(mode: str, device: torch.device) -> str:
    """The decode mode to run on device: "auto" is graph on CUDA, eager elsewhere."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"decode='graph' needs a CUDA device, the model is on {device}")
    return ("graph" if device.type == "cuda" else "eager") if mode == "auto" else mode


def _decoder_key(model, batch, capacity, temperature, top_k, top_p, eos, seeded, mode) -> tuple:
    """What a reusable decoder must match: its settings, the backends its ops ran on, and the very weight
    tensors (a CUDA graph holds their addresses; model.to() or reloading replaces them)."""
    backends = tuple(ops.get_backend(op) for op in ops.OPS)
    weights = tuple(p.data_ptr() for p in model.parameters()) + (model.dtype, str(model.device))
    return batch, capacity, temperature, top_k, top_p, eos, seeded, mode, backends, weights


# Each model's newest decoder, kept for the next generation; dropped with the model.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Each model's live generations: [how many, whether the model was in training mode before the first].
_LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # guards both, so that two threads never take the same decoder
_CAPTURE_LOCK = threading.Lock()


def decoder_for(model: Transformer, batch: int, capacity: int, *, temperature: float, top_k: int | None,
                top_p: float | None, eos_token_id: int | None, seeded: bool, mode: str) -> Decoder:
    """The model's kept decoder if it matches and no generation holds it, else a new one, which the model
    keeps instead (a held one stays with its generation until that ends)."""
    mode = _resolved_mode(mode, model.device)
    key = _decoder_key(model, batch, capacity, temperature, top_k, top_p, eos_token_id, seeded, mode)
    decoder = _DECODERS.get(model)
    if decoder is None or decoder.key != key or decoder.busy:
        release_decoder(model)  # free the old buffers (and graph) before allocating new ones
        decoder = Decoder(model, batch, capacity, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_token_id=eos_token_id, seeded=seeded, mode=mode)
        decoder.key = key  # as things were when it was made: the model may change under it
        _DECODERS[model] = decoder
    return decoder


def release_decoder(model: Transformer) -> None:
    """Drop the decoder the model keeps (its KV cache, buffers and CUDA graph), freeing their memory now rather
    than at the next generation with other settings or when the model goes."""
    _DECODERS.pop(model, None)


@contextlib.contextmanager
def _held_decoder(model: Transformer, batch: int, capacity: int, **settings) -> Iterator[Decoder]:
    """A decoder held by one generation until it ends, with the model in eval mode (no dropout) meanwhile:
    the first live generation switches it, the last one puts back the mode it found."""
    with _LOCK:
        decoder = decoder_for(model, batch, capacity, **settings)
        decoder.busy = True
        live = _LIVE.setdefault(model, [0, model.training])
        live[0] += 1
        model.eval()
    try:
        yield decoder
    finally:
        with _LOCK:
            decoder.busy = False
            live[0] -= 1
            if live[0] == 0:
                # Popped, not deleted: collected in one cycle with its model, a generation ends after the
                # model's entry is gone.
                _LIVE.pop(model, None)
                model.train(live[1])


def _capacity(prompt: int, max_new_tokens: int, n_positions: int) -> int:
    """KV cache positions for a generation: the last step's token is never fed back, so prompt + new - 1,
    rounded up to a multiple of 256 (within the context) so that generations of similar lengths share
    one decoder and its graph."""
    return min(n_positions, -(-(prompt + max_new_tokens - 1) // 256) * 256)


def _checked_int(name: str, value, low: int, high: int | None) -> int:
    n = ops.as_number(value, integral=True)
    if n is None or n < low or (high is not None and n > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return n


@torch.inference_mode()
def stream(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = True,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, attention_mask: torch.Tensor | None = None,
           eos_token_id: int | None = None, decode: str = "auto") -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, [B], one step at a time.

    A sequence that has produced eos_token_id keeps producing it; the stream ends when all have, or
    after max_new_tokens. Greedy when do_sample is False or temperature is 0. `decode` picks how the
    decode steps run (see `Decoder`): "graph" (CUDA graphs), "compile", "eager", or "auto" (graph on
    CUDA, eager elsewhere).
    """
    if not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    temperature, top_k, top_p = ops.sampling_params(temperature if do_sample else 0.0, top_k, top_p)
    max_new_tokens = _checked_int("max_new_tokens", max_new_tokens, 0, None)
    seed = None if seed is None else _checked_int("seed", seed, -2**63, 2**64 - 1)  # what torch's generators take
    if eos_token_id is not None:
        eos_token_id = _checked_int("eos_token_id", eos_token_id, 0, model.config.vocab_size - 1)
    model.check_input_ids(input_ids)
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    ids, lengths = pack_prompts(input_ids, attention_mask)
    total = ids.shape[1] + max_new_tokens
    if total > model.config.n_positions:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} is longer "
                         f"than the context, n_positions = {model.config.n_positions}")
    if max_new_tokens == 0:
        return
    capacity = _capacity(ids.shape[1], max_new_tokens, model.config.n_positions)
    with _held_decoder(model, ids.shape[0], capacity, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=eos_token_id, seeded=seed is not None, mode=decode) as decoder:
        decoder.start(ids, lengths, seed)
        yield from decoder.tokens(max_new_tokens)


def generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """input_ids [B, T] followed by the generated tokens: [B, T + new], new <= max_new_tokens (eos stops early).

    Takes the keyword arguments of `stream`. With padded prompts the new tokens of every row start at
    column T, whichever side the padding is on, as in transformers.
    """
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1) if new else input_ids.clone()
