"""transformers' GPT2LMHeadModel patched in place by `gpt2fast.patch_hf`, beside the unpatched one.

Each end-to-end phase (prefill, first token, greedy decode, training step) gains one implementation, run in the same
phase on inputs of the same shapes and on a model with the same random weights, so that its row sits
next to transformers' and its "vs transformers" ratio is what the patch gains.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..config import GPT2Config
from ..hf import patch_hf
from . import e2e
from .suite import Setting

PATCHED = "transformers + gpt2fast.patch_hf"


def with_patched_hf(phases: list[e2e.Phase], preset: str, s: Setting) -> list[e2e.Phase]:
    """The phases, each with the patched transformers model as one more implementation."""
    config = GPT2Config.from_preset(preset)
    z = e2e.sizes(s, config)
    model = functools.cache(lambda: _patched_inference_model(config, s))

    def ids(batch, length):
        return torch.randint(0, config.vocab_size, (batch, length), device=s.device)

    def forward(batch):
        x = ids(batch, z.prompt)
        return lambda: e2e._inference(functools.partial(model(), input_ids=x, use_cache=False))

    def first_token(batch):
        x = ids(batch, z.prompt)
        return lambda: e2e.hf_first_token(model(), x)

    def decode(batch):
        x = ids(batch, z.prompt)
        return lambda: e2e.hf_decode(model(), x, z.new_tokens, do_sample=False)

    def train_step(batch):
        x, y = ids(batch, z.train_len), ids(batch, z.train_len)

        def make():
            model.cache_clear()  # the inference model goes before the training model and its optimizer state
            return e2e._train_step(e2e._training_model(lambda c: patch_hf(e2e._hf_model(c)), config, s),
                                   lambda m: m(input_ids=x, labels=y).loss)
        return make

    runs = {"prefill": lambda p: forward(p.batch), "first token": lambda p: first_token(p.batch),
            "decode": lambda p: decode(p.batch), "train step": lambda p: train_step(p.batch)}
    return [dataclasses.replace(p, runs={**p.runs, PATCHED: runs[p.name](p)}) if p.name in runs else p
            for p in phases]


def _patched_inference_model(config: GPT2Config, s: Setting):
    torch.manual_seed(0)  # the weights the unpatched transformers model gets
    with torch.device(s.device):
        return patch_hf(e2e._hf_model(config).to(s.dtype).eval())
