"""Hugging Face checkpoints in and out: random HF GPT-2 models saved, loaded, compared, and refused."""
from __future__ import annotations

import json
import os
import pickle
import re

import huggingface_hub.constants
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gpt2fast import GPT2
from gpt2fast.cli import main

from helpers import assert_logits_close, build_hf, hf_greedy, hf_logits, random_ids, write_config

CONFIGS = {
    "60x5-L2-v101": dict(vocab_size=101, n_embd=60, n_head=5, n_layer=2, n_positions=64),
    "48x3-L1-v50257": dict(vocab_size=50257, n_embd=48, n_head=3, n_layer=1, n_positions=48),
    "96x4-L4-inner72-eps1e-3": dict(vocab_size=101, n_embd=96, n_head=4, n_layer=4, n_positions=48,
                                    n_inner=72, layer_norm_epsilon=1e-3),
    "36x3-L3-v257-tanh-reorder": dict(vocab_size=257, n_embd=36, n_head=3, n_layer=3, n_positions=40,
                                      activation_function="gelu_pytorch_tanh", reorder_and_upcast_attn=True),
}
SMALL = CONFIGS["60x5-L2-v101"]
PROMPT = 8
NEW = 32


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(HF model, folder it was saved to with save_pretrained, prompts), one per config."""
    hf = build_hf(seed=len(request.param), **CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, folder, random_ids(hf.config.vocab_size, 2, PROMPT, seed=1)


@pytest.fixture(scope="module")
def small_hf():
    return build_hf(seed=3, **SMALL)


def hf_tensors(hf) -> dict[str, torch.Tensor]:
    """HF's state dict as save_pretrained writes it: the tied lm_head.weight left out."""
    return {k: v.detach().clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def write_checkpoint(folder, hf, state=None, **config_changes):
    write_config(folder, hf, **config_changes)
    save_file(hf_tensors(hf) if state is None else state, str(folder / "model.safetensors"))
    return folder


# ---- loading matches HF ----

def test_from_pretrained_logits_match_hf(saved):
    hf, folder, ids = saved
    model = GPT2.from_pretrained(folder)
    c = hf.config
    assert (model.config.vocab_size, model.config.n_positions, model.config.n_embd, model.config.n_layer,
            model.config.n_head, model.config.n_inner, model.config.layer_norm_epsilon) == (
        c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head, c.n_inner, c.layer_norm_epsilon)
    assert model.dtype == torch.float32 and not model.training
    with torch.no_grad():
        assert_logits_close(model(ids), hf_logits(hf, ids))


def test_from_pretrained_greedy_matches_hf(saved):
    hf, folder, ids = saved
    model = GPT2.from_pretrained(folder)
    assert torch.equal(model.generate(ids, NEW, do_sample=False), hf_greedy(hf, ids, NEW))


def test_from_hf_matches_hf_and_copies_the_weights(saved):
    hf, _, ids = saved
    model = GPT2.from_hf(hf)
    assert model.wte.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        assert_logits_close(model(ids), hf_logits(hf, ids))
    assert torch.equal(model.generate(ids, NEW, do_sample=False), hf_greedy(hf, ids, NEW))


def test_save_pretrained_loads_in_transformers(saved, tmp_path):
    hf, folder, ids = saved
    model = GPT2.from_pretrained(folder)
    model.save_pretrained(tmp_path)
    back, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.config.n_inner == hf.config.n_inner
    assert back.config.layer_norm_epsilon == hf.config.layer_norm_epsilon
    with torch.no_grad():
        assert_logits_close(hf_logits(back, ids), model(ids))
    # And back into gpt2fast, bit for bit.
    again = GPT2.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


# ---- file formats ----

def test_sharded_safetensors(small_hf, tmp_path):
    small_hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    ids = random_ids(101, 2, 12)
    with torch.no_grad():
        assert_logits_close(GPT2.from_pretrained(tmp_path)(ids), hf_logits(small_hf, ids))


def test_pytorch_model_bin(small_hf, tmp_path):
    # transformers 5 always writes safetensors, so the legacy file is written as older versions did.
    write_config(tmp_path, small_hf)
    torch.save(small_hf.state_dict(), tmp_path / "pytorch_model.bin")  # with the tied lm_head.weight
    ids = random_ids(101, 2, 12)
    with torch.no_grad():
        assert_logits_close(GPT2.from_pretrained(tmp_path)(ids), hf_logits(small_hf, ids))


def test_sharded_pytorch_model_bin(small_hf, tmp_path):
    write_config(tmp_path, small_hf)
    state = hf_tensors(small_hf)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = random_ids(101, 2, 12)
    with torch.no_grad():
        assert_logits_close(GPT2.from_pretrained(tmp_path)(ids), hf_logits(small_hf, ids))


@pytest.mark.parametrize("file", ["pytorch_model.bin", "model.safetensors"])
def test_gpt2model_keys_with_legacy_attention_buffers(small_hf, tmp_path, file):
    """The layout of OpenAI's original upload: GPT2Model names (no "transformer."), plus mask buffers."""
    n = small_hf.config.n_positions
    state = {k.removeprefix("transformer."): v for k, v in hf_tensors(small_hf).items()}
    for i in range(small_hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    write_config(tmp_path, small_hf)
    if file == "model.safetensors":
        save_file(state, str(tmp_path / file))
    else:
        torch.save(state, tmp_path / file)
    ids = random_ids(101, 2, 12)
    with torch.no_grad():
        assert_logits_close(GPT2.from_pretrained(tmp_path)(ids), hf_logits(small_hf, ids))


@pytest.mark.parametrize("dtype, rel", [(torch.bfloat16, 5e-2), (torch.float64, 1e-4)])
def test_from_pretrained_dtype_and_device(small_hf, tmp_path, dtype, rel):
    small_hf.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path, dtype=dtype, device="cpu")
    assert model.dtype == dtype and model.device == torch.device("cpu")
    assert all(p.dtype == dtype for p in model.parameters())
    ids = random_ids(101, 2, 12)
    with torch.no_grad():
        logits = model(ids)
        assert logits.dtype == dtype
        assert_logits_close(logits, hf_logits(small_hf, ids), rel=rel)


def test_from_hf_takes_a_gpt2model_without_lm_head(small_hf):
    base = transformers.GPT2Model(small_hf.config).eval()
    base.load_state_dict(small_hf.transformer.state_dict())
    ids = random_ids(101, 2, 12)
    with torch.no_grad():
        assert_logits_close(GPT2.from_hf(base)(ids), hf_logits(small_hf, ids))


def test_from_hf_keeps_the_hf_dtype():
    hf = build_hf(seed=4, **SMALL).to(torch.bfloat16)
    model = GPT2.from_hf(hf)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.wte.weight, hf.transformer.wte.weight)


