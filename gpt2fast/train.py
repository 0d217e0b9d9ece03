"""Train (or fine-tune) a GPT-2 on a text file: the char-level course model by default.

nanoGPT's recipe: the text tokenised once into uint16 files (char-level or GPT-2 BPE), AdamW with weight
decay on the matrices, linear warm-up then cosine decay, gradient accumulation and clipping, a bf16
option and torch.compile, periodic evaluation, and a progress bar with loss, tokens/s and MFU.
A checkpoint is the Hugging Face folder that `GPT2.from_pretrained` and `python -m gpt2fast generate`
load (plus the char vocabulary), with a training state beside it (optimizer, iteration, random number
generators, loss history) from which `resume` continues the same loss curve; a loss plot goes with
them. Under torchrun the model is wrapped in DDP and each rank runs its share of the global batch.

A checkpoint is committed as a whole, so that a run killed at any instant resumes from one iteration's
weights, optimizer and generators, never a mix. Its files are written into a fresh folder of out_dir
(`checkpoint-000500.tmp`) with a manifest last (the iteration and the sha256 of every file), synced to
disk and renamed `checkpoint-000500`; the commit is one atomic step, `os.replace` of the symlink
`out_dir/latest` by a new link to that folder. Only the folder `latest` names is a checkpoint: any
other (an unfinished `.tmp`, or one renamed but not committed) is left over from a kill, never read,
and deleted after the next commit or on resume. The top-level files of out_dir (config.json,
model.safetensors, ...) are relative symlinks through `latest/`, so out_dir itself stays a model folder.
`resume` checks every file of the committed folder against its manifest and refuses, by file, a set
that does not match. A run saved before this layout (the same files flat in out_dir, written one after
the other) cannot be trusted to be one set, and `resume` refuses it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import load_hf_state_dict
from .config import GPT2Config
from .data import TokenizedText, default_data_dir, get_batch, to_device, tokenize_text
from .distributed import Distributed
from .gpt2 import GPT2
from .tokenizer import CharTokenizer

log = logging.getLogger("gpt2fast")
CHAR_VOCAB_FILE = "char_vocab.json"
STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.json"
PLOT_FILE = "loss.png"
MANIFEST_FILE = "checkpoint.json"
LATEST = "latest"  # the symlink to the committed checkpoint folder
# The files of a checkpoint that out_dir shows at its top level, each a link through LATEST.
CHECKPOINT_FILES = ("config.json", "model.safetensors", CHAR_VOCAB_FILE, STATE_FILE, LOG_FILE)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    data: str = ""  # a text file; empty: tiny Shakespeare from the data folder
    out_dir: str = "runs/char"
    preset: str = "char"  # the model's GPT2Config preset
    n_layer: int = 0  # 0: the preset's (as for n_head and n_embd)
    n_head: int = 0
    n_embd: int = 0
    tokenizer: str = "char"  # "char", or a GPT-2 vocabulary path for Tokenizer.from_pretrained
    init_from: str = ""  # an HF GPT-2 folder to fine-tune instead of a fresh preset
    cache_dir: str = ""  # where the token files go; empty: data.default_cache_dir()/tokens
    block_size: int = 128
    batch_size: int = 16  # sequences per micro-batch, in each process
    # Micro-batches per iteration, over all processes together: an iteration trains on batch_size x this
    # sequences however many processes share them.
    gradient_accumulation_steps: int = 1
    max_iters: int = 5000
    # A time budget (0: none): the schedule ends at max_iters or max_seconds, whichever comes first.
    # The default is the demo's: the char model on tiny Shakespeare in 4 minutes of a 2-core CPU.
    max_seconds: float = 240.0
    stop_at_iter: int = 0  # end this session at this iteration with a checkpoint (the schedule still ends at max_iters)
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0: no clipping
    dropout: float = 0.0
    eval_interval: int = 500
    eval_iters: int = 20  # batches per periodic estimate; the final evaluation reads the whole split
    log_interval: int = 10  # iterations between reads of the loss, each of which waits for the device
    target_val_loss: float = 0.0  # note when the validation estimate first reaches this (0: none)
    dtype: str = "float32"  # or bfloat16: bf16 matmuls against fp32 weights, see CastForward
    compile: bool = False  # train a torch.compile'd model
    resume: bool = False  # continue the run whose checkpoint and training state are in out_dir
    seed: int = 1337
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    progress: bool = True

    def __post_init__(self) -> None:
        """Every option checked by name before any work: a bad value would otherwise surface late, or never
        (a negative grad_clip turns descent into ascent)."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for f in dataclasses.fields(self):
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be a finite number, got {getattr(self, f.name)}")
        rules = [(name, 1, ">= 1") for name in ("block_size", "batch_size", "gradient_accumulation_steps",
                                                 "eval_interval", "eval_iters", "log_interval")]
        rules += [(name, 0, ">= 0") for name in ("n_layer", "n_head", "n_embd", "max_iters", "warmup_iters",
                                                  "stop_at_iter", "max_seconds", "min_lr", "weight_decay",
                                                  "grad_clip", "target_val_loss", "beta2", "dropout")]
        for name, least, requirement in rules:
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)}")
        for name in ("beta2", "dropout"):
            if getattr(self, name) >= 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        shape = [name for name in ("n_layer", "n_head", "n_embd") if getattr(self, name)]
        if self.init_from and shape:
            raise ValueError(f"{shape[0]} ({getattr(self, shape[0])}) cannot reshape the init_from checkpoint "
                             f"{self.init_from}; its shape is its own")


