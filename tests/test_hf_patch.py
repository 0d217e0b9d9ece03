"""gpt2fast.patch_hf: a live transformers GPT-2 run through gpt2fast.ops gives transformers' own logits,
greedy tokens and gradients, shares its weights, falls back to transformers' forward where the fast path
could not be exact, and unpatches to the original."""
from __future__ import annotations

import copy
import logging
import re
import sys
from collections import Counter

import pytest
import torch
import transformers

import gpt2fast
from gpt2fast import hf as hf_patch
from gpt2fast import ops

from conftest import CUDA, fallback_records
from helpers import assert_logits_close, build_hf, random_ids

# head_dim 16: the smallest the Triton attention kernels take, so that they run rather than fall back.
TINY = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4)
FAST_OPS = ("layer_norm", "causal_attention", "decode_attention", "gelu_mlp")


@pytest.fixture
def op_calls(monkeypatch) -> Counter:
    """How often each gpt2fast op is called, on whichever backend."""
    calls: Counter[str] = Counter()
    for name in FAST_OPS:
        def counted(*args, _name=name, _op=getattr(ops, name), **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    return calls


def tiny(seed=0, attn="sdpa", **config) -> transformers.GPT2LMHeadModel:
    model = build_hf(seed, **(TINY | config))
    model.set_attn_implementation(attn)
    return model


def patched_copy(model):
    return gpt2fast.patch_hf(copy.deepcopy(model))


def assert_kernels_ran(backend, device, caplog):
    """Triton in its CPU interpreter takes every op of its own these tests run: no fallback may hide it (the
    plain matmuls, ops.linear, have no Triton kernel and run on the reference)."""
    if backend == "triton" and device.type == "cpu" and not CUDA:
        assert not [r for r in fallback_records(caplog) if not re.search(r": no \w+ implementation$", r)]


def greedy(model, ids, n, **kwargs):
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=None, **kwargs)


# ---- logits ----

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_equal_transformers_in_fp32_on_every_backend(backend, device, attn, op_calls, fresh_log, caplog):
    model = tiny(attn=attn).to(device)
    ids = random_ids(101, 2, 9).to(device)
    with torch.no_grad():
        expected = model(ids).logits
        patched = patched_copy(model)
        with gpt2fast.use_backend(backend):
            got = patched(ids).logits
    assert_logits_close(got, expected, rel=1e-5)
    L = TINY["n_layer"]
    assert op_calls == {"layer_norm": 2 * L + 1, "causal_attention": L, "gelu_mlp": L}
    assert_kernels_ran(backend, device, caplog)


def test_logits_in_bf16_within_its_tolerance(backend):
    model = tiny().to(torch.bfloat16)
    ids = random_ids(101, 2, 9)
    with torch.no_grad():
        expected = model(ids).logits
        with gpt2fast.use_backend(backend):
            got = patched_copy(model)(ids).logits
    assert got.dtype == torch.bfloat16
    assert_logits_close(got, expected, rel=2e-2)


def test_logits_at_gpt2_width():
    model = build_hf(0, vocab_size=101, n_positions=64, n_embd=768, n_layer=2, n_head=12)
    ids = random_ids(101, 2, 16)
    with torch.no_grad():
        expected = model(ids).logits
        got = patched_copy(model)(ids).logits
    assert_logits_close(got, expected, rel=1e-5)


def test_several_new_tokens_against_a_filled_cache(op_calls):
    """A chunk of new tokens after a cached prompt: transformers passes a causal mask offset by the cache,
    which the patch reads as causal and serves with decode_attention."""
    for attn in ("sdpa", "eager"):
        model = tiny(attn=attn)
        patched = patched_copy(model)
        ids = random_ids(101, 2, 12)
        outputs = []
        with torch.no_grad():
            for m in (model, patched):
                cache = transformers.DynamicCache(config=m.config)  # second argument: its name changed in 5.24
                m(ids[:, :8], cache, use_cache=True)
                outputs.append(m(ids[:, 8:], cache, use_cache=True).logits)
        assert_logits_close(outputs[1], outputs[0], rel=1e-5)
    assert op_calls["decode_attention"] == 2 * TINY["n_layer"]