# ---- refusals, each by name ----

def test_missing_tensor_is_named(small_hf, tmp_path):
    state = hf_tensors(small_hf)
    del state["transformer.h.1.mlp.c_proj.bias"]
    write_checkpoint(tmp_path, small_hf, state)
    with pytest.raises(KeyError, match=r"missing tensors \['h\.1\.mlp\.c_proj\.bias'\]"):
        GPT2.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(small_hf, tmp_path):
    state = hf_tensors(small_hf) | {"transformer.h.0.mlp.c_gate.weight": torch.zeros(60, 60)}
    write_checkpoint(tmp_path, small_hf, state)
    with pytest.raises(KeyError, match=r"unexpected tensors \['h\.0\.mlp\.c_gate\.weight'\]"):
        GPT2.from_pretrained(tmp_path)


def test_checkpoint_with_more_layers_than_its_config_is_refused(small_hf, tmp_path):
    write_checkpoint(tmp_path, small_hf, n_layer=1)
    with pytest.raises(KeyError, match=r"unexpected tensors \['h\.1\.attn\.c_attn\.bias'"):
        GPT2.from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(small_hf, tmp_path):
    state = hf_tensors(small_hf) | {"transformer.h.0.attn.c_attn.bias": torch.zeros(179)}
    write_checkpoint(tmp_path, small_hf, state)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.bias has shape \(179,\).*expected \(180,\)"):
        GPT2.from_pretrained(tmp_path)


def test_vocabulary_size_disagreeing_with_config_is_named(small_hf, tmp_path):
    write_checkpoint(tmp_path, small_hf, vocab_size=100, eos_token_id=99, bos_token_id=99)
    with pytest.raises(ValueError, match=r"wte\.weight has shape \(101, 60\).*expected \(100, 60\)"):
        GPT2.from_pretrained(tmp_path)


def test_folder_without_weights(small_hf, tmp_path):
    write_config(tmp_path, small_hf)
    with pytest.raises(FileNotFoundError, match="no GPT-2 weights: expected model.safetensors"):
        GPT2.from_pretrained(tmp_path)