# Named runs. shakespeare-char is nanoGPT's config/train_shakespeare_char.py over its train.py defaults
# (validation loss 1.4697 there); add compile=True for nanoGPT's compiled model. Two differences remain in
# the model: nanoGPT's has no biases and drops attention probabilities, this GPT-2 has biases and no
# attention dropout.
TRAIN_PRESETS: dict[str, dict] = {
    "shakespeare-char": dict(
        out_dir="runs/shakespeare-char", preset="char", n_layer=6, n_head=6, n_embd=384, block_size=256,
        dropout=0.2, batch_size=64, gradient_accumulation_steps=1, lr=1e-3, min_lr=1e-4, max_iters=5000,
        max_seconds=0.0, warmup_iters=100, weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=250,
        eval_iters=200, log_interval=10, dtype="bfloat16"),
}


def train_config(train_preset: str = "", **overrides) -> TrainConfig:
    """A TrainConfig from a named run in TRAIN_PRESETS (or the defaults), with `overrides` on top."""
    if train_preset and train_preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {train_preset!r}; known: {', '.join(TRAIN_PRESETS)}")
    return TrainConfig(**{**TRAIN_PRESETS.get(train_preset, {}), **overrides})


def learning_rate(it: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr by max_iters or, with a time budget, by max_seconds.

    Decaying by the clock as well makes a time-boxed run anneal fully on any machine, fast or slow.
    """
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    if cfg.max_seconds:
        progress = max(progress, elapsed / cfg.max_seconds)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    """Training FLOPs per token as nanoGPT's estimate_mfu counts them (PaLM, appendix B): 6 per weight, for
    the multiply-add of the forward and the two of the backward, plus attention's 12 * L * H * Q * T.
    The position table is a lookup, not a matmul, so it is left out; the token table counts as the LM head."""
    weights = config.num_params() - config.n_positions * config.n_embd
    return 6 * weights + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


# Dense bf16 tensor-core peaks from NVIDIA's datasheets, by a piece of the device's name; the first match
# wins, so the PCIe H100 comes before the SXM one. MFU is taken against these whatever the run's dtype, as
# nanoGPT does.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device_name: str) -> float | None:
    """The peak FLOP/s of a device by its name, or None where unknown (a CPU, another GPU): no MFU then."""
    return next((peak for key, peak in PEAK_FLOPS if key in device_name), None)


def _model(cfg: TrainConfig, vocab_size: int) -> GPT2:
    if cfg.init_from:
        model = GPT2.from_pretrained(cfg.init_from)
        if model.quantization is not None:
            raise ValueError(f"{cfg.init_from} holds {model.quantization} weights, which are for inference; "
                             f"train from the fp32 checkpoint")
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"{cfg.init_from} has {model.config.vocab_size} tokens, the tokenizer {vocab_size}")
        if cfg.block_size > model.config.n_positions:
            raise ValueError(f"block_size ({cfg.block_size}) exceeds the context of {cfg.init_from} "
                             f"({model.config.n_positions} positions)")
        _set_dropout(model, cfg.dropout)
        return model.train()
    shape = {name: getattr(cfg, name) for name in ("n_layer", "n_head", "n_embd") if getattr(cfg, name)}
    config = GPT2Config.from_preset(cfg.preset, vocab_size=vocab_size, n_positions=cfg.block_size,
                                    dropout=cfg.dropout, **shape)
    return GPT2(config)


def _set_dropout(model: GPT2, p: float) -> None:
    """A loaded model with the run's dropout (a checkpoint's config.json carries none that loading keeps)."""
    model.config.dropout = p  # what its saved config.json then says
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def _optimizer(model: GPT2, cfg: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's grouping: weight decay on the matrices (embeddings included), none on biases and LayerNorm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=True)


class CastForward(nn.Module):
    """`model` run with its weights cast to `dtype`: the low-precision matmuls of autocast, while the
    optimizer keeps fp32 weights (the cast is differentiable, so the gradients arrive in fp32).

    torch.autocast itself would hand the ops bf16 activations with fp32 LayerNorm weights, which they
    refuse; here every tensor of the forward has one dtype. The ops keep LayerNorm statistics and softmax
    in fp32, and loss_fn the loss.
    """

    def __init__(self, model: GPT2, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        weights = {name: p.to(self.dtype) for name, p in self.model.named_parameters()}
        return torch.func.functional_call(self.model, weights, (input_ids,), kwargs)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's fused LM head + cross-entropy (ops.linear_cross_entropy): the [B*T, V] logits are never
    all held at once, and the loss comes in fp32 whatever the forward's dtype."""
    return model(x, targets=y)


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, cfg: TrainConfig, seed: int, device) -> float:
    """Mean loss over eval_iters random windows, the same windows every call (a fixed seed)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    losses = [loss_fn(model, *get_batch(data, cfg.batch_size, cfg.block_size, g, device)).item()
              for _ in range(cfg.eval_iters)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate_full(model: nn.Module, data: torch.Tensor, cfg: TrainConfig, device) -> float:
    """Mean loss over every token of `data`, in consecutive windows of block_size (each from a fresh context)."""
    model.eval()
    T = cfg.block_size
    n = (len(data) - 1) // T
    x, y = data[: n * T].long().view(n, T), data[1: n * T + 1].long().view(n, T)
    total = sum(loss_fn(model, xb.to(device), yb.to(device)).item() * len(xb)
                for xb, yb in zip(x.split(4 * cfg.batch_size), y.split(4 * cfg.batch_size)))
    model.train()
    return total / n


@dataclass
class TrainState:
    """What a checkpoint holds beside the weights and the optimizer, so that a resumed run goes on as one."""

    iter: int = 0  # iterations done
    seconds: float = 0.0  # the run's clock: from after data loading, compilation and evaluation included
    train_seconds: float = 0.0  # the part spent in training iterations (throughput and MFU)
    losses: list[float] = field(default_factory=list)  # the training loss of every iteration
    history: list[dict] = field(default_factory=list)  # the periodic estimates
    target: dict | None = None  # {"iter", "seconds"} where the validation estimate first reached target_val_loss


class TrainingDiverged(ValueError):
    """A loss or a weight stopped being finite: the run ends at once, with no checkpoint written from it."""


def commit_checkpoint(out: Path, it: int, write: Callable[[Path], None]) -> None:
    """A checkpoint of iteration `it`, its files written by `write(folder)`, committed as a whole by the
    replacement of the `latest` link (see the module docstring)."""
    name = f"checkpoint-{it:06d}"
    if name == _committed_name(out):  # the same iteration saved again (a finished run resumed): the other name
        name += "-1"
    staging = out / f"{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    files = {}
    for path in sorted(staging.iterdir()):
        _fsync(path)
        files[path.name] = _sha256(path)
    (staging / MANIFEST_FILE).write_text(json.dumps({"iter": it, "files": files}, indent=2) + "\n")
    _fsync(staging / MANIFEST_FILE)
    _fsync(staging)
    shutil.rmtree(out / name, ignore_errors=True)  # renamed, never committed: left by a kill
    staging.rename(out / name)
    _fsync(out)
    _replace_symlink(out / LATEST, name)
    _fsync(out)
    _link_top_level(out, files)
    remove_stale_checkpoints(out, keep=name)


def committed_checkpoint(out: Path) -> Path:
    """The checkpoint folder that `out/latest` names, every file checked against its manifest."""
    if not (out / LATEST).is_symlink():
        if (out / STATE_FILE).is_file() and not (out / STATE_FILE).is_symlink():
            raise ValueError(f"resume: {out} holds a run saved in the flat layout of an earlier gpt2fast, whose "
                             f"files were written one after another and may come from different iterations, so "
                             f"it cannot be resumed safely; fine-tune from its weights with init_from instead")
        raise FileNotFoundError(f"resume: {out} holds no committed checkpoint (no {LATEST}), so there is no run "
                                f"to continue there")
    folder = out / os.readlink(out / LATEST)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"resume: {manifest_path} is missing, so {folder} cannot be checked as one checkpoint")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"resume: {path} is missing from the checkpoint of iteration {manifest['iter']}")
        if _sha256(path) != digest:
            raise ValueError(f"resume: {path} is not the file saved with the checkpoint of iteration "
                             f"{manifest['iter']} (its sha256 differs from {manifest_path}'s)")
    return folder


def remove_stale_checkpoints(out: Path, keep: str) -> None:
    """Every checkpoint folder of `out` but `keep`: older ones, and those a kill left unfinished or uncommitted."""
    for path in out.glob("checkpoint-*"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def _committed_name(out: Path) -> str | None:
    return os.readlink(out / LATEST) if (out / LATEST).is_symlink() else None


def _link_top_level(out: Path, files: dict) -> None:
    """out's own config.json, model.safetensors, ...: links through `latest`, so out stays a model folder.
    A file this checkpoint lacks (the char vocabulary of an earlier char run) goes."""
    for name in CHECKPOINT_FILES:
        path, target = out / name, f"{LATEST}/{name}"
        if name not in files:
            path.unlink(missing_ok=True)
        elif not path.is_symlink() or os.readlink(path) != target:
            _replace_symlink(path, target)


def _replace_symlink(link: Path, target: str) -> None:
    """`link` pointing at `target` in one step: a new link made aside, then renamed over the old one."""
    aside = link.with_name(f".{link.name}.tmp")
    aside.unlink(missing_ok=True)
    os.symlink(target, aside)
    os.replace(aside, link)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to the disk (a folder's: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the history and final losses, and writes the checkpoint to cfg.out_dir.

    Under torchrun (RANK and WORLD_SIZE set) every rank calls this; rank 0 evaluates, saves and reports.
    """
    dist = Distributed.start(cfg.device)
    try:
        if cfg.gradient_accumulation_steps % dist.world_size:
            raise ValueError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple "
                             f"of the number of processes ({dist.world_size})")
        if dist.is_main:
            _prepare_out_dir(cfg.out_dir)
        started = time.perf_counter()
        text = cfg.data or default_data_dir() / "tinyshakespeare.txt"
        with dist.main_first():
            data = tokenize_text(text, _vocabulary(cfg), cfg.cache_dir or None)
        _check_data_fits(data, text, cfg.block_size)
        result = Trainer(cfg, dist, data, data_seconds=time.perf_counter() - started).run()
        # Rank 0 may still be committing the last checkpoint: a rank that tore the group down meanwhile
        # aborted in gloo ("terminate called without an active exception").
        dist.barrier()
        return result
    finally:
        dist.close()


