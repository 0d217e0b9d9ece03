"""CTranslate2's `Generator` as a peer of the end-to-end phases, on the CPU: the transformers peer's model
(the same random weights) converted once per run, in float32, and loaded once per compute type, which
quantizes the weights as it loads them (int8: int8 weights, fp32 activations, CTranslate2's int8_float32).

The converter reads a checkpoint folder with a tokenizer, for the vocabulary it writes beside the weights.
The prompts are random token ids, so that vocabulary is the ids themselves as text ("0", "1", ...): it
converts at any preset's vocabulary size, and a token id is passed to CTranslate2 as `str(id)`.

Its decode is timed as gpt2fast's and transformers' are, the n - 1 tokens after the first: one
`generate_batch` of n tokens per call, run in a thread (as CTranslate2's own `generate_tokens` streams), is
started untimed, and the clock starts when its per-token callback reports the first token of the batch, that
is after the prefill and the first draw; the timed call ends when `generate_batch` returns. So the clock
covers the n - 1 decode steps and what the call does after them, as the other implementations' decode rows
do, and misses only the thread hand-off between the callback and the clock (about 0.1 ms, measured on a
two-core Xeon, against tens of ms per step for gpt2). Not the difference of a generate of n tokens and one
of 1: that adds two calls' noise, and drops the per-call costs the other rows include. Not a second call
continuing the first: a Generator carries no KV cache from one call to the next.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import tempfile
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Callable

import torch

from .suite import Setting
from .timing import Prepared

# The compute types compared, as gpt2fast's own precisions, and the dtype of their weights (what a decode step
# reads). On the CPU CTranslate2's int8 is int8_float32; its int16 has no counterpart in gpt2fast.
COMPUTE_TYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def name(compute_type: str) -> str:
    return f"ctranslate2 {compute_type}"


def unavailable(s: Setting, compute_type: str) -> str | None:
    """Why the peer of this compute type is not run in this setting, or None."""
    if s.device != "cpu":
        return "the ctranslate2 peer runs on the CPU only"
    if importlib.util.find_spec("ctranslate2") is None:
        return "ctranslate2 is not installed (pip install ctranslate2)"
    supported = _supported_compute_types()
    if compute_type not in supported:
        return f"ctranslate2 has no {compute_type} on this CPU (it has {', '.join(sorted(supported))})"
    return None


@functools.cache
def _supported_compute_types() -> set[str]:
    import ctranslate2

    return ctranslate2.get_supported_compute_types("cpu")


def convert(hf_model) -> tempfile.TemporaryDirectory:
    """A transformers GPT2LMHeadModel as a CTranslate2 model with float32 weights, in the folder's `ct2` (which
    goes with the returned object)."""
    import ctranslate2

    folder = tempfile.TemporaryDirectory(prefix="gpt2fast-ctranslate2-")
    checkpoint = Path(folder.name) / "hf"
    with _no_transformers_progress_bars():
        hf_model.save_pretrained(checkpoint)
        _id_tokenizer(hf_model.config.vocab_size).save_pretrained(checkpoint)
        ctranslate2.converters.TransformersConverter(str(checkpoint)).convert(str(Path(folder.name) / "ct2"),
                                                                              quantization="float32")
    return folder


def load(folder: tempfile.TemporaryDirectory, compute_type: str):
    """The converted model as a Generator of this compute type, with torch's threads."""
    import ctranslate2

    return ctranslate2.Generator(str(Path(folder.name) / "ct2"), device="cpu", compute_type=compute_type,
                                 intra_threads=torch.get_num_threads(), inter_threads=1)


def _id_tokenizer(vocab_size: int):
    """A GPT-2 tokenizer whose tokens are the ids as text, the last one the end-of-text token."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({str(i): i for i in range(vocab_size)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        end = str(vocab_size - 1)
        return transformers.GPT2TokenizerFast.from_pretrained(folder, bos_token=end, eos_token=end, unk_token=end)


@contextlib.contextmanager
def _no_transformers_progress_bars():
    """transformers' bars for writing and reading the checkpoint would break up the bench's own."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def prompts(x: torch.Tensor) -> list[list[str]]:
    """Token ids [B, T] as CTranslate2's start tokens."""
    return [[str(i) for i in row] for row in x.tolist()]


def first_token(generator, x: torch.Tensor) -> Callable[[], object]:
    """The greedy first token after the prompts x: the call to time. include_prompt_in_result=False: the prompt
    goes through the model at once (else it would be fed a token at a time, as constrained decoding)."""
    return functools.partial(generator.generate_batch, prompts(x), max_length=1, min_length=1,
                             include_prompt_in_result=False)


def decode(generator, x: torch.Tensor, n: int, top_p: float | None = None) -> Prepared:
    """The n - 1 tokens after the first of every sequence, greedy or sampled with top-p over the whole
    vocabulary; the run returns the GenerationResults, every sequence's n tokens (see the module's docstring).
    min_length: random weights may draw the end-of-text token; every call makes n tokens."""
    start_tokens = prompts(x)
    # sampling_topk=0: no top-k cut (its default, 1, is greedy), top-p alone, as in the other implementations.
    sampling = {} if top_p is None else dict(sampling_topk=0, sampling_topp=top_p)

    def prepare() -> Future:
        first, done = Future(), Future()

        def on_token(step) -> None:  # called for every sequence at every step; None: decoding goes on
            if not first.done():
                first.set_result(None)

        def generate():
            try:
                done.set_result(generator.generate_batch(start_tokens, max_length=n, min_length=n,
                                                         include_prompt_in_result=False, callback=on_token,
                                                         **sampling))
            except Exception as e:  # raised again by the timed call, which waits on `done`
                done.set_exception(e)

        threading.Thread(target=generate, daemon=True).start()
        wait([first, done], return_when=FIRST_COMPLETED)
        return done

    return Prepared(prepare, lambda done: done.result())