def test_folder_without_config(small_hf, tmp_path):
    small_hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    (dict(add_cross_attention=True), "add_cross_attention=True"),
    (dict(model_type="gpt_neo"), "not a GPT-2 checkpoint: model_type is 'gpt_neo'"),
])
def test_unsupported_config_flags_are_refused_by_name(small_hf, tmp_path, change, match):
    write_checkpoint(tmp_path, small_hf, **change)
    with pytest.raises(ValueError, match=match):
        GPT2.from_pretrained(tmp_path)


def test_untied_lm_head_differing_from_wte_is_refused(small_hf, tmp_path):
    state = hf_tensors(small_hf)
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1e-3
    write_checkpoint(tmp_path, small_hf, state)
    with pytest.raises(ValueError, match=named(tmp_path / "model.safetensors",
                                               "lm_head.weight differs from wte.weight")):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("flag, value", [("tie_word_embeddings", False), ("scale_attn_by_inverse_layer_idx", True)])
def test_from_hf_refuses_unsupported_models(flag, value):
    hf = build_hf(seed=5, **SMALL, **{flag: value})
    with pytest.raises(ValueError, match=f"{flag}={value!r}"):
        GPT2.from_hf(hf)


def test_hub_name_offline_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so that "gpt2" is not a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import; mirror it and keep the cache empty.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(FileNotFoundError, match=r"download config\.json and model\.safetensors from "
                                                r"https://huggingface\.co/gpt2 into a folder"):
        GPT2.from_pretrained("gpt2")


# ---- hostile and damaged folders: refused with the file and what is wrong with it ----

def named(path, *words) -> str:
    """A pattern for a message naming `path`, then each of `words`, in that order."""
    return ".*".join(re.escape(str(w)) for w in (path, *words))


def sharded(hf, folder):
    """hf saved in several safetensors shards; returns the folder's index as a dict."""
    hf.save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return index