# ---- generation ----

@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_gives_transformers_tokens(backend, device, use_cache, op_calls, fresh_log, caplog):
    model = tiny().to(device)
    ids = random_ids(101, 2, 5).to(device)
    expected = greedy(model, ids, 4, use_cache=use_cache)
    with gpt2fast.use_backend(backend):
        got = greedy(patched_copy(model), ids, 4, use_cache=use_cache)
    assert torch.equal(got, expected)
    assert op_calls["gelu_mlp"] == 4 * TINY["n_layer"]
    assert op_calls["decode_attention"] == (3 * TINY["n_layer"] if use_cache else 0)
    assert_kernels_ran(backend, device, caplog)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_gives_transformers_tokens_through_its_attention(attn, op_calls):
    """Padding is a mask the fast attention does not take: attention runs transformers' forward, the
    LayerNorms and MLPs still gpt2fast's."""
    model = tiny(attn=attn)
    ids = random_ids(101, 3, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[2, :1] = 0
    ids[mask == 0] = 7
    expected = greedy(model, ids, 6, attention_mask=mask)
    got = greedy(patched_copy(model), ids, 6, attention_mask=mask)
    assert torch.equal(got, expected)
    assert op_calls["causal_attention"] == op_calls["decode_attention"] == 0
    assert op_calls["gelu_mlp"] == 6 * TINY["n_layer"]


def test_static_cache_runs_transformers_attention(op_calls):
    model = tiny()
    ids = random_ids(101, 2, 7)
    expected = greedy(model, ids, 5, cache_implementation="static")
    assert torch.equal(greedy(patched_copy(model), ids, 5, cache_implementation="static"), expected)
    assert op_calls["causal_attention"] == op_calls["decode_attention"] == 0 and op_calls["gelu_mlp"] > 0


def test_attention_weights_asked_for_come_from_transformers(op_calls):
    model = tiny(attn="eager")
    ids = random_ids(101, 2, 6)
    with torch.no_grad():
        expected = model(ids, output_attentions=True)
        got = patched_copy(model)(ids, output_attentions=True)
    assert len(got.attentions) == TINY["n_layer"]
    for a, b in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_logits_close(got.logits, expected.logits, rel=1e-5)
    assert op_calls["causal_attention"] == 0


def test_an_argument_the_attention_function_reads_is_left_to_transformers(op_calls):
    """sdpa's is_causal=False makes attention bidirectional: the fast path, causal, must not answer it."""
    model = tiny()
    ids = random_ids(101, 2, 6)
    with torch.no_grad():
        expected = model(ids, is_causal=False).logits
        got = patched_copy(model)(ids, is_causal=False).logits
        assert (expected - model(ids).logits).abs().max() > 1e-2  # the argument does change the result
    assert_logits_close(got, expected, rel=1e-5)
    assert op_calls["causal_attention"] == 0


def test_autocast_is_left_to_transformers(op_calls):
    """Under autocast transformers' matmuls run in bf16 while the weights stay fp32, which the ops refuse."""
    model = tiny()
    ids = random_ids(101, 2, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids).logits
        got = patched_copy(model)(ids).logits
    assert torch.equal(got, expected)
    assert not op_calls


def test_attention_dropout_in_training_is_left_to_transformers(op_calls):
    model = patched_copy(tiny(attn_pdrop=0.5).train())
    model(random_ids(101, 1, 6))
    assert op_calls["causal_attention"] == 0 and op_calls["gelu_mlp"] == TINY["n_layer"]


# ---- training ----

def test_training_steps_give_transformers_gradients_and_weights(backend, op_calls):
    """Two optimizer steps on the LM loss, passing num_items_in_batch as transformers' Trainer does.

    SGD, not Adam: Adam divides by the gradient's own size, so gradients that are zero but for rounding
    (the key bias: softmax ignores it) would take full-size steps of random sign."""
    model = tiny(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    patched = patched_copy(model)
    ids = random_ids(101, 2, 10)
    grads = []
    for m in (model, patched):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        grads.append([])
        with gpt2fast.use_backend(backend):
            for _ in range(2):
                optimizer.zero_grad()
                m(ids, labels=ids, num_items_in_batch=torch.tensor(ids.numel() - 2)).loss.backward()
                grads[-1].append({name: p.grad.clone() for name, p in m.named_parameters()})
                optimizer.step()
    for step, (expected_step, got_step) in enumerate(zip(*grads)):
        for name, expected in expected_step.items():
            error = (got_step[name] - expected).abs().max()
            assert error <= 1e-4 * expected.abs().max() + 1e-7, f"step {step}: {name}"
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    assert op_calls["causal_attention"] == 2 * TINY["n_layer"]


# ---- patching itself ----

def test_weights_are_shared_not_copied(monkeypatch):
    model = tiny()
    before = {name: p.data_ptr() for name, p in model.state_dict().items()}
    seen = []
    gelu_mlp = ops.gelu_mlp
    monkeypatch.setattr(ops, "gelu_mlp", lambda x, *weights: seen.append(weights) or gelu_mlp(x, *weights))
    gpt2fast.patch_hf(model)
    assert {name: p.data_ptr() for name, p in model.state_dict().items()} == before
    with torch.no_grad():
        model(random_ids(101, 1, 4))
    mlp = model.transformer.h[0].mlp
    assert [w.data_ptr() for w in seen[0]] == [mlp.c_fc.weight.data_ptr(), mlp.c_fc.bias.data_ptr(),
                                               mlp.c_proj.weight.data_ptr(), mlp.c_proj.bias.data_ptr()]


def test_unpatch_restores_the_original_forwards_and_outputs():
    model = tiny()
    ids = random_ids(101, 2, 8)
    with torch.no_grad():
        expected = model(ids).logits
        assert gpt2fast.patch_hf(gpt2fast.patch_hf(model)) is model  # twice: no patch of a patch
        assert model.transformer.h[0].attn.forward.func is hf_patch._attention_forward
        assert model.transformer.h[0].attn.forward.args[1].__func__ is type(model.transformer.h[0].attn).forward
        assert gpt2fast.unpatch(model) is model
        assert not [name for name, m in model.named_modules() if "forward" in vars(m)]
        assert torch.equal(model(ids).logits, expected)


def test_a_module_whose_forward_other_code_replaced_is_left_as_it_is(caplog):
    model = tiny()
    ln = model.transformer.ln_f
    own = ln.forward = lambda x: torch.nn.LayerNorm.forward(ln, x)
    with caplog.at_level(logging.WARNING, logger="gpt2fast"):
        gpt2fast.patch_hf(model)
    assert ln.forward is own and "forward" in vars(model.transformer.h[0].ln_1)
    assert "1 GPT-2 modules left as they are" in caplog.text
    gpt2fast.unpatch(model)
    assert ln.forward is own and "forward" not in vars(model.transformer.h[0].ln_1)


def test_hooked_linear_layers_keep_their_hooks(op_calls):
    """An adapter (LoRA) wraps or hooks c_attn, c_fc: the patch calls such layers as modules, never around them."""
    model = tiny()
    for block in model.transformer.h:
        for layer in (block.attn.c_attn, block.mlp.c_fc):
            layer.register_forward_hook(lambda module, args, out: out + 0.5)
    ids = random_ids(101, 2, 8)
    with torch.no_grad():
        expected = model(ids).logits
        got = patched_copy(model)(ids).logits
    assert_logits_close(got, expected, rel=1e-5)
    assert op_calls["gelu_mlp"] == 0 and op_calls["causal_attention"] == TINY["n_layer"]


def test_other_gpt2_heads_are_patched_too(op_calls):
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**TINY, num_labels=3, pad_token_id=0, initializer_range=0.2)).eval()
    ids = random_ids(100, 2, 6) + 1  # no padding token: the last token of each row is read
    with torch.no_grad():
        expected = model(ids).logits
        got = patched_copy(model)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert op_calls["gelu_mlp"] == TINY["n_layer"]


