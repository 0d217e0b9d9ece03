"""Side-by-side timing (see ../seam-cpu-side-by-side-20261206.md): python rounds.py PHASE TREE BATCH prints the
median of 5 timings in tokens/s of gpt2 (random weights) from the source tree TREE.

decode: 16 greedy tokens after a 64-token prompt, the prompt's own time (a 1-token generation) taken off.
first-token: a 128-token prompt to its first token.
"""
import statistics
import sys
import time

import torch

phase, tree, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, tree)
from gpt2fast import GPT2, GPT2Config  # noqa: E402  (from TREE)

torch.manual_seed(0)
model = GPT2(GPT2Config.from_preset("gpt2")).eval()
prompt = 64 if phase == "decode" else 128
ids = torch.randint(0, 50257, (batch, prompt))


def seconds(new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(ids, new_tokens, do_sample=False)
    return time.perf_counter() - start


seconds(4)  # warm-up
if phase == "decode":
    rates = [batch * 16 / (seconds(17) - seconds(1)) for _ in range(5)]
else:
    rates = [batch * prompt / seconds(1) for _ in range(5)]
print(statistics.median(rates))
