"""Hugging Face GPT-2 checkpoints in and out: folders, hub names, live `transformers` models.

Loading builds the class it is given (`cls`: `Transformer` or a subclass, such as `gpt2fast.GPT2`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from pathlib import Path

import torch

from .config import GPT2Config
from .model import Transformer
from .quantize import SCHEMES

log = logging.getLogger("gpt2fast")

# No tensor is transposed: gpt2fast keeps HF's Conv1D layout, [in, out], for every linear weight.
# Buffers some checkpoints carry (the causal mask, a -1e4 constant): derived, never weights.
IGNORED = (".attn.bias", ".attn.masked_bias")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
REQUIRED_CONFIG_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
# Weights in these dtypes are cast to the model's; any other (an integer, a bool, a float8) is refused, but for
# the int8 weights of gpt2fast's own quantized checkpoints.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# A quantized checkpoint's config.json says so, as transformers' quantized ones do: a loader that does not know
# the method refuses it by name (transformers: "Unknown quantization type") rather than misreading int8 weights.
QUANT_METHOD = "gpt2fast"


def quantization_from_hf(hf: dict) -> str | None:
    """The weights' scheme of a gpt2fast-quantized config.json dict (see gpt2fast.quantize), or None if the
    weights are plain; another quantization method is refused by name."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != QUANT_METHOD:
        raise ValueError(f"unsupported GPT-2 config: quantization_config with quant_method {method!r}: gpt2fast reads "
                         f"plain fp16/bf16/fp32 checkpoints and its own quantized ones (quant_method {QUANT_METHOD!r})")
    if q.get("weights") not in SCHEMES:
        raise ValueError(f"unsupported GPT-2 config: quantization_config.weights must be one of {SCHEMES}, "
                         f"got {q.get('weights')!r}")
    return q["weights"]


def quantization_to_hf(scheme: str) -> dict:
    return {"quantization_config": {
        "quant_method": QUANT_METHOD, "weights": scheme,
        "layout": "every matmul weight [out, in] (the LM head's: wte.weight), int8 with an fp32 scale per output "
                  "channel (<name>.scale) or bf16; biases, LayerNorms and wpe fp32"}}


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
    # reorder_and_upcast_attn only changes precision; every backend already computes softmax in fp32.
    config = GPT2Config(vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
                        n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"),
                        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), eos_token_id=None)
    eos = hf.get("eos_token_id", 50256)  # random test configs often keep 50256 with a smaller vocabulary
    return dataclasses.replace(config, eos_token_id=eos if isinstance(eos, int) and 0 <= eos < config.vocab_size
                               else None)


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