@pytest.mark.parametrize("flag, value, part", [
    ("scale_attn_by_inverse_layer_idx", True, "attn"), ("scale_attn_weights", False, "attn"),
    ("reorder_and_upcast_attn", True, "attn"), ("activation_function", "gelu", "mlp"),
])
def test_a_config_flag_the_fast_path_would_not_honour_leaves_that_part_to_transformers(flag, value, part, caplog):
    model = tiny(attn="eager", **{flag: value})
    ids = random_ids(101, 2, 8)
    with torch.no_grad():
        expected = model(ids).logits
        with caplog.at_level(logging.WARNING, logger="gpt2fast"):
            gpt2fast.patch_hf(model)
        got = model(ids).logits
    assert f"{flag}={value!r}" in caplog.text
    block = model.transformer.h[0]
    assert "forward" not in vars(getattr(block, part)) and "forward" in vars(block.ln_1)
    assert_logits_close(got, expected, rel=1e-5)


def test_wrong_model_class_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"got gpt2fast\.gpt2\.GPT2"):
        gpt2fast.patch_hf(gpt2fast.GPT2(gpt2fast.GPT2Config(**TINY)))
    with pytest.raises(TypeError, match=r"got torch\.nn\.modules\.linear\.Linear"):
        gpt2fast.unpatch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("version", ["4.57.3", "6.0.0"])
