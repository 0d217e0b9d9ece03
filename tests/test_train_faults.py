"""The trainer under faults: killed at random instants, its checkpoint damaged, its loss diverging. A resumed run
must go on exactly as one that never stopped, or refuse by name; a diverging one must stop before it saves."""
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gpt2fast.data import default_data_dir, load_text
from gpt2fast.train import LATEST, TrainConfig, Trainer, TrainingDiverged, train

SHAKESPEARE = default_data_dir() / "tinyshakespeare.txt"

# A checkpoint at every iteration, so that most instants of a run fall inside a save. Each session is killed
# within MAX_DELAY_S of its first evaluation: short against the whole run, so that the kills fall in training
# rather than after it, but long enough to span several checkpoints.
KILLED = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=60, max_seconds=0.0,
              warmup_iters=2, eval_interval=1, eval_iters=1, log_interval=1, dropout=0.1, device="cpu")
KILLS = 10
MAX_DELAY_S = 0.15


@pytest.fixture
def small_text(tmp_path, monkeypatch):
    if not SHAKESPEARE.exists():
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE}")
    monkeypatch.setenv("GPT2FAST_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "small.txt"
    path.write_text(load_text(SHAKESPEARE)[:40_000])
    return path


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def reference_run(small_text, out_dir) -> dict:
    """The uninterrupted run, in this process on one thread as the subprocesses run (the same sums, bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig(data=str(small_text), out_dir=str(out_dir), progress=False, **KILLED))
    finally:
        torch.set_num_threads(threads)


def killed_session(command: list[str], env: dict, delay: float) -> int:
    """Start the trainer, wait for its first evaluation (training has begun), SIGKILL it `delay` seconds later;
    returns its exit status (0 where it finished first)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.select(timeout=120)
    proc.stdout.readline()
    time.sleep(delay)
    proc.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode


def test_a_run_killed_at_random_instants_resumes_on_the_uninterrupted_curve(small_text, tmp_path):
    whole = reference_run(small_text, tmp_path / "whole")
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "gpt2fast", "train", f"--data={small_text}", f"--out-dir={out}",
               "--no-progress", "--sample-tokens=1", *(f"--{k.replace('_', '-')}={v}" for k, v in KILLED.items())]
    rng = random.Random(0)
    statuses = []
    for _ in range(KILLS):
        # Until a checkpoint exists there is nothing to resume, and the run starts afresh.
        resume = ["--resume"] if (out / "training_state.pt").exists() else []
        statuses.append(killed_session(command + resume, env, rng.uniform(0, MAX_DELAY_S)))
    final = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr

    assert -signal.SIGKILL in statuses  # some kill did land before its session ended
    log = json.loads((out / "train_log.json").read_text())
    assert log["losses"] == whole["losses"]  # bit for bit
    assert without_time(log["history"]) == without_time(whole["history"])
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in out.glob("checkpoint-*")] == [os.readlink(out / LATEST)]


# ---- resume checks the committed checkpoint, and nothing else ----

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_seconds=0.0, warmup_iters=2,
            eval_interval=4, eval_iters=2, log_interval=3, dropout=0.1, max_iters=12, progress=False)


def tiny(small_text, out_dir, **overrides) -> TrainConfig:
    return TrainConfig(data=str(small_text), out_dir=str(out_dir), **{**TINY, **overrides})


