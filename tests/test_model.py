"""The GPT-2 module: presets, shapes, causality, the ops door, gradients, and input checks."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import transformers

import gpt2fast
from gpt2fast import GPT2, GPT2Config
from gpt2fast.config import PRESETS
from gpt2fast.ops import registry

from helpers import build_pair, random_ids

SMALL = dict(vocab_size=101, n_positions=32, n_embd=60, n_layer=2, n_head=5)


def small_model(seed: int = 0, **overrides) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(**(SMALL | overrides))).eval()


def hf_config_of(config: GPT2Config) -> transformers.GPT2Config:
    return transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions,
                                   n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                   n_inner=config.n_inner)


# ---- presets and parameter counts ----

@pytest.mark.parametrize("name, n_layer, n_head, n_embd", [
    ("gpt2", 12, 12, 768), ("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280), ("gpt2-xl", 48, 25, 1600),
])
def test_openai_presets_have_the_published_shapes(name, n_layer, n_head, n_embd):
    c = GPT2Config.from_preset(name)
    assert (c.n_layer, c.n_head, c.n_embd) == (n_layer, n_head, n_embd)
    assert (c.vocab_size, c.n_positions, c.mlp_width, c.eos_token_id) == (50257, 1024, 4 * n_embd, 50256)
    assert c.head_dim * c.n_head == c.n_embd


def test_char_preset_is_small_and_takes_its_vocabulary_as_an_override():
    c = GPT2Config.from_preset("char", vocab_size=80)
    assert c.vocab_size == 80 and c.eos_token_id is None
    assert c.num_params() < GPT2Config.from_preset("gpt2").num_params() / 50
    assert PRESETS["char"].vocab_size != 80  # overrides never change the shared preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_equals_hf_and_our_module(name):
    config = GPT2Config.from_preset(name)
    with torch.device("meta"):  # counts only: nothing is allocated
        hf = transformers.GPT2LMHeadModel(hf_config_of(config))
        ours = GPT2(config)
    hf_count = sum(p.numel() for p in hf.parameters())  # the tied lm_head is counted once
    assert config.num_params() == hf_count
    assert sum(p.numel() for p in ours.parameters()) == hf_count
    embeddings = hf.transformer.wte.weight.numel() + hf.transformer.wpe.weight.numel()
    assert config.num_params(include_embeddings=False) == hf_count - embeddings


def test_num_params_honours_n_inner():
    config = GPT2Config(**SMALL, n_inner=72)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_config_of(config))
    assert config.mlp_width == 72
    assert config.num_params() == sum(p.numel() for p in hf.parameters())


def test_unknown_preset_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt3'.*gpt2-medium"):
        GPT2Config.from_preset("gpt3")


@pytest.mark.parametrize("field, value, match", [
    ("n_head", 7, "divisible by n_head"), ("n_layer", 0, "n_layer must be >= 1"),
    ("dropout", 1.0, "dropout"), ("n_inner", 0, "n_inner"),
])
def test_bad_config_is_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config(**(SMALL | {field: value}))


# ---- forward ----

def test_logits_shape_and_dtype():
    model = small_model()
    for batch, length in [(1, 1), (3, 7), (2, 32)]:
        logits = model(random_ids(101, batch, length))
        assert logits.shape == (batch, length, 101) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def test_int32_and_int64_ids_give_the_same_logits():
    model = small_model()
    ids = random_ids(101, 2, 9)
    torch.testing.assert_close(model(ids.int()), model(ids), rtol=0, atol=0)


def test_last_only_is_the_last_position():
    model = small_model()
    ids = random_ids(101, 3, 10)
    torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position", [0, 5, 11])
def test_changing_a_later_token_never_changes_earlier_logits(position):
    model = small_model()
    ids = random_ids(101, 2, 12)
    changed = ids.clone()
    changed[:, position] = (changed[:, position] + 1 + torch.arange(2)) % 101
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :position], before[:, :position], rtol=0, atol=1e-6)
    assert (after[:, position:] - before[:, position:]).abs().amax(dim=-1).min() > 1e-4


def test_every_hot_path_goes_through_ops(monkeypatch):
    """Each op's reference implementation is hit, and no torch kernel of a hot path is called around ops."""
    calls: Counter[str] = Counter()
    reference = registry.backends()["torch"]
    for op in ("layer_norm", "causal_attention", "decode_attention", "gelu_mlp", "sample"):
        impl = reference.impls[op]

        def spy(*args, _op=op, _fn=impl.fn, **kwargs):
            calls[_op] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(impl, "fn", spy)
    for fn in ("layer_norm", "scaled_dot_product_attention", "gelu"):
        original = getattr(F, fn)

        def counted(*args, _fn=fn, _original=original, **kwargs):
            calls["F." + _fn] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(F, fn, counted)

    model = small_model(n_layer=3)
    L = model.config.n_layer
    ids = random_ids(101, 2, 6)
    with gpt2fast.use_backend("torch"), torch.no_grad():
        model(ids)
        assert calls == {"layer_norm": 2 * L + 1, "causal_attention": L, "gelu_mlp": L,
                         "F.layer_norm": 2 * L + 1, "F.scaled_dot_product_attention": L, "F.gelu": L}
        calls.clear()
        new = 4
        model.generate(ids, new, seed=0)
    # Prefill once, then new - 1 decode steps, and one draw per new token.
    assert calls["causal_attention"] == L
    assert calls["decode_attention"] == L * (new - 1)
    assert calls["gelu_mlp"] == L * new
    assert calls["layer_norm"] == (2 * L + 1) * new
    assert calls["sample"] == new
    assert calls["F.scaled_dot_product_attention"] == calls["causal_attention"] + calls["decode_attention"]
    assert calls["F.layer_norm"] == calls["layer_norm"] and calls["F.gelu"] == calls["gelu_mlp"]


