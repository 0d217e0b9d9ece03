"""End to end: the whole model, gpt2fast against transformers' GPT2LMHeadModel on the same random
weights of a preset's real size, and on the CPU also against CTranslate2 (that model converted, see
ctranslate2_peer) and against gpt2fast with its weights quantized.

Phases are declarative like the op cases: a name, a batch, the tokens one call handles, and one factory
per implementation (set-up is never timed, and only one implementation's training state lives at a
time). `rows` turns their timings into tokens/s against a bound: decode against the read bandwidth
(every weight is read once per step, at the implementation's precision), prefill and training against the
matmul peak (2 and 6 flops per parameter per token; for training the fraction is the MFU).

Decode is timed by itself: before every timed call, untimed, the prompt is prefilled and its first token
drawn; the call makes the other n - 1 tokens of every sequence (gpt2fast: the rest of `stream`;
transformers: `generate` continuing from the prefilled KV cache, its per-call set-up included;
CTranslate2: `generate_batch`, the clock started at its first token).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..checkpoint import config_to_hf
from ..config import GPT2Config
from ..gpt2 import GPT2
from ..train import loss_fn
from . import ctranslate2_peer
from .suite import Setting, dtype_name
from .timing import Prepared, Timing

OURS, PEER = "gpt2fast", "transformers"
# gpt2fast's other ways to run its decode steps (generate's `decode`), beside OURS, its default: CUDA graphs
# on CUDA, plain calls on the CPU.
OURS_EAGER, OURS_COMPILED = "gpt2fast eager", "gpt2fast torch.compile"
TOP_P = 0.9  # the sampled decode phase: top-p, as transformers' TopPLogitsWarper
# transformers' fast decoding: generate with a static KV cache, whose decode step generate itself
# compiles with torch.compile (fullgraph), on GPUs only.
COMPILED_PEER = "transformers static cache + torch.compile"
# gpt2fast with weight-only quantization (GPT2.quantize(scheme), activations fp32), on the CPU.
OURS_QUANTIZED = {"int8": "gpt2fast int8", "bf16": "gpt2fast bf16"}
# The dtype of the weights a decode step reads, where it is not the run's.
WEIGHT_DTYPES = {OURS_QUANTIZED["int8"]: torch.int8, OURS_QUANTIZED["bf16"]: torch.bfloat16,
                 **{ctranslate2_peer.name(c): dtype for c, dtype in ctranslate2_peer.COMPUTE_TYPES.items()}}
CT2_FLOAT32 = ctranslate2_peer.name("float32")
# The row's speed-up column -> the implementation it is over.
SPEEDUPS = {"speedup_over_transformers": PEER, "speedup_over_ctranslate2_float32": CT2_FLOAT32}


@dataclass(frozen=True)
class E2ESetting(Setting):
    """A Setting whose end-to-end prompt length is chosen (--prompt-tokens) over the size table's."""
    prompt_tokens: int | None = None


@dataclass(frozen=True)
class Sizes:
    prompt: int  # prompt tokens per sequence (prefill, first token, decode)
    new_tokens: int  # tokens generated per sequence in the decode phases, the first one included (untimed)
    decode_batches: tuple[int, ...]
    ttft_prompt: int  # the prompt of the time-to-first-token phase, batch 1
    prefill_batch: int
    train_batch: int
    train_len: int


SIZES = {
    "cuda": Sizes(prompt=128, new_tokens=256, decode_batches=(1, 16, 64), ttft_prompt=1024, prefill_batch=8,
                  train_batch=2, train_len=1024),
    "cuda quick": Sizes(prompt=128, new_tokens=16, decode_batches=(1,), ttft_prompt=256, prefill_batch=1,
                        train_batch=1, train_len=256),
    "cpu": Sizes(prompt=128, new_tokens=32, decode_batches=(1,), ttft_prompt=256, prefill_batch=1, train_batch=1,
                 train_len=128),
    "cpu quick": Sizes(prompt=32, new_tokens=8, decode_batches=(1,), ttft_prompt=64, prefill_batch=1, train_batch=1,
                       train_len=32),
}


