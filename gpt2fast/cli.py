"""`python -m gpt2fast` (and the `gpt2fast` script): generate, train, bigram, backends, bench."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from . import ops
from .config import PRESETS, GPT2Config
from .data import default_data_dir
from .distributed import resolve_device
from .env_info import environment
from .gpt2 import GPT2
from .ops import registry
from .quantize import SCHEMES
from .tokenizer import CharTokenizer, Tokenizer
from .train import CHAR_VOCAB_FILE, TRAIN_PRESETS, TrainConfig, train, train_config

log = logging.getLogger("gpt2fast")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(model_dir: Path | None, explicit: str | None = None):
    """The tokenizer for a model: --tokenizer, else the checkpoint's own vocabulary, else GPT-2's."""
    if explicit:
        return Tokenizer.from_pretrained(explicit)
    if model_dir is not None and (model_dir / CHAR_VOCAB_FILE).exists():
        return CharTokenizer.from_dict(json.loads((model_dir / CHAR_VOCAB_FILE).read_text()))
    for folder in ([model_dir] if model_dir else []) + [default_data_dir() / "gpt2_hf", default_data_dir()]:
        if any((folder / f).exists() for f in ("vocab.json", "tokenizer.json", "encoder.json", "gpt2.tiktoken")):
            return Tokenizer.from_pretrained(folder)
    import tiktoken  # online: tiktoken downloads (and caches) the GPT-2 vocabulary itself

    enc = tiktoken.get_encoding("gpt2")
    return Tokenizer(enc._mergeable_ranks, enc._special_tokens)


def load_model(name: str, random_weights: bool, dtype, device, weights: str | None = None) -> tuple[GPT2, Path | None]:
    if random_weights:
        if name not in PRESETS:
            raise SystemExit(f"--random-weights needs a preset name ({', '.join(PRESETS)}), got {name!r}")
        log.warning("gpt2fast: %s preset with random weights: the text will be gibberish", name)
        torch.manual_seed(0)
        model = GPT2(GPT2Config.from_preset(name)).to(device=device, dtype=dtype).eval()
        return (model if weights is None else model.quantize(weights)), None
    folder = Path(name)
    model = GPT2.from_pretrained(name, dtype=dtype, device=device, weights=weights)
    return model, folder if folder.is_dir() else None


def stream_text(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; bytes of a character split across tokens wait for the rest."""
    if isinstance(tokenizer, CharTokenizer):
        yield from (tokenizer.decode([t]) for t in tokens)
        return
    pending = b""
    for t in tokens:
        pending += tokenizer.decode_bytes([t])
        try:
            text, pending = pending.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                text, pending = pending.decode("utf-8", errors="replace"), b""
            else:
                continue
        yield text
    if pending:
        yield pending.decode("utf-8", errors="replace")


def cmd_generate(args) -> None:
    with ops.use_backend(args.backend):
        generate_text(args)


