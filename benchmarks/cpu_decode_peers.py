"""Greedy decode tokens/s on the CPU, gpt2fast in each precision beside transformers and CTranslate2 in each of
its compute types, best of interleaved rounds: every implementation runs once per round, in turn, so that a
slow spell of a shared machine falls on all of them (the bench suite's medians take one implementation at a time).

gpt2 (124M) with random weights of the real size, one transformers model that gpt2fast copies and CTranslate2
converts; each sequence: a prompt of --prompt tokens, then --new tokens, the first made untimed (prefill), the
other new - 1 timed, as the bench suite's decode phase (gpt2fast.bench.e2e, gpt2fast.bench.ctranslate2_peer).

    python benchmarks/cpu_decode_peers.py [--batches 1,16,64] [--rounds 2] [--cpu-isas amx,avx512]
                                          [--out benchmarks/results/...json]

--cpu-isas also runs gpt2fast's int8 and bf16 models with the C++ matmul capped at each named build
(GPT2FAST_CPU_ISA), as rows "gpt2fast int8 [avx512]": the builds side by side in the same rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

from gpt2fast import GPT2, GPT2Config
from gpt2fast.bench import ctranslate2_peer, e2e
from gpt2fast.env_info import environment


@contextlib.contextmanager
def cpu_isa(isa: str | None):
    """GPT2FAST_CPU_ISA set to `isa` (None: as it was) for the block."""
    before = os.environ.get("GPT2FAST_CPU_ISA")
    if isa is not None:
        os.environ["GPT2FAST_CPU_ISA"] = isa
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GPT2FAST_CPU_ISA", None)
        else:
            os.environ["GPT2FAST_CPU_ISA"] = before


def capped(prepared: e2e.Prepared, isa: str) -> e2e.Prepared:
    """prepared, its set-up and its run both with the C++ matmul capped at the build `isa`."""
    def prepare():
        with cpu_isa(isa):
            return prepared.prepare()

    def run(state):
        with cpu_isa(isa):
            return prepared.run(state)

    return e2e.Prepared(prepare, run)


def implementations(hf, isas: list[str]) -> dict:
    """name -> decode(x, n) -> Prepared, for every implementation this machine runs; the quantized models once
    more per build in `isas`."""
    ours = {"gpt2fast fp32": GPT2.from_hf(hf)}
    for scheme in ("int8", "bf16"):
        ours[f"gpt2fast {scheme}"] = GPT2.from_hf(hf).quantize(scheme)
    out = {name: (lambda x, n, m=m: e2e.ours_decode(m, x, n, do_sample=False)) for name, m in ours.items()}
    for isa in isas:
        for scheme in ("int8", "bf16"):
            out[f"gpt2fast {scheme} [{isa}]"] = lambda x, n, m=ours[f"gpt2fast {scheme}"], isa=isa: capped(
                e2e.ours_decode(m, x, n, do_sample=False), isa)
    out["transformers"] = lambda x, n: e2e.hf_decode(hf, x, n, do_sample=False)
    setting = e2e.Setting("cpu", torch.float32, False)
    converted = None
    for compute_type in ctranslate2_peer.COMPUTE_TYPES:
        if ctranslate2_peer.unavailable(setting, compute_type) is None:
            converted = converted or ctranslate2_peer.convert(hf)
            generator = ctranslate2_peer.load(converted, compute_type)
            out[ctranslate2_peer.name(compute_type)] = \
                lambda x, n, g=generator: ctranslate2_peer.decode(g, x, n)
    return out


def timed(prepared) -> float:
    state = prepared.prepare()
    start = time.perf_counter()
    prepared.run(state)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpu-isas", default="", help="comma-separated builds of the C++ matmul to cap the quantized "
                   "models at, each as rows of its own (gpt2fast._C.quantized_linear_isas() lists them)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    config = GPT2Config.from_preset("gpt2")
    hf = e2e._hf_model(config).eval()
    impls = implementations(hf, [isa for isa in args.cpu_isas.split(",") if isa])
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randint(0, config.vocab_size, (batch, args.prompt))
        for name, decode in impls.items():  # a warm-up call each: first-call set-up (packing, allocation) untimed
            timed(decode(x, args.new))
        best = {name: float("inf") for name in impls}
        for _ in range(args.rounds):
            for name, decode in impls.items():
                best[name] = min(best[name], timed(decode(x, args.new)))
        for name, seconds in best.items():
            rows.append(dict(batch=batch, impl=name, seconds=seconds, tokens_per_s=batch * (args.new - 1) / seconds))
            print(f"batch {batch:3d}  {name:28s} {rows[-1]['tokens_per_s']:9.1f} tokens/s", flush=True)
    record = dict(name="cpu decode peers", environment=environment(), threads=torch.get_num_threads(),
                  prompt=args.prompt, new_tokens=args.new, rounds=args.rounds, rows=rows, **(
                      dict(cpu_isas=args.cpu_isas.split(",")) if args.cpu_isas else {}))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