def sizes(s: Setting, config: GPT2Config) -> Sizes:
    z = SIZES[s.size]
    # Small presets (the char model) have short contexts: keep prompt and generated tokens inside them.
    prompt = min(getattr(s, "prompt_tokens", None) or z.prompt, config.n_positions // 2)  # a plain Setting has none
    return Sizes(prompt, min(z.new_tokens, config.n_positions - prompt), z.decode_batches,
                 min(z.ttft_prompt, config.n_positions - 1), z.prefill_batch, z.train_batch,
                 min(z.train_len, config.n_positions))


PHASES = ("prefill", "time to first token", "first token", "decode", "decode top-p", "train step")


@dataclass(frozen=True)
class Phase:
    name: str  # one of PHASES
    batch: int
    tokens: int  # per call: prompt tokens read (prefill, first token), tokens made (decode), tokens trained
    # implementation -> factory of the call to time, or the reason it is not run in this setting
    runs: dict[str, Callable[[], Callable[[], object] | Prepared] | str]


def phases(preset: str, s: Setting, decode_batches: tuple[int, ...] | None = None) -> list[Phase]:
    """The phases of one preset; decode_batches replaces the setting's batch sizes of the first-token and
    decode phases."""
    config = GPT2Config.from_preset(preset)
    z = sizes(s, config)
    models = functools.cache(lambda: _inference_models(config, s))
    # Made on first use and kept for every batch: gpt2fast's model copied and quantized, per scheme; the
    # transformers model converted to CTranslate2 once, and loaded per compute type.
    quantized = functools.cache(lambda scheme: GPT2.from_hf(models()[PEER]).quantize(scheme))
    converted = functools.cache(lambda: ctranslate2_peer.convert(models()[PEER]))
    generators = functools.cache(lambda compute_type: ctranslate2_peer.load(converted(), compute_type))
    not_quantized = _quantized_unavailable(s)

    def free_inference_models():
        for cached in (models, quantized, converted, generators):
            cached.cache_clear()

    def ids(batch, length):
        return torch.randint(0, config.vocab_size, (batch, length), device=s.device)

    def forward(batch):
        x = ids(batch, z.prompt)
        return {OURS: lambda: _inference(functools.partial(models()[OURS], x)),
                PEER: lambda: _inference(functools.partial(models()[PEER], input_ids=x, use_cache=False))}

    compiled_peer = None if s.device == "cuda" else "transformers compiles its static-cache decode step on GPUs only"

    def cpu_runs(ours, ct2):
        """The quantized gpt2fast models and CTranslate2's compute types, run on the CPU: ours(model) and
        ct2(generator) make the call to time."""
        def quantized_run(scheme):
            return not_quantized or (lambda: ours(quantized(scheme)))

        def ct2_run(compute_type):
            return ctranslate2_peer.unavailable(s, compute_type) or (lambda: ct2(generators(compute_type)))
        return {**{impl: quantized_run(scheme) for scheme, impl in OURS_QUANTIZED.items()},
                **{ctranslate2_peer.name(c): ct2_run(c) for c in ctranslate2_peer.COMPUTE_TYPES}}

    def first_token(batch, prompt=z.prompt):
        x = ids(batch, prompt)

        def static():
            return hf_first_token(models()[PEER], x, cache_implementation="static")
        return {OURS: lambda: functools.partial(models()[OURS].generate, x, 1, do_sample=False),
                PEER: lambda: hf_first_token(models()[PEER], x), COMPILED_PEER: compiled_peer or static,
                **cpu_runs(lambda model: functools.partial(model.generate, x, 1, do_sample=False),
                           lambda generator: ctranslate2_peer.first_token(generator, x))}

    def decode(batch, n, top_p=None):
        x = ids(batch, z.prompt)
        sampling = dict(do_sample=False) if top_p is None else dict(top_p=top_p, seed=0)
        # top_k=0: transformers would otherwise add its default top-k of 50.
        hf_sampling = dict(do_sample=False) if top_p is None else dict(do_sample=True, top_p=top_p, top_k=0)

        def ours(mode):
            return lambda: ours_decode(models()[OURS], x, n, decode=mode, **sampling)
        cpu_same = "on the CPU gpt2fast's default decode is eager: the gpt2fast row"
        no_compile = "not run with --quick on the CPU: compiling takes longer than the whole run"
        return {OURS: ours("auto"), OURS_EAGER: ours("eager") if s.device == "cuda" else cpu_same,
                OURS_COMPILED: no_compile if s.quick and s.device == "cpu" else ours("compile"),
                PEER: lambda: hf_decode(models()[PEER], x, n, **hf_sampling),
                COMPILED_PEER: compiled_peer or (lambda: hf_decode(models()[PEER], x, n, static=True, **hf_sampling)),
                **cpu_runs(lambda model: ours_decode(model, x, n, **sampling),
                           lambda generator: ctranslate2_peer.decode(generator, x, n, top_p))}

    def train_step(batch):
        x, y = ids(batch, z.train_len), ids(batch, z.train_len)

        def ours():
            free_inference_models()  # the inference models go before a training model and its optimizer state come
            return _train_step(_training_model(GPT2, config, s), lambda m: loss_fn(m, x, y))

        def peer():
            free_inference_models()
            return _train_step(_training_model(_hf_model, config, s), lambda m: m(input_ids=x, labels=y).loss)
        return {OURS: ours, PEER: peer}

    # The first token is the prompt's prefill and one draw: gpt2fast's decode modes do not touch it.
    out = [Phase("prefill", z.prefill_batch, z.prefill_batch * z.prompt, forward(z.prefill_batch)),
           Phase("time to first token", 1, z.ttft_prompt, first_token(1, prompt=z.ttft_prompt))]
    for b in decode_batches or z.decode_batches:
        decoded = b * (z.new_tokens - 1)
        out += [Phase("first token", b, b * z.prompt, first_token(b)),
                Phase("decode", b, decoded, decode(b, z.new_tokens)),
                Phase("decode top-p", b, decoded, decode(b, z.new_tokens, top_p=TOP_P))]
    return out + [Phase("train step", z.train_batch, z.train_batch * z.train_len, train_step(z.train_batch))]


def _quantized_unavailable(s: Setting) -> str | None:
    """Why gpt2fast's quantized models are not run in this setting, or None."""
    if s.device != "cpu" or s.dtype != torch.float32:
        return "weight-only quantization is measured on the CPU, from the float32 model"
    return None


def ours_decode(model: GPT2, x: torch.Tensor, n: int, **kwargs) -> Prepared:
    """gpt2fast's decode of n - 1 tokens per sequence: `stream` started (prefill, first token) untimed, then
    drained."""
    def prepare():
        tokens = model.stream(x, n, **kwargs)
        next(tokens)
        return tokens

    return Prepared(prepare, lambda tokens: sum(1 for _ in tokens))


def hf_first_token(model, x: torch.Tensor, **kwargs):
    """transformers' greedy generate of one token after the prompt x: the call to time."""
    return _inference(functools.partial(model.generate, x, attention_mask=torch.ones_like(x), max_new_tokens=1,
                                        do_sample=False, pad_token_id=0, **kwargs))


def hf_decode(model, x: torch.Tensor, n: int, static: bool = False, **sampling) -> Prepared:
    """transformers' decode of n - 1 tokens per sequence: the prompt prefilled into a KV cache and its greedy
    first token taken, untimed, then `generate` continuing from that cache. static: one StaticCache, reset
    and refilled before every call (its tensors stay put, as a compiled, graph-captured step needs), and
    generate compiles its decode step on GPUs."""
    import transformers

    static_cache = transformers.StaticCache(config=model.config, max_cache_len=x.shape[1] + n) if static else None
    # transformers 5.24 renamed the argument past_key_values to cache (older releases take only the old name).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def prepare():
        if static_cache is not None:
            static_cache.reset()
        cache = static_cache if static_cache is not None else transformers.DynamicCache(config=model.config)
        logits = model(input_ids=x, use_cache=True, **{cache_arg: cache}).logits
        return torch.cat([x, logits[:, -1:].argmax(-1)], dim=1), cache

    @torch.inference_mode()
    def run(state):
        ids, cache = state
        # min_new_tokens: random weights may draw the end-of-text token; every call makes n - 1 tokens.
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n - 1, min_new_tokens=n - 1,
                              pad_token_id=0, **{cache_arg: cache}, **sampling)

    return Prepared(prepare, run)