def generate_text(args) -> None:
    device = resolve_device(args.device)
    model, folder = load_model(args.model, args.random_weights, DTYPES[args.dtype], device, args.weights)
    tokenizer = load_tokenizer(folder, args.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}; pass the model's own vocabulary with --tokenizer")
    if args.prompt:
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = [tokenizer.eot_token] if isinstance(tokenizer, Tokenizer) else tokenizer.encode("\n")
    ids = torch.tensor([prompt], device=model.device)
    eos = tokenizer.eot_token if isinstance(tokenizer, Tokenizer) else None
    room = model.config.n_positions - len(prompt)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else max(0, min(200, room))
    steps = model.stream(ids, max_new, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, eos_token_id=eos)
    pieces = stream_text(tokenizer, (int(t[0]) for t in steps))
    sys.stdout.write(args.prompt + next(pieces, ""))  # the first step runs every check before anything prints
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_train(args) -> None:
    started = time.perf_counter()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = train_config(args.train_preset, **{k: v for k, v in vars(args).items() if k in fields})
    result = train(cfg)
    if os.environ.get("RANK", "0") != "0" or not result["completed"]:
        return  # under torchrun rank 0 reports; a stopped run reports when it completes
    mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
    print(f"iters {result['iters']}  {result['seconds']:.1f} s  {result['train_tokens_per_second']:,.0f} tokens/s "
          f"in training (MFU {mfu})  train loss {result['train_loss']:.4f}  val loss {result['val_loss']:.4f}  "
          f"-> {cfg.out_dir}")
    if cfg.target_val_loss:
        reached = (f"at iteration {result['iter_to_target']}, {result['seconds_to_target']:.1f} s"
                   if result["iter_to_target"] is not None else "never")
        print(f"validation loss {cfg.target_val_loss} reached {reached}")
    model = GPT2.from_pretrained(cfg.out_dir)
    tokenizer = load_tokenizer(Path(cfg.out_dir), None if cfg.tokenizer == "char" else cfg.tokenizer)
    start = torch.tensor([tokenizer.encode("\n")])
    n = min(args.sample_tokens, model.config.n_positions - 1)  # generation stays within the context
    sample = model.generate(start, n, temperature=0.8, top_k=50, seed=cfg.seed)
    text = tokenizer.decode(sample[0, 1:].tolist())
    print(f"--- sample ({n} tokens, temperature 0.8, top-k 50) ---\n{text}")
    if args.record:
        # wall_seconds: the whole command after start-up: data, training, evaluation, saving, sampling.
        # The loss of every iteration stays in the run's train_log.json; the record keeps the estimates.
        record = {"name": "train", "config": dataclasses.asdict(cfg), "environment": environment(),
                  **{k: v for k, v in result.items() if k not in ("out_dir", "losses")},
                  "wall_seconds": round(time.perf_counter() - started, 1), "sample": text}
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(record, indent=2) + "\n")
        print(f"recorded -> {args.record}")


def cmd_bigram(args) -> None:
    from .bigram import run_bigrams

    r = run_bigrams(args.data or None, steps=args.steps, progress=True)
    print(f"vocabulary {r['vocab_size']} chars; uniform loss {r['uniform_loss']:.4f}")
    for name in ("counting", "neural"):
        m = r[name]
        print(f"{name:>8} bigram: train {m['train_loss']:.4f}  val {m['val_loss']:.4f}\n{m['sample']}\n")


def describe_backends() -> list[tuple[str, str, str]]:
    """(backend, status, detail) rows, one per registered backend."""
    rows = []
    for name, backend in registry.backends().items():
        reason = backend.unavailable_reason()
        implemented = ", ".join(op for op in registry.OPS if op in backend.impls) or "none"
        rows.append((name, "unavailable" if reason else "available",
                     reason or f"{backend.description}; ops: {implemented}"))
    return rows


def cmd_backends(args) -> None:
    rows = describe_backends()
    width = max(len(name) for name, _, _ in rows)
    for name, status, detail in rows:
        print(f"{name:<{width}} {status:<12} {detail}")
    current, overrides = registry.get_backend(), {op: registry.get_backend(op) for op in registry.OPS}
    print(f"\nselected: {current}" + "".join(f"\n  {op}: {b}" for op, b in overrides.items() if b != current))
    for device_type in registry.AUTO_ORDER:
        exceptions = "".join(f"; {op}: " + " > ".join(registry.auto_order(device_type, op))
                             for op in registry.OPS if (device_type, op) in registry.AUTO_ORDER_BY_OP)
        print(f"auto order on {device_type}: " + " > ".join(registry.AUTO_ORDER[device_type]) + exceptions)