# ---- training ----

def test_backward_gives_finite_gradients_on_every_parameter():
    model = small_model(n_layer=3).train()
    ids = random_ids(101, 2, 16)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_gradients_match_hf():
    hf, model = build_pair(n_layer=2, n_positions=32)  # both in eval mode: HF's dropout (0.1) off, grads on
    ids = random_ids(101, 2, 12)

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))

    loss_of(hf(ids).logits).backward()
    loss_of(model(ids)).backward()
    hf_params = dict(hf.named_parameters())
    ours = dict(model.named_parameters())
    for name in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.1.mlp.c_fc.bias", "h.1.mlp.c_proj.weight",
                 "h.1.ln_2.weight"):
        expected = hf_params[f"transformer.{name}"].grad
        got = ours[name].grad
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item(), msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_loss_matches_cross_entropy_of_the_logits_with_its_gradients(backend):
    """model.loss (LM head + loss in chunks) against F.cross_entropy of model(ids): value and every gradient."""
    if gpt2fast.ops.backends()[backend].unavailable_reason():
        pytest.skip(f"{backend}: {gpt2fast.ops.backends()[backend].unavailable_reason()}")
    model = small_model(seed=3)
    ids, targets = random_ids(101, 2, 12, seed=1), random_ids(101, 2, 12, seed=2)
    targets[0, :3] = -100  # ignored positions, as padding would be
    expected = F.cross_entropy(model(ids).reshape(-1, 101), targets.reshape(-1), ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    with gpt2fast.use_backend(backend):
        got = model.loss(ids, targets)
        grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * e.abs().max().item(), msg=name)


def test_fused_loss_refuses_targets_of_another_shape():
    model = small_model()
    with pytest.raises(ValueError, match=r"targets have shape \(2, 5\), input_ids \(2, 6\)"):
        model.loss(random_ids(101, 2, 6), random_ids(101, 2, 5))


# ---- input checks ----

@pytest.mark.parametrize("make_ids, error, match", [
    (lambda: torch.tensor([[1, 2, 101]]), ValueError, r"token id 101 is outside the vocabulary \[0, 101\)"),
    (lambda: torch.tensor([[1, -1, 3]]), ValueError, r"token id -1 is outside the vocabulary"),
    (lambda: torch.tensor([[1.0, 2.0]]), TypeError, r"int32 or int64, got torch.float32"),
    (lambda: torch.tensor([1, 2, 3]), ValueError, r"must be \[B, T\], got shape \(3,\)"),
    (lambda: torch.zeros(1, 4, dtype=torch.long, device="meta"), ValueError, r"on meta but the model is on cpu"),
    (lambda: torch.zeros(1, 33, dtype=torch.long), ValueError, r"33 tokens is longer than the context, n_positions = 32"),
])
def test_bad_input_ids_are_refused_clearly(make_ids, error, match):
    model = small_model()
    with pytest.raises(error, match=match):
        model(make_ids())


def test_a_cache_too_small_is_refused():
    model = small_model()
    cache = model.new_cache(1, capacity=4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions, 5 needed"):
        model(random_ids(101, 1, 5), cache)
    with pytest.raises(ValueError, match="exceeds n_positions"):
        model.new_cache(1, capacity=33)


def test_from_preset_config_builds_a_model_of_that_size():
    config = dataclasses.replace(GPT2Config.from_preset("char"), n_layer=1)
    model = GPT2(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()


def test_inference_logits_follow_changes_to_the_tied_embedding():
    """On a CPU, a backend may read the LM head from a transposed copy of wte in inference; it must never go
    stale."""
    model = GPT2(GPT2Config(vocab_size=101, n_positions=16, n_embd=24, n_layer=1, n_head=2)).eval()
    ids = random_ids(101, 2, 4)  # 8 rows: few enough for the CPU's copy
    with torch.no_grad():
        before = model(ids)
    torch.testing.assert_close(before, model(ids).detach())  # with grad: wte itself, no copy
    with torch.no_grad():
        model.wte.weight.mul_(2.0)
        after = model(ids)
    torch.testing.assert_close(after, model(ids).detach())
    assert not torch.allclose(before, after)


def test_inference_logits_follow_a_fused_optimizer_step_and_a_cast():
    """Fused AdamW on the CPU updates wte without bumping its version counter; a cast makes new tensors
    that may reuse a freed address. Evaluating between training steps must still see the new weights."""
    model = GPT2(GPT2Config(vocab_size=101, n_positions=16, n_embd=24, n_layer=1, n_head=2))
    ids = random_ids(101, 2, 4)  # 8 rows: few enough for the CPU's copy
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        model.train()
        model(ids).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hidden(model, ids) @ model.wte.weight.T)  # no copy on this side
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hidden(model, ids) @ model.wte.weight.T)


def hidden(model, ids):
    """The final LayerNorm's output, the LM head's input."""
    return model._blocks(ids, torch.arange(ids.shape[1])[None])


def test_torch_compile_fullgraph_traces_the_whole_model():
    """The dispatch, the input checks and the CPU decode paths all step aside while dynamo traces."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4)).eval()
    ids = random_ids(101, 2, 9)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))
