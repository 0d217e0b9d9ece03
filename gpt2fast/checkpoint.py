"""Hugging Face GPT-2 checkpoints in and out: folders, hub names, live `transformers` models."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import GPT2Config
from .model import GPT2

log = logging.getLogger("gpt2fast")

# No tensor is transposed: gpt2fast keeps HF's Conv1D layout, [in, out], for every linear weight.
# Buffers some checkpoints carry (the causal mask, a -1e4 constant): derived, never weights.
IGNORED = (".attn.bias", ".attn.masked_bias")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def config_from_hf(hf: dict) -> GPT2Config:
    """Our config from an HF config.json dict; flags we would not honour are refused by name."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"not a GPT-2 checkpoint: model_type is {hf.get('model_type')!r}")
    refusals = {
        "activation_function": (hf.get("activation_function", "gelu_new") in TANH_GELUS,
                                f"must be one of {TANH_GELUS} (GELU with the tanh approximation)"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), "False (unscaled attention) is not supported"),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx", False),
                                            "True is not supported"),
        "add_cross_attention": (not hf.get("add_cross_attention", False), "cross-attention is not supported"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), "an untied LM head is not supported"),
    }
    for flag, (ok, why) in refusals.items():
        if not ok:
            raise ValueError(f"unsupported GPT-2 config: {flag}={hf.get(flag)!r}: {why}")
    eos = hf.get("eos_token_id", 50256)  # random test configs often keep 50256 with a smaller vocabulary
    # reorder_and_upcast_attn only changes precision; every backend already computes softmax in fp32.
    return GPT2Config(vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
                      n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"),
                      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                      eos_token_id=eos if isinstance(eos, int) and 0 <= eos < hf["vocab_size"] else None)


def config_to_hf(config: GPT2Config) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.n_positions, "n_ctx": config.n_positions,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.n_inner,
        "activation_function": "gelu_new", "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": config.eos_token_id, "eos_token_id": config.eos_token_id,
    }


def _from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensor names -> ours. Accepts GPT2LMHeadModel ("transformer." prefix) and GPT2Model keys.

    lm_head.weight is dropped: the head is tied to wte (load_hf_state_dict checks they are equal)."""
    return {name.removeprefix("transformer."): tensor for name, tensor in state.items()
            if name != "lm_head.weight" and not name.endswith(IGNORED)}


def load_hf_state_dict(model: GPT2, state: dict[str, torch.Tensor]) -> None:
    """Copy an HF GPT-2 state dict into `model`, naming every missing, unexpected or mis-shaped tensor."""
    lm_head, wte = state.get("lm_head.weight"), state.get("transformer.wte.weight", state.get("wte.weight"))
    if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
        raise ValueError("checkpoint: lm_head.weight differs from wte.weight; an untied LM head is not supported")
    incoming = _from_hf_state_dict(state)
    expected = model.state_dict()
    missing = sorted(expected.keys() - incoming.keys())
    unexpected = sorted(incoming.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the config: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, tensor in incoming.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(incoming[name])


def to_hf_state_dict(model: GPT2) -> dict[str, torch.Tensor]:
    """Our tensors under HF GPT2LMHeadModel names; the tied lm_head.weight is left out, as HF saves it."""
    return {f"transformer.{name}": t.contiguous() for name, t in model.state_dict().items()}


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        if (folder / index_name).exists():
            shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(loader(str(folder / shard)))
            return state
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return _load_bin(str(folder / "pytorch_model.bin"))
    raise FileNotFoundError(f"{folder} has no GPT-2 weights: expected model.safetensors, a sharded "
                            f"model.safetensors.index.json, or pytorch_model.bin")


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _download(name: str) -> Path:
    """A hub model name -> a local snapshot folder, or a clear error saying what to download."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                                             "vocab.json", "merges.txt", "tokenizer.json"]))
    except Exception as e:
        raise FileNotFoundError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, download config.json and "
            f"model.safetensors from https://huggingface.co/{name} into a folder and pass that folder; "
            f"presets without weights: GPT2(GPT2Config.from_preset(...)).") from None


def from_pretrained(name_or_path, dtype: torch.dtype | None = None, device=None) -> GPT2:
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = _download(str(name_or_path))
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face GPT-2 folder")
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = GPT2(config)
    model = model.to_empty(device="cpu")
    load_hf_state_dict(model, _read_weights(folder))
    return model.to(device=device, dtype=dtype).eval()


def from_hf(hf_model) -> GPT2:
    """A live transformers GPT2LMHeadModel (or GPT2Model) -> GPT2 with the same weights (copied)."""
    config = config_from_hf(hf_model.config.to_dict())
    model = GPT2(config)
    load_hf_state_dict(model, hf_model.state_dict())
    p = next(hf_model.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()


def save_pretrained(model: GPT2, path) -> None:
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model.config) | {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(to_hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
