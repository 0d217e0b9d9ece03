"""Count the kernels one decode step launches: at batch 1 each costs about a microsecond even replayed
from a CUDA graph, so their number bounds tokens/s as surely as the bytes they read.

    python benchmarks/decode_kernels.py --model gpt2 --batch 1 --top-p 0.9 [--backend triton] [--out kernels.json]

Profiles one eager decode step (the step a CUDA graph captures) with torch.profiler and lists the device
kernels by name, most launched first. On a CPU there are no device kernels: it lists the ATen operators
the step calls instead, which is what the count would be made of.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import gpt2fast
from gpt2fast import GPT2
from gpt2fast.config import GPT2Config
from gpt2fast.generate import decoder_for


def count_kernels(preset: str, batch: int, top_p: float | None, dtype: torch.dtype, device: str) -> dict:
    with torch.device(device):
        model = GPT2(GPT2Config.from_preset(preset)).to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)
    with torch.inference_mode():
        decoder = decoder_for(model, batch, 64, temperature=1.0 if top_p else 0.0, top_k=None, top_p=top_p,
                              eos_token_id=None, seeded=True, mode="eager")
        decoder.start(ids, torch.full((batch,), 16, device=device), seed=0)
        decoder.step()  # warm: kernels compiled, the allocator filled
        if device == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            decoder.step()
            if device == "cuda":
                torch.cuda.synchronize()
    if device == "cuda":
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:  # the operators called from Python, not those they call in turn
        names = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    counts = Counter(names)
    return dict(model=preset, batch=batch, top_p=top_p, dtype=str(dtype), device=device,
                backends={op: gpt2fast.ops.get_backend(op) for op in gpt2fast.ops.OPS},
                kernels_per_step=sum(counts.values()), per_layer=sum(counts.values()) / model.config.n_layer,
                by_name=dict(counts.most_common()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top-p", type=float, default=None, help="sample with top-p (default: greedy)")
    parser.add_argument("--backend", default="auto", choices=gpt2fast.ops.registry.choices())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--out", default=None, help="also write the result to this JSON file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    gpt2fast.set_backend(args.backend)
    result = count_kernels(args.model, args.batch, args.top_p, dtype, args.device)
    what = "kernels" if args.device == "cuda" else "ATen operators (no device kernels on the CPU)"
    print(f"{args.model} batch {args.batch}, backend {args.backend}: {result['kernels_per_step']} {what} per decode "
          f"step ({result['per_layer']:.1f} per layer)")
    for name, n in result["by_name"].items():
        print(f"  {n:5d}  {name[:110]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