def cmd_bench(args) -> None:
    from .bench.runner import main as bench

    bench(args)


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field. A flag left out stays out of the parsed arguments (the field's default then
    applies), so that it does not override a preset's value."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"default: {f.default}")
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"default: {f.default!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2fast", description="A fast, clean GPT-2 for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, streamed as it is made")
    g.add_argument("--model", default="gpt2", help="an HF GPT-2 folder or trained checkpoint, a hub name, "
                                                   "or a preset with --random-weights")
    g.add_argument("--random-weights", action="store_true", help="build --model from its preset, untrained")
    g.add_argument("--tokenizer", default=None, help="a GPT-2 vocabulary (folder or .tiktoken file)")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 200, or what the context has room for after the prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    # Former names still select their backend, with a FutureWarning, but --help lists the current ones only.
    g.add_argument("--backend", default=registry.AUTO, choices=[*registry.choices(), *registry.RENAMED],
                   metavar="{" + ",".join(registry.choices()) + "}")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES))
    g.add_argument("--weights", default=None, choices=list(SCHEMES),
                   help="store the weights int8 (one scale per output channel) or bf16, activations fp32: fewer "
                        "bytes to read per token (default: as the checkpoint holds them)")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a model (default: the char-level course model on tiny Shakespeare)")
    t.add_argument("--train-preset", default="", choices=list(TRAIN_PRESETS),
                   help="a named run (shakespeare-char: nanoGPT's train_shakespeare_char.py); flags given override it")
    _add_dataclass_flags(t, TrainConfig)
    t.add_argument("--sample-tokens", type=int, default=300, help="tokens to sample from the trained model")
    t.add_argument("--record", default=None, help="write the result, with device and versions, to this JSON file")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bigram", help="the counting and neural bigram models on a text (default: tiny Shakespeare)")
    b.add_argument("--data", default="")
    b.add_argument("--steps", type=int, default=500)
    b.set_defaults(func=cmd_bigram)

    k = sub.add_parser("backends", help="list the op backends and why each is or is not available")
    k.set_defaults(func=cmd_backends)

    m = sub.add_parser("bench", help="time every op and the whole model against PyTorch, transformers and the "
                                     "device's measured limits; write JSON, markdown and plots")
    m.add_argument("--ops", default=None, help="comma-separated ops, or none (default: all): "
                                               "layer_norm,causal_attention,...")
    m.add_argument("--backends", default=None, help="comma-separated op backends to measure (default: all; the "
                                                    "torch reference always)")
    m.add_argument("--models", default=None, help="comma-separated presets for the end-to-end runs, or none "
                                                  "(default: gpt2 on the CPU, gpt2,gpt2-xl on CUDA)")
    m.add_argument("--phases", default=None, help="comma-separated end-to-end phases (default: all): prefill,"
                                                  "time to first token,first token,decode,decode top-p,train step")
    m.add_argument("--decode-batches", default=None, help="comma-separated batch sizes of the first-token and decode "
                                                         "phases (default: 1, and 16, 64 on CUDA)")
    m.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt tokens per sequence of the prefill, first-token and decode phases (default: 128; "
                        "32 with --quick on the CPU; at most half the model's context)")
    m.add_argument("--budget-s", type=float, default=None, help="start nothing after this many seconds; what is left "
                                                                "is recorded as skipped (the record is written)")
    m.add_argument("--quick", action="store_true", help="fewer, smaller shapes and shorter timing: a smoke run")
    m.add_argument("--out", default=None, help="output folder (default: benchmarks/results in a source checkout, "
                                               "else ./gpt2fast-bench)")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    m.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")
    m.add_argument("--report", default=None, metavar="RECORD",
                   help="measure nothing: print the tables of a record (a bench-*.json, or a folder: its newest)")
    m.add_argument("--update", default=None, metavar="README",
                   help="with --report: write the tables, and links to the record's plots, between the bench "
                        "table markers of this file")
    m.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except (ValueError, KeyError, OSError) as e:  # OSError: a path that is missing, a folder, not writable...
        raise SystemExit(f"gpt2fast {args.command}: error: {e}") from None
