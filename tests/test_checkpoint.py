"""Hugging Face checkpoints in and out: random HF GPT-2 models saved, loaded, compared, and refused."""
from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
import transformers
from safetensors.torch import save_file

from gpt2fast import GPT2

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
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
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
