"""Side-by-side timing (see ../seam-cpu-side-by-side-20261206.md): python THIS.py TREE BATCH."""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from gpt2fast import GPT2, GPT2Config
B = int(sys.argv[2])
torch.manual_seed(0)
m = GPT2(GPT2Config.from_preset("gpt2")).eval()
ids = torch.randint(0, 50257, (B, 64))
m.generate(ids, 4, do_sample=False)
res = []
for _ in range(5):
    t1 = time.perf_counter(); m.generate(ids, 1, do_sample=False); pre = time.perf_counter() - t1
    t = time.perf_counter(); m.generate(ids, 17, do_sample=False); res.append(B * 16 / (time.perf_counter() - t - pre))
print(sorted(res)[2])