def test_unsupported_transformers_version_is_refused_naming_it(monkeypatch, version):
    model = tiny()
    # transformers replaces its own entry in sys.modules while it loads: the version read is that entry's
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    for call in (lambda: gpt2fast.patch_hf(model), gpt2fast.apply_to_transformers_gpt2):
        with pytest.raises(RuntimeError, match=rf"transformers >= 5\.17, < 6; transformers {version} is installed"):
            call()


def test_apply_to_transformers_gpt2_patches_models_loaded_afterwards_and_revert_undoes_it(op_calls, tmp_path):
    ids = random_ids(101, 2, 8)
    before = tiny()
    before.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = before(ids).logits
    gpt2fast.apply_to_transformers_gpt2()
    try:
        gpt2fast.apply_to_transformers_gpt2()  # twice: no wrapper around the wrapper
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        assert "forward" in vars(model.transformer.h[1].mlp) and "forward" not in vars(before.transformer.h[1].mlp)
        with torch.no_grad():
            assert_logits_close(model(ids).logits, expected, rel=1e-5)
        assert op_calls["gelu_mlp"] == TINY["n_layer"]
    finally:
        gpt2fast.revert_transformers_gpt2()
    assert "forward" not in vars(model.transformer.h[1].mlp)
    assert "forward" not in vars(tiny().transformer.h[1].mlp)


class _QuantizedWeight(torch.Tensor):
    """Stands for a quantizer's weight type (torchao's, say): a tensor subclass reporting a float dtype."""


def test_weights_a_quantizer_owns_are_left_to_transformers(op_calls):
    model = tiny()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Conv1D":
                module.weight = torch.nn.Parameter(module.weight.detach().as_subclass(_QuantizedWeight))
    ids = random_ids(101, 2, 6)
    with torch.no_grad():
        expected = model(ids).logits
        got = gpt2fast.patch_hf(model)(ids).logits  # in place: a deep copy would not copy these weights
    assert torch.equal(got, expected)
    assert op_calls["layer_norm"] and not op_calls["gelu_mlp"] and not op_calls["linear"]
