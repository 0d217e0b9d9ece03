"""Time both GPT-2 tokenizer engines encoding and decoding all of tiny Shakespeare, then encoding long words.

    python benchmarks/bench_tokenizer.py [--data DIR] [--runs 5] [--out result.json]

Prints markdown tables of median times. Each encode run uses a fresh tokenizer, so the
pure-Python engine starts with an empty word cache, as it would on a first pass over new text.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt2fast.data import default_data_dir
from gpt2fast.env_info import environment
from gpt2fast.tokenizer import Tokenizer, Vocabulary, load_vocabulary

DEFAULT_DATA = default_data_dir()
ENGINES = ("tiktoken", "python")

# Each is a single pre-token, so its whole length reaches the merge loop: what a merge loop
# that rescans the word after every merge turns quadratic.
_RNG = random.Random(0)
LONG_WORDS = {
    "'a' * 100,000": "a" * 100_000,
    "10,000 CJK characters": "".join(map(chr, _RNG.choices(range(0x4E00, 0xA000), k=10_000))),
    "20,000 random letters": "".join(_RNG.choices([chr(c) for c in range(0xC0, 0xD7A4) if chr(c).isalpha()], k=20_000)),
}


def median_seconds(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fresh_encode_seconds(engine: str, vocabulary: Vocabulary, text: str, runs: int) -> float:
    fresh = iter([Tokenizer(*vocabulary, engine=engine) for _ in range(runs)])
    return median_seconds(lambda: next(fresh).encode_ordinary(text), runs)


def bench_engine(engine: str, data: Path, text: str, runs: int) -> dict[str, Any]:
    vocabulary = load_vocabulary(data)
    encode_s = fresh_encode_seconds(engine, vocabulary, text, runs)
    tok = Tokenizer(*vocabulary, engine=engine)
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


def bench_long_words(data: Path, runs: int) -> list[dict[str, Any]]:
    vocabulary = load_vocabulary(data)
    rows = []
    for name, word in LONG_WORDS.items():
        row: dict[str, Any] = {"input": name, "bytes": len(word.encode("utf-8"))}
        row.update({f"{engine}_s": fresh_encode_seconds(engine, vocabulary, word, runs) for engine in ENGINES})
        rows.append(row)
    return rows


def markdown_table(results: list[dict[str, Any]]) -> str:
    rows = ["| engine | encode s | MB/s | tokens/s | decode s |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        rows.append(
            f"| {r['engine']} | {r['encode_s']:.3f} | {r['encode_mb_per_s']:.2f} "
            f"| {r['encode_tokens_per_s']:,.0f} | {r['decode_s']:.4f} |"
        )
    return "\n".join(rows)


def long_words_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| one word | bytes | tiktoken s | python s | python / tiktoken |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = r["python_s"] / r["tiktoken_s"]
        lines.append(f"| {r['input']} | {r['bytes']:,} | {r['tiktoken_s']:.4f} | {r['python_s']:.4f} | {ratio:.0f}x |")
    return "\n".join(lines)


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
    long_words = bench_long_words(args.data, args.runs)
    print(f"\nlong words, median of {args.runs} runs\n")
    print(long_words_table(long_words))
    if args.out:
        report = {"benchmark": "tokenizer", "text": "tinyshakespeare.txt", "runs": args.runs, "results": results,
                  "long_words": long_words, "environment": environment()}
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
