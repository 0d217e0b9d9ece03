"""KV-cached generation: gpt2fast against transformers' `generate` on the same random weights, in one run.

    python benchmarks/bench_generate.py [--preset gpt2] [--prompt-len 128] [--new-tokens 64] [--batch 1]
                                        [--dtype float32] [--reps 3] [--out benchmarks/results/generate_cpu.json]

Greedy decoding, so both sides do the same work and must produce the same tokens (checked).
Tokens/s counts new tokens only, over the whole call (prefill included); the median of --reps
runs after one warm-up run is reported, with the spread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gpt2fast import GPT2, GPT2Config
from gpt2fast.checkpoint import config_to_hf
from gpt2fast.env_info import environment

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_models(preset: str, dtype, device):
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(GPT2Config.from_preset(preset))))
    hf = hf.to(device=device, dtype=dtype).eval()
    return hf, GPT2.from_hf(hf)


def timed(fn, reps: int) -> tuple[list[float], torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    hf, ours = build_models(args.preset, dtype, device)
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.prompt_len), device=device)
    mask = torch.ones_like(ids)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0)

    def run_ours():
        return ours.generate(ids, args.new_tokens, do_sample=False)

    results = {}
    outputs = {}
    for name, fn in (("transformers", run_hf), ("gpt2fast", run_ours)):
        times, outputs[name] = timed(fn, args.reps)
        med = statistics.median(times)
        results[name] = {"seconds_median": med, "seconds_min": min(times), "seconds_max": max(times),
                         "tokens_per_s": args.batch * args.new_tokens / med}
    same = torch.equal(outputs["transformers"], outputs["gpt2fast"])
    speedup = results["gpt2fast"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    return {"name": "generate", "preset": args.preset, "dtype": args.dtype, "batch": args.batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
            "same_tokens": same, "speedup_over_transformers": speedup, "results": results,
            "environment": environment()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    record = run(args)
    print("| implementation | tokens/s | median s | min s | max s |\n| --- | ---: | ---: | ---: | ---: |")
    for name, r in record["results"].items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['seconds_median']:.3f} | {r['seconds_min']:.3f} | {r['seconds_max']:.3f} |")
    print(f"speed-up over transformers: {record['speedup_over_transformers']:.2f}x; "
          f"same tokens: {record['same_tokens']}; {record['environment']['device']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