def _from_hf_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF tensor names -> ours. Accepts GPT2LMHeadModel ("transformer." prefix) and GPT2Model keys, not both.

    lm_head.weight is dropped: the head is tied to wte, so it must equal wte.weight."""
    incoming, hf_names = {}, {}
    for name, tensor in state.items():
        if name == "lm_head.weight" or name.endswith(IGNORED):
            continue
        ours = name.removeprefix("transformer.")
        if ours in hf_names:
            raise ValueError(f"{source} holds both {hf_names[ours]} and {name}; which one to load is ambiguous")
        incoming[ours], hf_names[ours] = tensor, name
    lm_head, wte = state.get("lm_head.weight"), incoming.get("wte.weight")
    if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight; an untied LM head is not supported")
    return incoming


def _check_tensors(expected: dict[str, tuple[int, ...]], incoming: dict[str, torch.Tensor], source: str,
                   dtypes: dict[str, torch.dtype] | None = None) -> None:
    """Names every missing, unexpected or mis-shaped tensor, given the expected shape of each, and with the
    model's dtypes, every integer tensor (quantized weights) not met by one of the same dtype: copying across
    would convert it."""
    missing = sorted(expected.keys() - incoming.keys())
    unexpected = sorted(incoming.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(f"{source} does not match the config: missing tensors {missing}, "
                       f"unexpected tensors {unexpected}")
    for name, tensor in incoming.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        want = (dtypes or {}).get(name, tensor.dtype)
        if tensor.dtype != want and not (tensor.is_floating_point() and want.is_floating_point):
            raise ValueError(f"{source}: tensor {name} is {tensor.dtype}, expected {want} "
                             f"(quantized weights load only into a model quantized the same way)")


def _check_sizes(config: GPT2Config, incoming: dict[str, torch.Tensor], source: str, quantized: bool = False) -> None:
    """The config's sizes against the tensors that carry them, before a model of those sizes is built:
    a config.json asking for a million layers or a 10**30-token vocabulary must not hang or overflow."""
    layers = len({name.split(".")[1] for name in incoming if name.startswith("h.")})
    if config.n_layer > layers:
        raise KeyError(f"{source} does not match the config: it holds {layers} layers, "
                       f"config.json has n_layer={config.n_layer}")
    carriers = {"wte.weight": (config.vocab_size, config.n_embd), "wpe.weight": (config.n_positions, config.n_embd),
                "h.0.mlp.c_fc.weight": (config.n_embd, config.mlp_width)}
    if quantized:  # stored [out, in]
        carriers["h.0.mlp.c_fc.weight"] = (config.mlp_width, config.n_embd)
    _check_tensors(carriers, {name: incoming[name] for name in carriers if name in incoming}, source)


def _shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _dtypes(model: Transformer) -> dict[str, torch.dtype]:
    return {name: tensor.dtype for name, tensor in model.state_dict().items()}


def _copy_into(model: Transformer, incoming: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(incoming[name])


def load_hf_state_dict(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Copy an HF GPT-2 state dict into `model`, naming every missing, unexpected or mis-shaped tensor."""
    incoming = _from_hf_state_dict(state, "checkpoint")
    _check_tensors(_shapes(model), incoming, "checkpoint")
    _copy_into(model, incoming)


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our tensors under HF GPT2LMHeadModel names; the tied lm_head.weight is left out, as HF saves it."""
    return {f"transformer.{name}": t.contiguous() for name, t in model.state_dict().items()}


def _read_json_object(path: Path) -> dict:
    _require_file(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # not UTF-8, or not JSON
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _require_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")


def _read_config(path: Path) -> tuple[GPT2Config, str | None]:
    """The config, and the weights' scheme where gpt2fast quantized them (see quantization_from_hf)."""
    hf = _read_json_object(path)
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in hf]
    if missing:
        raise ValueError(f"{path} lacks the required keys {missing}")
    try:
        return config_from_hf(hf), quantization_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} was refused as unsafe and not loaded: torch.load(weights_only=True) met "
                         f"{_unpickler_reason(e)} in it, which a file of tensors does not hold (a pickle that "
                         f"could run code when loaded, or a corrupt file)") from None
    except Exception as e:  # on damaged bytes torch's reader fails in many ways: EOFError, IndexError, OSError...
        detail = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable PyTorch weights file (truncated or corrupt?): {detail}") from None


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only refusal says it met, without its advice to load the file unsafely."""
    found = re.search(r"GLOBAL [\w.]+|operand \S+", str(error))
    return found.group() if found else "an object it does not load"


def _read_weight_file(path: Path, parse, dtypes=FLOAT_DTYPES) -> dict[str, torch.Tensor]:
    """One weights file, refused unless it maps names to dense floating-point tensors that are all finite."""
    _require_file(path)
    state = parse(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold tensors by name, not a {type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a named tensor")
        if not name.endswith(IGNORED):
            _check_weight(path, name, tensor, dtypes)
    return state


def _check_weight(path: Path, name: str, tensor: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if tensor.layout != torch.strided or tensor.device.type != "cpu":
        raise ValueError(f"{path}: tensor {name} is a {tensor.layout} tensor on {tensor.device}, "
                         f"not a dense tensor in memory")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{path}: tensor {name} has dtype {tensor.dtype}; weights must be one of "
                         f"{', '.join(map(str, dtypes))}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: tensor {name} holds NaN or infinite values (a damaged file?)")


def _read_shards(index: Path, parse, dtypes=FLOAT_DTYPES) -> dict[str, torch.Tensor]:
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index} has no weight_map from tensor names to shard file names")
    state = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not _inside(index.parent, path):
            raise ValueError(f"{index}: shard {shard!r} lies outside {index.parent}; refused")
        tensors = _read_weight_file(path, parse, dtypes)
        mapped = {name for name, file in weight_map.items() if file == shard}
        # Each shard must hold exactly what the index maps to it: a tensor held twice would otherwise be
        # taken from whichever shard came last.
        if tensors.keys() != mapped:
            raise KeyError(f"{path} disagrees with {index}: tensors mapped to it that it lacks: "
                           f"{sorted(mapped - tensors.keys())}; tensors it holds that are not mapped to it: "
                           f"{sorted(tensors.keys() - mapped)}")
        state.update(tensors)
    return state


def _inside(folder: Path, path: Path) -> bool:
    """Whether `path`, links followed, lies in `folder`, or in the blobs of the hub cache it is a snapshot of."""
    root = folder.resolve()
    roots = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    return any(path.resolve().is_relative_to(r) for r in roots)


def _read_weights(folder: Path, dtypes=FLOAT_DTYPES) -> tuple[dict[str, torch.Tensor], Path]:
    """The weights in `folder`, and the file they were found through (a weights file or a shard index)."""
    for name, parse in (("model.safetensors.index.json", _read_safetensors),
                        ("pytorch_model.bin.index.json", _read_bin)):
        if (folder / name).exists():
            return _read_shards(folder / name, parse, dtypes), folder / name
    for name, parse in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_bin)):
        if (folder / name).exists():
            return _read_weight_file(folder / name, parse, dtypes), folder / name
    raise FileNotFoundError(f"{folder} has no GPT-2 weights: expected model.safetensors, a sharded "
                            f"model.safetensors.index.json, or pytorch_model.bin")


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


def _checkpoint_folder(name_or_path) -> Path:
    folder = Path(name_or_path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; pass the folder holding config.json and the weights")
    if not folder.is_dir():
        folder = _download(str(name_or_path))
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face GPT-2 folder")
    return folder


def from_pretrained(name_or_path, dtype: torch.dtype | None = None, device=None, *, weights: str | None = None,
                    cls: type[Transformer] = Transformer) -> Transformer:
    """weights: None keeps the checkpoint's (plain, or as gpt2fast quantized them); "int8" or "bf16" quantizes
    plain weights after loading (see gpt2fast.quantize), or asks for what a quantized checkpoint holds."""
    folder = _checkpoint_folder(name_or_path)
    config, stored = _read_config(folder / "config.json")
    if weights is not None and stored is not None and weights != stored:
        raise ValueError(f"{folder} holds {stored} weights; weights={weights!r} asks for others (load the plain "
                         f"checkpoint to quantize it another way)")
    state, source = _read_weights(folder, FLOAT_DTYPES if stored is None else FLOAT_DTYPES + (torch.int8,))
    incoming = _from_hf_state_dict(state, str(source))
    _check_sizes(config, incoming, str(source), quantized=stored is not None)
    with torch.device("meta"):
        model = cls(config)
        if stored is not None:
            model.quantize(stored)
    _check_tensors(_shapes(model), incoming, str(source), _dtypes(model))
    model = model.to_empty(device="cpu")
    _copy_into(model, incoming)
    model = model.to(device=device, dtype=dtype).eval()
    return model.quantize(weights) if weights is not None and stored is None else model


def from_hf(hf_model, *, cls: type[Transformer] = Transformer) -> Transformer:
    """A live transformers GPT2LMHeadModel (or GPT2Model) -> a `cls` with the same weights (copied)."""
    config = config_from_hf(hf_model.config.to_dict())
    model = cls(config)
    load_hf_state_dict(model, hf_model.state_dict())
    p = next(hf_model.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()


def save_pretrained(model: Transformer, path) -> None:
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model.config) | {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    if model.quantization is not None:
        hf_config |= quantization_to_hf(model.quantization)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(to_hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