def _prepare_out_dir(out_dir: str) -> None:
    """Create out_dir and write a file there now: a bad path fails before training, not at the first checkpoint."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise ValueError(f"out_dir {out_dir} is not a writable folder: {e.strerror or e}") from None


def _vocabulary(cfg: TrainConfig) -> str | CharTokenizer:
    """The tokenizer for tokenize_text. Fine-tuning at char level reads the text in the checkpoint's own
    alphabet: an alphabet of the text's would give the same characters other ids."""
    if not cfg.init_from or cfg.tokenizer != "char":
        return cfg.tokenizer
    char_vocab = Path(cfg.init_from) / CHAR_VOCAB_FILE
    if not char_vocab.is_file():
        raise ValueError(f"init_from {cfg.init_from} has no {CHAR_VOCAB_FILE}, so its token ids are not "
                         f"characters; pass its vocabulary with tokenizer")
    return CharTokenizer.from_dict(json.loads(char_vocab.read_text()))


def _check_data_fits(data: TokenizedText, text, block_size: int) -> None:
    """Each split must hold a window of block_size + 1 tokens (a batch's inputs and their next tokens)."""
    for split, tokens in (("training", data.train), ("validation", data.val)):
        if len(tokens) <= block_size:
            raise ValueError(f"{text} is too short: its {split} split has {len(tokens)} tokens, and block_size "
                             f"{block_size} needs at least {block_size + 1}")


