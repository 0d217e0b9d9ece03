"""The fixed cost of a decode step: gpt2's 12 layers at width 64 (and a 64-token vocabulary), where the matmuls
and the attention cost next to nothing, so what is left is Python, the ops' checks and dispatch, and the small
torch calls around them. Greedy, batch 1, eager, on the CPU; best of --rounds streams of --steps steps.

    python benchmarks/decode_step_overhead.py [--steps 50] [--rounds 5] [--out benchmarks/results/...json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpt2fast import GPT2, GPT2Config
from gpt2fast.env_info import environment


def ms_per_step(model: GPT2, steps: int, rounds: int) -> float:
    """Best of `rounds` streams: each one's prefill and first 5 steps untimed, then `steps` steps timed."""
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(rounds):
        tokens = model.stream(x, 6 + steps, do_sample=False)
        for _ in range(6):
            next(tokens)
        start = time.perf_counter()
        for _ in range(steps):
            next(tokens)
        best = min(best, (time.perf_counter() - start) / steps)
        tokens.close()
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = GPT2Config(vocab_size=64, n_positions=1024, n_embd=64, n_layer=12, n_head=4)
    rows = []
    for weights in ("fp32", "int8"):
        torch.manual_seed(0)
        model = GPT2(config).eval()
        if weights != "fp32":
            model.quantize(weights)
        rows.append(dict(weights=weights, ms_per_step=ms_per_step(model, args.steps, args.rounds)))
        print(f"{weights}: {rows[-1]['ms_per_step']:.2f} ms a step", flush=True)
    record = dict(name="decode step overhead", environment=environment(), threads=torch.get_num_threads(),
                  config=dict(n_layer=config.n_layer, n_embd=config.n_embd, vocab_size=config.vocab_size),
                  steps=args.steps, rounds=args.rounds, rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