def test_folders_a_kill_left_uncommitted_are_never_read_and_are_removed(small_text, tmp_path):
    whole = train(tiny(small_text, tmp_path / "whole"))
    other = train(tiny(small_text, tmp_path / "other", seed=7, stop_at_iter=8))
    assert other["losses"] != whole["losses"][:8]
    out = tmp_path / "split"
    train(tiny(small_text, out, stop_at_iter=6))
    # As a kill leaves them: one renamed but not committed (another run's, complete), one half written.
    shutil.copytree(tmp_path / "other" / "checkpoint-000008", out / "checkpoint-000008")
    (out / "checkpoint-000010.tmp").mkdir()
    (out / "checkpoint-000010.tmp" / "model.safetensors").write_bytes(b"half a file")

    resumed = train(tiny(small_text, out, resume=True))
    assert resumed["losses"] == whole["losses"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000012"]


def test_resume_refuses_a_file_of_another_checkpoint_by_name(small_text, tmp_path):
    train(tiny(small_text, tmp_path / "other", seed=7, stop_at_iter=8))
    out = tmp_path / "run"
    train(tiny(small_text, out, stop_at_iter=8))
    shutil.copy(tmp_path / "other" / "model.safetensors", out / "checkpoint-000008" / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-000008/model.safetensors is not the file saved with the "
                                         r"checkpoint of iteration 8"):
        train(tiny(small_text, out, resume=True))


def test_resume_refuses_a_checkpoint_missing_a_file_by_name(small_text, tmp_path):
    out = tmp_path / "run"
    train(tiny(small_text, out, stop_at_iter=4))
    (out / "checkpoint-000004" / "training_state.pt").unlink()
    with pytest.raises(ValueError, match="checkpoint-000004/training_state.pt is missing"):
        train(tiny(small_text, out, resume=True))


def test_resume_refuses_a_run_in_the_earlier_flat_layout(small_text, tmp_path):
    out = tmp_path / "run"
    train(tiny(small_text, out, stop_at_iter=4))
    flat = tmp_path / "flat"
    shutil.copytree(out / "checkpoint-000004", flat)  # the same files, directly in out_dir
    with pytest.raises(ValueError, match="flat layout of an earlier gpt2fast.*init_from"):
        train(tiny(small_text, flat, resume=True))


# ---- a diverging run stops at once, naming the iteration, and saves nothing ----

def committed_files(out) -> dict[str, bytes]:
    folder = out / os.readlink(out / LATEST)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def good_checkpoint(small_text, tmp_path):
    """A run stopped at iteration 4 with a checkpoint, and that checkpoint's bytes."""
    out = tmp_path / "run"
    train(tiny(small_text, out, stop_at_iter=4))
    return out, committed_files(out)


def assert_intact(out, files) -> None:
    assert committed_files(out) == files
    weights = load_file(str(out / "model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())


def test_a_huge_learning_rate_diverges_and_stops_before_saving(small_text, good_checkpoint):
    out, files = good_checkpoint
    # 1e30 is a finite, allowed lr: the first step from the checkpoint (iteration 4) makes weights that overflow.
    with pytest.raises(TrainingDiverged, match=r"training diverged: the loss of iteration 5 is (nan|inf)"):
        train(tiny(small_text, out, resume=True, lr=1e30, min_lr=0.0))
    assert_intact(out, files)


def test_an_infinite_loss_is_named_by_its_iteration(small_text, good_checkpoint, monkeypatch):
    out, files = good_checkpoint
    step = Trainer._step
    monkeypatch.setattr(Trainer, "_step", lambda self, it: step(self, it) * (float("inf") if it == 6 else 1.0))
    # Losses are read every log_interval (3) iterations: iteration 6's on the way to the checkpoint of iteration 8.
    with pytest.raises(TrainingDiverged, match="the loss of iteration 6 is inf"):
        train(tiny(small_text, out, resume=True))
    assert_intact(out, files)


def test_weights_made_nan_by_the_last_step_before_a_checkpoint_are_not_saved(small_text, good_checkpoint,
                                                                             monkeypatch):
    out, files = good_checkpoint
    step = Trainer._step

    def poisoned(self, it):
        loss = step(self, it)
        if it == 7:  # after its loss is taken: the loss is finite, the weights going into the save are not
            with torch.no_grad():
                self.model.wte.weight[0, 0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "_step", poisoned)
    with pytest.raises(TrainingDiverged, match="the weights are not finite after 8 iterations"):
        train(tiny(small_text, out, resume=True))
    assert_intact(out, files)