class Trainer:
    """One run on this process: the model, its optimizer and data, the loop, evaluation and checkpoints."""

    def __init__(self, cfg: TrainConfig, dist: Distributed, data: TokenizedText, data_seconds: float):
        self.cfg, self.dist, self.data, self.data_seconds = cfg, dist, data, data_seconds
        torch.manual_seed(cfg.seed)
        self.model = _model(cfg, data.tokenizer.vocab_size).to(dist.device)
        self.optimizer = _optimizer(self.model, cfg)
        self.data_rng = torch.Generator().manual_seed(cfg.seed)
        self.state = TrainState()
        if cfg.resume:
            self._load()
        elif dist.world_size > 1:
            torch.manual_seed(cfg.seed + dist.rank)  # the same initial weights, different dropout masks
        self.forward = self.model if cfg.dtype == "float32" else CastForward(self.model, DTYPES[cfg.dtype])
        # Evaluation runs the fp32 weights, the model that is saved, on one process.
        self.eval_forward = self.model
        if cfg.compile:
            self.forward, self.eval_forward = torch.compile(self.forward), torch.compile(self.model)
        if dist.world_size > 1:
            ids = [dist.device] if dist.device.type == "cuda" else None
            self.forward = torch.nn.parallel.DistributedDataParallel(self.forward, device_ids=ids)
        self.micro_steps = cfg.gradient_accumulation_steps // dist.world_size
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        self.flops_per_token = flops_per_token(self.model.config, cfg.block_size)
        self.peak = peak_flops(torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "")

    def run(self) -> dict:
        cfg, state = self.cfg, self.state
        self.session_start = self.window_start = time.perf_counter()
        self.seconds_before = self.elapsed = state.seconds
        self.pending: list[torch.Tensor] = []
        with tqdm(total=cfg.max_iters, initial=state.iter, disable=not (cfg.progress and self.dist.is_main),
                  desc="train", dynamic_ncols=True, mininterval=0.5) as self.bar:
            it, stopped = self._loop(state.iter)
        seconds = self.elapsed  # the run's time: its final evaluation over the whole split is left out
        val_loss = None
        if not stopped:
            self._evaluate(it)
            if self.dist.is_main:
                val_loss = evaluate_full(self.eval_forward, self.data.val, cfg, self.dist.device)
                tqdm.write(f"final: validation loss over the whole split {val_loss:.4f}")
            self._save(it)
        return self._result(it, seconds, val_loss, completed=not stopped)

    def _loop(self, start_iter: int) -> tuple[int, bool]:
        """The iterations from start_iter, with the periodic evaluations and checkpoints; returns the iteration
        reached and whether stop_at_iter ended the session."""
        cfg, it = self.cfg, start_iter
        while it < cfg.max_iters:
            if it > start_iter and (it % cfg.eval_interval == 0 or it == cfg.stop_at_iter):
                self._settle(it)
                if it % cfg.eval_interval == 0:
                    self._evaluate(it)
                self._save(it)
                if it == cfg.stop_at_iter:
                    return it, True
            self.pending.append(self._step(it))
            it += 1
            if it % cfg.log_interval == 0:
                self._flush()
                if cfg.max_seconds and self.elapsed > cfg.max_seconds:
                    break
        self._settle(it)
        return it, False

    def _step(self, it: int) -> torch.Tensor:
        """One iteration; returns its loss (on the device, unread: reading waits for the device)."""
        cfg, dist = self.cfg, self.dist
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(it, cfg, self.elapsed)
        # Every rank draws the whole global batch from the same generator and runs its own micro-batches of
        # it, so an iteration sees the same sequences however many processes share it.
        x, y = get_batch(self.data.train, cfg.gradient_accumulation_steps * cfg.batch_size, cfg.block_size,
                         self.data_rng)
        first = dist.rank * self.micro_steps
        total = torch.zeros((), device=dist.device)
        for m in range(first, first + self.micro_steps):
            rows = slice(m * cfg.batch_size, (m + 1) * cfg.batch_size)
            last = m == first + self.micro_steps - 1
            # Gradients are averaged across ranks once per iteration, on the last micro-batch's backward.
            with contextlib.nullcontext() if last or dist.world_size == 1 else self.forward.no_sync():
                loss = loss_fn(self.forward, to_device(x[rows], dist.device), to_device(y[rows], dist.device))
                (loss / self.micro_steps).backward()
            total += loss.detach() / self.micro_steps
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _clock(self) -> float:
        return self.seconds_before + time.perf_counter() - self.session_start

    def _flush(self) -> None:
        """Read the pending losses (averaged over the ranks) and agree on the clock; update the progress bar."""
        now = time.perf_counter()
        if self.pending:
            n = len(self.pending)
            losses = self.dist.mean(torch.stack(self.pending)).tolist()
            self.pending.clear()
            bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
            if bad is not None:
                raise self._diverged(f"the loss of iteration {len(self.state.losses) + bad} is {losses[bad]}")
            self.state.losses += losses
            window = now - self.window_start
            self.state.train_seconds += window
            tokens_per_second = n * self.tokens_per_iter / window
            history = self.state.history
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{self.state.losses[-1]:.3f}", tok_s=f"{tokens_per_second:,.0f}",
                                 mfu=self._mfu(tokens_per_second),
                                 val=f"{history[-1]['val_loss']:.3f}" if history else "-")
        self.window_start = now
        self.elapsed = self.dist.agree(self._clock())

    def _settle(self, it: int) -> None:
        """Read the pending losses and check the weights: nothing non-finite is ever evaluated or saved (the
        last step's update shows in no loss yet)."""
        self._flush()
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            raise self._diverged(f"the weights are not finite after {it} iterations")

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(f"training diverged: {what}; it stops here and saves nothing more, so the last "
                                f"checkpoint in {self.cfg.out_dir} (if any) stays as it was; try a lower lr")

    def _mfu(self, tokens_per_second: float) -> str:
        if self.peak is None:
            return "n/a"
        return f"{self.flops_per_token * tokens_per_second / self.dist.world_size / self.peak:.1%}"

    def _evaluate(self, it: int) -> None:
        """The periodic estimate on rank 0 (the others wait at their next collective)."""
        state = self.state
        if self.dist.is_main and not (state.history and state.history[-1]["iter"] == it):
            seconds = self._clock()
            record = {"iter": it, "seconds": round(seconds, 2),
                      "train_loss": evaluate(self.eval_forward, self.data.train, self.cfg, 1, self.dist.device),
                      "val_loss": evaluate(self.eval_forward, self.data.val, self.cfg, 2, self.dist.device)}
            tqdm.write(f"iter {it:>6}  {seconds:7.1f} s  train loss {record['train_loss']:.4f}  "
                       f"val loss {record['val_loss']:.4f}")
            state.history.append(record)
            if self.cfg.target_val_loss and state.target is None and record["val_loss"] <= self.cfg.target_val_loss:
                state.target = {"iter": it, "seconds": record["seconds"]}
        self.window_start = time.perf_counter()

    def _save(self, it: int) -> None:
        """The checkpoint, committed as a whole (see the module docstring); rank 0 writes it."""
        self.state.iter, self.state.seconds = it, self._clock()
        cuda = self.dist.device.type == "cuda"
        rng = {"torch": self.dist.gather(torch.get_rng_state()),
               "cuda": self.dist.gather(torch.cuda.get_rng_state(self.dist.device)) if cuda else None,
               "data": self.data_rng.get_state()}
        if self.dist.is_main:
            commit_checkpoint(Path(self.cfg.out_dir), it, lambda folder: self._write(folder, rng))
        self.window_start = time.perf_counter()

    def _write(self, folder: Path, rng: dict) -> None:
        """The files of a checkpoint: the HF folder, the char vocabulary, the training state and the log."""
        self.model.save_pretrained(folder)
        if isinstance(self.data.tokenizer, CharTokenizer):
            (folder / CHAR_VOCAB_FILE).write_text(json.dumps(self.data.tokenizer.to_dict()) + "\n")
        config = dataclasses.asdict(self.cfg)
        torch.save({"state": dataclasses.asdict(self.state), "optimizer": self.optimizer.state_dict(), "rng": rng,
                    "config": config}, folder / STATE_FILE)
        log_record = {"config": config, "history": self.state.history, "losses": self.state.losses}
        (folder / LOG_FILE).write_text(json.dumps(log_record, indent=2) + "\n")

    def _load(self) -> None:
        from safetensors.torch import load_file

        out = Path(self.cfg.out_dir)
        folder = committed_checkpoint(out)
        saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        rng = saved["rng"]
        if len(rng["torch"]) != self.dist.world_size:
            raise ValueError(f"resume: the run in {out} had {len(rng['torch'])} processes, this one has "
                             f"{self.dist.world_size}; resume it with as many")
        load_hf_state_dict(self.model, load_file(str(folder / "model.safetensors")))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.data_rng.set_state(rng["data"])
        torch.set_rng_state(rng["torch"][self.dist.rank])
        if rng["cuda"] is not None and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][self.dist.rank], self.dist.device)
        self.state = TrainState(**saved["state"])
        if self.dist.is_main:
            remove_stale_checkpoints(out, keep=folder.name)

    def _result(self, it: int, seconds: float, val_loss: float | None, completed: bool) -> dict:
        state, cfg = self.state, self.cfg
        plot = None
        if self.dist.is_main and plot_losses(Path(cfg.out_dir) / PLOT_FILE, state.losses, state.history):
            plot = str(Path(cfg.out_dir) / PLOT_FILE)
        tokens = it * self.tokens_per_iter
        train_tps = tokens / state.train_seconds if state.train_seconds else 0.0
        if self.dist.is_main and not completed:
            tqdm.write(f"stopped at iteration {it} of {cfg.max_iters}; resume continues from here")
        return {"history": state.history, "losses": state.losses,
                "train_loss": state.history[-1]["train_loss"] if state.history else None, "val_loss": val_loss,
                "iters": it, "completed": completed, "seconds": round(seconds, 2),
                "tokens_per_second": tokens / seconds if seconds else 0.0,
                "train_tokens_per_second": train_tps,
                "mfu": self.flops_per_token * train_tps / self.dist.world_size / self.peak if self.peak else None,
                "flops_per_token": self.flops_per_token, "peak_flops": self.peak,
                "target_val_loss": cfg.target_val_loss or None,
                "iter_to_target": state.target["iter"] if state.target else None,
                "seconds_to_target": state.target["seconds"] if state.target else None,
                "data_seconds": round(self.data_seconds, 2), "world_size": self.dist.world_size,
                "plot": plot, "out_dir": cfg.out_dir}


def plot_losses(path: Path, losses: list[float], history: list[dict]) -> bool:
    """Train and validation loss against the iteration, as a PNG; False (and one log line) without matplotlib."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend to change
    except ImportError:
        log.warning("gpt2fast: matplotlib is not installed, so no loss plot (pip install matplotlib)")
        return False
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.plot(range(len(losses)), losses, lw=0.6, alpha=0.45, label="train (each iteration's batch)")
    iters = [h["iter"] for h in history]
    ax.plot(iters, [h["train_loss"] for h in history], "o-", label="train (estimate)")
    ax.plot(iters, [h["val_loss"] for h in history], "o-", label="validation (estimate)")
    ax.set(xlabel="iteration", ylabel="loss (nats per token)", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True
