"""Time both GPT-2 tokenizer engines encoding and decoding all of tiny Shakespeare.

    python benchmarks/bench_tokenizer.py [--data DIR] [--runs 5] [--out result.json]

Prints a markdown table of median times. Each encode run uses a fresh tokenizer, so the
pure-Python engine starts with an empty word cache, as it would on a first pass over new text.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt2fast.data import default_data_dir
from gpt2fast.env_info import environment
from gpt2fast.tokenizer import Tokenizer, load_vocabulary

DEFAULT_DATA = default_data_dir()
ENGINES = ("tiktoken", "python")


def median_seconds(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_engine(engine: str, data: Path, text: str, runs: int) -> dict[str, Any]:
    ranks, special_tokens = load_vocabulary(data)
    fresh = iter([Tokenizer(ranks, special_tokens, engine=engine) for _ in range(runs)])
    encode_s = median_seconds(lambda: next(fresh).encode_ordinary(text), runs)
    tok = Tokenizer(ranks, special_tokens, engine=engine)
    ids = tok.encode_ordinary(text)
    decode_s = median_seconds(lambda: tok.decode(ids), runs)
    return {
        "engine": engine,
        "tokens": len(ids),
        "encode_s": encode_s,
        "encode_mb_per_s": len(text.encode("utf-8")) / encode_s / 1e6,
        "encode_tokens_per_s": len(ids) / encode_s,
        "decode_s": decode_s,
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    rows = ["| engine | encode s | MB/s | tokens/s | decode s |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        rows.append(
            f"| {r['engine']} | {r['encode_s']:.3f} | {r['encode_mb_per_s']:.2f} "
            f"| {r['encode_tokens_per_s']:,.0f} | {r['decode_s']:.4f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with gpt2.tiktoken and tinyshakespeare.txt")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args()

    text = (args.data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    results = [bench_engine(engine, args.data, text, args.runs) for engine in ENGINES]
    print(f"tiny Shakespeare: {len(text.encode('utf-8')):,} bytes, {results[0]['tokens']:,} tokens, "
          f"median of {args.runs} runs\n")
    print(markdown_table(results))
    if args.out:
        report = {"benchmark": "tokenizer", "text": "tinyshakespeare.txt", "runs": args.runs, "results": results,
                  "environment": environment()}
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