def _hf_model(config: GPT2Config):
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config)))


def _inference_models(config: GPT2Config, s: Setting) -> dict:
    torch.manual_seed(0)
    with torch.device(s.device):  # built where they run: no multi-GB copy from the host for the large presets
        hf = _hf_model(config).to(s.dtype).eval()
        return {OURS: GPT2.from_hf(hf), PEER: hf}


def _inference(fn):
    def call():
        with torch.inference_mode():
            return fn()
    return call


def _training_model(build, config: GPT2Config, s: Setting):
    """Weights in the run's dtype on the device, random, since a step's cost does not depend on their values.

    Not fp32 weights under autocast: gpt2fast's ops take one dtype per call, so both models train in the
    run's dtype throughout (weights, activations, optimizer state).
    """
    with torch.device(s.device):
        return build(config).to(s.dtype).train()


def _train_step(model, loss_of):
    """One optimizer step: forward and loss, backward, fused AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def weight_bytes(config: GPT2Config, dtype: torch.dtype) -> int:
    """Bytes a decode step must read: every weight but the position table (one row of it per token), in dtype.
    For a quantized model the fp32 biases, layer norms and int8 scales it also reads are left out: under 1%."""
    return (config.num_params() - config.n_positions * config.n_embd) * dtype.itemsize


def rows(preset: str, s: Setting, measured: list[tuple[Phase, str, Timing]], ceilings: dict) -> list[dict]:
    """End-to-end rows from (phase, implementation, timing) triples, one each."""
    config = GPT2Config.from_preset(preset)
    params = config.num_params()
    peak = ceilings["matmul_tflops"][dtype_name(s.dtype)] * 1e12
    flops_per_token = {"prefill": 2 * params, "first token": 2 * params, "time to first token": 2 * params,
                       "train step": 6 * params}
    out = []
    for phase, impl, t in measured:
        if phase.name.startswith("decode"):  # decode steps the bandwidth allows, B tokens each
            weights = weight_bytes(config, WEIGHT_DTYPES.get(impl, s.dtype))
            bound, bound_by = phase.batch * ceilings["read_gbps"] * 1e9 / weights, "read bandwidth"
        else:
            bound, bound_by = peak / flops_per_token[phase.name], "matmul peak"
        out.append(dict(model=preset, params=params, phase=phase.name, impl=impl, batch=phase.batch,
                        tokens=phase.tokens, median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, reps=t.reps,
                        tokens_per_s=phase.tokens / t.median_s, bound_tokens_per_s=bound, bound_by=bound_by,
                        fraction_of_bound=phase.tokens / t.median_s / bound))
    for column, over in SPEEDUPS.items():
        times = {(r["phase"], r["batch"]): r["median_s"] for r in out if r["impl"] == over}
        for r in out:
            over_s = times.get((r["phase"], r["batch"]))
            r[column] = over_s / r["median_s"] if over_s else None
    return out