def write_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class RunsCode:
    """Unpickling this makes a folder: the side effect a malicious pickle would have."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("cut", ["empty", "inside the header length", "inside the header", "inside the data",
                                 "garbage"])
def test_damaged_safetensors_is_refused_naming_the_file(small_hf, tmp_path, cut):
    write_checkpoint(tmp_path, small_hf)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes({"empty": b"", "inside the header length": data[:4],
                      "inside the header": data[:header_end // 2],
                      "inside the data": data[:(header_end + len(data)) // 2],
                      "garbage": bytes(range(256)) * 8}[cut])
    with pytest.raises(ValueError, match=named(path, "not a readable safetensors file")):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused_unloaded(small_hf, tmp_path, writer):
    write_config(tmp_path, small_hf)
    marker = tmp_path / "code-ran"
    state = hf_tensors(small_hf) | {"payload": RunsCode(marker)}
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        if writer == "torch.save":
            torch.save(state, f)
        else:  # a bare pickle, with torch.save's protocol (torch.load warns on newer ones)
            pickle.dump(state, f, protocol=2)
    with pytest.raises(ValueError, match=named(tmp_path / "pytorch_model.bin", "refused as unsafe and not loaded",
                                               "GLOBAL")):
        GPT2.from_pretrained(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("cut, match", [
    ("empty", "not a readable PyTorch weights file"), ("truncated", "not a readable PyTorch weights file"),
    ("garbage", "refused as unsafe and not loaded"),  # a byte no pickle of tensors holds
])
def test_damaged_pytorch_model_bin_is_refused_naming_the_file(small_hf, tmp_path, cut, match):
    write_config(tmp_path, small_hf)
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf_tensors(small_hf), path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "garbage": bytes(range(256)) * 8}[cut])
    with pytest.raises(ValueError, match=named(path, match)):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("contents, match", [
    ([torch.zeros(3)], "must hold tensors by name, not a list"),
    ({"state_dict": {"wte.weight": torch.zeros(3)}}, "entry 'state_dict' is a dict, not a named tensor"),
    ({"wte.weight": torch.zeros(3, device="meta")}, "tensor wte.weight is a torch.strided tensor on meta"),
    ({"wte.weight": torch.eye(3).to_sparse()}, "tensor wte.weight is a torch.sparse_coo tensor"),
])
def test_pytorch_model_bin_holding_more_than_dense_tensors_is_refused(small_hf, tmp_path, contents, match):
    write_config(tmp_path, small_hf)
    torch.save(contents, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=named(tmp_path / "pytorch_model.bin", match)):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not valid JSON"), ("", "is not valid JSON"), ("\udcff", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, not a list"),
])
def test_config_that_is_not_a_json_object_is_refused(small_hf, tmp_path, text, match):
    write_checkpoint(tmp_path, small_hf)
    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=named(tmp_path / "config.json", match)):
        GPT2.from_pretrained(tmp_path)


def test_config_that_is_a_folder_is_refused(small_hf, tmp_path):
    write_checkpoint(tmp_path, small_hf)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ValueError, match=named(tmp_path / "config.json", "is not a file")):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head"])
def test_config_missing_a_required_key_is_refused_by_name(small_hf, tmp_path, key):
    write_checkpoint(tmp_path, small_hf)
    config = json.loads((tmp_path / "config.json").read_text())
    del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named(tmp_path / "config.json", "lacks the required keys", key)):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(n_head=7), "n_embd (60) must be divisible by n_head (7)"),
    (dict(n_layer=-2), "n_layer must be >= 1, got -2"),
    (dict(n_embd="60"), "n_embd must be an integer, got '60'"),
    (dict(n_head=True), "n_head must be an integer, got True"),
    (dict(vocab_size=101.0), "vocab_size must be an integer, got 101.0"),
    (dict(n_inner="240"), "n_inner must be an integer >= 1 or None, got '240'"),
    (dict(layer_norm_epsilon=-1e-5), "layer_norm_epsilon must be a number > 0"),
])
def test_config_values_of_a_wrong_type_or_range_are_refused_by_name(small_hf, tmp_path, change, match):
    write_checkpoint(tmp_path, small_hf, **change)
    with pytest.raises(ValueError, match=named(tmp_path / "config.json", match)):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(n_layer=1000), "it holds 2 layers, config.json has n_layer=1000"),
    (dict(vocab_size=10**30), f"tensor wte.weight has shape (101, 60), expected ({10**30}, 60)"),
    (dict(n_positions=2**62), f"tensor wpe.weight has shape (64, 60), expected ({2**62}, 60)"),
])
def test_config_sizes_far_beyond_the_weights_are_refused_before_building(small_hf, tmp_path, change, match):
    write_checkpoint(tmp_path, small_hf, **change)
    with pytest.raises((KeyError, ValueError), match=named(tmp_path / "model.safetensors", match)):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_shard_outside_the_folder_is_refused(small_hf, tmp_path, escape):
    folder = tmp_path / "checkpoint"
    index = sharded(small_hf, folder)
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / shard
    (folder / shard).rename(outside)  # a valid shard, which the index must not be able to reach
    name = {"parent": f"../{shard}", "absolute": str(outside), "symlink": shard}[escape]
    if escape == "symlink":
        (folder / shard).symlink_to(outside)
    write_index(folder, {k: name if v == shard else v for k, v in index["weight_map"].items()})
    with pytest.raises(ValueError, match=named(folder / "model.safetensors.index.json",
                                               f"shard {name!r} lies outside")):
        GPT2.from_pretrained(folder)


def test_hub_cache_snapshot_linking_to_its_blobs_loads(small_hf, tmp_path):
    """The hub cache keeps each file in the repository's blobs folder and links to it from the snapshot."""
    sharded(small_hf, tmp_path / "saved")
    repo = tmp_path / "models--someone--tiny-gpt2"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((tmp_path / "saved").iterdir())):
        file.rename(repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    ids = random_ids(101, 2, 12)
    with torch.no_grad():
        assert_logits_close(GPT2.from_pretrained(snapshot)(ids), hf_logits(small_hf, ids))


@pytest.mark.parametrize("text, match", [
    ("{", "is not valid JSON"),
    ('{"metadata": {}}', "has no weight_map"),
    ('{"weight_map": {"transformer.wte.weight": 3}}', "has no weight_map from tensor names to shard file names"),
])
def test_shard_index_that_is_unreadable_is_refused(small_hf, tmp_path, text, match):
    sharded(small_hf, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=named(tmp_path / "model.safetensors.index.json", match)):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage, error, match", [
    ("missing", FileNotFoundError, "does not exist"),
    ("a folder", ValueError, "is not a file"),
])
def test_shard_that_is_missing_or_a_folder_is_refused_by_name(small_hf, tmp_path, damage, error, match):
    index = sharded(small_hf, tmp_path)
    shard = tmp_path / sorted(set(index["weight_map"].values()))[-1]
    shard.unlink()
    if damage == "a folder":
        shard.mkdir()
    with pytest.raises(error, match=named(shard, match)):
        GPT2.from_pretrained(tmp_path)


