"""What weight-only quantization costs in accuracy, per scheme (gpt2fast.quantize), against fp32:

- the char model the README's demo trains (runs/char): validation loss over the whole validation split of
  tiny Shakespeare, as training reports it (`evaluate_full`), fp32, int8 and bf16 weights;
- a gpt2-size model (124M, random weights of GPT-2's initialisation): the logits' relative error
  ||logits_q - logits_fp32|| / ||logits_fp32|| on random prompts, and how often the greedy token changes.

    python benchmarks/quantized_accuracy.py [--model runs/char] [--out benchmarks/results/quantized_accuracy_cpu.json]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from gpt2fast import GPT2, GPT2Config
from gpt2fast.data import default_data_dir, tokenize_text
from gpt2fast.env_info import environment
from gpt2fast.quantize import SCHEMES
from gpt2fast.tokenizer import CharTokenizer
from gpt2fast.train import CHAR_VOCAB_FILE, TrainConfig, evaluate_full


def char_model_losses(folder: Path) -> dict:
    fp32 = GPT2.from_pretrained(folder)
    vocab = CharTokenizer.from_dict(json.loads((folder / CHAR_VOCAB_FILE).read_text()))
    val = tokenize_text(default_data_dir() / "tinyshakespeare.txt", vocab).val
    cfg = TrainConfig(block_size=fp32.config.n_positions, batch_size=16)
    losses = {"fp32": evaluate_full(fp32, val, cfg, "cpu")}
    for scheme in SCHEMES:
        losses[scheme] = evaluate_full(copy.deepcopy(fp32).quantize(scheme), val, cfg, "cpu")
    return {"model": str(folder), "val_tokens": len(val), "val_loss": losses,
            "relative_change": {s: losses[s] / losses["fp32"] - 1 for s in SCHEMES}}


@torch.inference_mode()
def gpt2_logit_errors(batch: int = 4, length: int = 64) -> dict:
    torch.manual_seed(0)
    fp32 = GPT2(GPT2Config.from_preset("gpt2")).eval()
    ids = torch.randint(0, fp32.config.vocab_size, (batch, length))
    want = fp32(ids)
    out = {}
    for scheme in SCHEMES:
        got = copy.deepcopy(fp32).quantize(scheme)(ids)
        out[scheme] = {"relative_error": ((got - want).norm() / want.norm()).item(),
                       "greedy_token_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    return {"model": "gpt2 (124M), random weights", "prompts": f"{batch} x {length} random tokens", "schemes": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/char", help="the demo's trained char model (its out_dir)")
    p.add_argument("--out", default="benchmarks/results/quantized_accuracy_cpu.json")
    args = p.parse_args()
    folder = Path(args.model)
    if not (folder / CHAR_VOCAB_FILE).is_file():
        raise SystemExit(f"{folder} holds no trained char model: run the README's demo first")
    record = {"environment": environment(), "char_model": char_model_losses(folder), "gpt2": gpt2_logit_errors()}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("char_model", "gpt2")}, indent=2))


if __name__ == "__main__":
    main()
