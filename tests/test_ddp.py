"""DDP: `torchrun --nproc_per_node 2 -m gpt2fast train` on the CPU (gloo) trains as one process does with the
same global batch: the same loss at every iteration, the same evaluations and the same final weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gpt2fast.data import default_data_dir, load_text
from gpt2fast.train import TrainConfig, train

SHAKESPEARE = default_data_dir() / "tinyshakespeare.txt"

# Four micro-batches of 4 sequences per iteration: one process runs all four, each of two runs two.
CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=4,
              max_iters=6, max_seconds=0.0, warmup_iters=2, eval_interval=3, eval_iters=2, log_interval=2,
              device="cpu")


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"tiny Shakespeare not found at {SHAKESPEARE}")
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, monkeypatch):
    text = tmp_path / "small.txt"
    text.write_text(load_text(SHAKESPEARE)[:40_000])
    env = {**os.environ, "GPT2FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items()]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "gpt2fast", "train", f"--data={text}", f"--out-dir={tmp_path / 'ddp'}", "--no-progress",
                    "--sample-tokens=1", *flags], env=env, check=True, timeout=120)

    monkeypatch.setenv("GPT2FAST_CACHE", str(tmp_path / "cache"))
    one = train(TrainConfig(data=str(text), out_dir=str(tmp_path / "one"), progress=False, **CONFIG))
    two = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    assert len(two["losses"]) == CONFIG["max_iters"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert [h["iter"] for h in two["history"]] == [h["iter"] for h in one["history"]] == [3, 6]
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in two["history"]] == pytest.approx([h[key] for h in one["history"]], rel=1e-5)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "ddp"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