def test_index_mapping_a_tensor_to_a_shard_that_lacks_it_is_refused(small_hf, tmp_path):
    index = sharded(small_hf, tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    moved = next(k for k, v in index["weight_map"].items() if v == shards[-1])
    write_index(tmp_path, index["weight_map"] | {moved: shards[0]})
    with pytest.raises(KeyError, match=named(tmp_path / shards[0], "disagrees with", "model.safetensors.index.json",
                                             f"mapped to it that it lacks: ['{moved}']")):
        GPT2.from_pretrained(tmp_path)


def test_tensor_held_by_two_shards_is_refused(small_hf, tmp_path):
    index = sharded(small_hf, tmp_path)
    first, second = sorted(set(index["weight_map"].values()))[:2]
    doubled = next(k for k, v in index["weight_map"].items() if v == first)
    tensors = load_file(str(tmp_path / second))
    save_file(tensors | {doubled: torch.zeros_like(load_file(str(tmp_path / first))[doubled])},
              str(tmp_path / second))
    with pytest.raises(KeyError, match=named(tmp_path / second, f"it holds that are not mapped to it: ['{doubled}']")):
        GPT2.from_pretrained(tmp_path)


def test_gpt2model_and_lm_head_model_names_mixed_are_refused(small_hf, tmp_path):
    state = hf_tensors(small_hf)
    state["ln_f.bias"] = state["transformer.ln_f.bias"] + 1
    write_checkpoint(tmp_path, small_hf, state)
    with pytest.raises(ValueError, match=named(tmp_path / "model.safetensors", "both", "ln_f.bias", "ambiguous")):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_by_name(small_hf, tmp_path, value):
    state = hf_tensors(small_hf)
    state["transformer.h.1.attn.c_proj.weight"][3, 4] = value
    write_checkpoint(tmp_path, small_hf, state)
    with pytest.raises(ValueError, match=named(tmp_path / "model.safetensors",
                                               "tensor transformer.h.1.attn.c_proj.weight holds NaN or infinite")):
        GPT2.from_pretrained(tmp_path)


def test_file_with_its_tail_overwritten_is_refused(small_hf, tmp_path):
    write_checkpoint(tmp_path, small_hf)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-64] + b"\xff" * 64)  # 0xffffffff is a float32 NaN
    with pytest.raises(ValueError, match=named(path, "holds NaN or infinite values")):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8, torch.float8_e4m3fn], ids=str)
def test_weight_that_is_not_a_supported_float_is_refused_by_name(small_hf, tmp_path, dtype):
    state = hf_tensors(small_hf)
    state["transformer.h.0.ln_1.bias"] = state["transformer.h.0.ln_1.bias"].to(dtype)
    write_checkpoint(tmp_path, small_hf, state)
    with pytest.raises(ValueError, match=named(tmp_path / "model.safetensors",
                                               f"tensor transformer.h.0.ln_1.bias has dtype {dtype}")):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_floating_weights_are_cast_to_the_model_dtype(small_hf, tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in hf_tensors(small_hf).items()}
    write_checkpoint(tmp_path, small_hf, state)
    model = GPT2.from_pretrained(tmp_path)
    assert model.dtype == torch.float32
    assert torch.equal(model.wte.weight, state["transformer.wte.weight"].float())


def test_folder_that_is_a_file_is_refused(small_hf, tmp_path):
    write_checkpoint(tmp_path, small_hf)
    with pytest.raises(ValueError, match=named(tmp_path / "model.safetensors", "is a file; pass the folder")):
        GPT2.from_pretrained(tmp_path / "model.safetensors")


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_weights_that_are_a_folder_are_refused(small_hf, tmp_path, file):
    write_config(tmp_path, small_hf)
    (tmp_path / file).mkdir()
    with pytest.raises(ValueError, match=named(tmp_path / file, "is not a file")):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage, words", [
    ("truncated weights", ["model.safetensors", "not a readable safetensors file"]),
    ("a config value of the wrong type", ["config.json", "n_embd must be an integer"]),
])
def test_cli_reports_a_damaged_checkpoint_in_one_line(small_hf, tmp_path, damage, words):
    write_checkpoint(tmp_path, small_hf, **({"n_embd": "60"} if damage.startswith("a config") else {}))
    if damage == "truncated weights":
        (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tmp_path), "--max-new-tokens", "1", "--device", "cpu"])
    message = str(exit_info.value.code)
    assert re.fullmatch("gpt2fast generate: error: " + named(tmp_path / words[0], words[1]) + ".*", message)
    assert "\n" not in message and "Traceback" not in message
