"""Weight-only quantization (gpt2fast.quantize): the per-channel int8 and bf16 formats, a quantized model against
the same model built from the dequantized weights, its KV-cache decode against its full forward, saving and
loading (and transformers refusing the folder), the CLI flag, and every refusal."""
import copy
import json

import pytest
import torch
import transformers

from gpt2fast import GPT2, train
from gpt2fast.cli import main
from gpt2fast.config import GPT2Config
from gpt2fast.data import default_data_dir
from gpt2fast.tokenizer import Tokenizer
from gpt2fast.quantize import INT8_MAX, QuantizedLinear, dequantize, quantize_weight
from conftest import assert_close, randn

VOCAB = default_data_dir() / "gpt2.tiktoken"
SCHEMES = ("int8", "bf16")
# gpt2's shapes but for depth and vocabulary: widths 768 and 3072, 12 heads.
CONFIG = GPT2Config(vocab_size=1001, n_positions=64, n_embd=768, n_layer=2, n_head=12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT2(CONFIG).eval()


def ids(batch=2, length=9, seed=1):
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_int8_rounds_each_output_channel_to_its_nearest_step():
    w = randn(37, 77, seed=2)
    w[5] = 0  # an all-zero channel
    q, scale = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (37,)
    assert (q.abs().amax(dim=1)[torch.arange(37) != 5] == INT8_MAX).all()  # each channel's largest weight: +-127
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (q[5] == 0).all() and torch.isfinite(scale).all()


def test_bf16_is_the_weight_rounded_to_bfloat16():
    w = randn(9, 33, seed=3)
    q, scale = quantize_weight(w, "bf16")
    assert scale is None and torch.equal(q, w.to(torch.bfloat16))


def dequantized_copy(model: GPT2, quantized: GPT2) -> GPT2:
    """An fp32 model whose weights are exactly the quantized model's, dequantized: what it must compute."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for (name, m), qm in zip(twin.named_modules(), quantized.modules()):
            if isinstance(qm, QuantizedLinear):
                m.weight.copy_(dequantize(qm.weight, qm.scale).T)
        twin.wte.weight.copy_(dequantize(quantized.wte.weight, quantized.wte.scale))
    return twin


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantized_model_computes_with_its_dequantized_weights(model, scheme):
    quantized = copy.deepcopy(model).quantize(scheme)
    assert quantized.quantization == scheme and quantized.dtype == torch.float32
    x = ids()
    with torch.inference_mode():
        got, want, fp32 = quantized(x), dequantized_copy(model, quantized)(x), model(x)
    assert_close(got, want.double(), scale=10)
    error = ((got - fp32).norm() / fp32.norm()).item()
    assert 0 < error < {"int8": 0.05, "bf16": 0.01}[scheme]  # rounded, and not far


@pytest.mark.parametrize("scheme", SCHEMES)
def test_kv_cache_decoding_matches_the_full_forward(model, scheme):
    quantized = copy.deepcopy(model).quantize(scheme)
    x = ids(batch=3, length=6, seed=4)
    with torch.inference_mode():
        out = quantized.generate(x, 5, do_sample=False)
        full = quantized(out[:, :-1])
    assert torch.equal(full[:, x.shape[1] - 1:].argmax(-1), out[:, x.shape[1]:])


def test_quantize_refuses_by_name(model):
    quantized = copy.deepcopy(model).quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantized.quantize("bf16")
    with pytest.raises(ValueError, match="weights must be one of"):
        copy.deepcopy(model).quantize("int4")
    with pytest.raises(ValueError, match="takes a float32 model"):
        copy.deepcopy(model).to(torch.bfloat16).quantize("int8")
    with pytest.raises(ValueError, match="keeps its dtypes"):
        quantized.to(torch.float16)
    with torch.no_grad():  # evaluation: the loss of the logits it computes
        x, y = ids(), ids(seed=2)
        loss = quantized.loss(x, y)
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(quantized(x).flatten(0, 1), y.flatten()))
    assert quantized.to("cpu") is quantized  # moving is fine


def test_training_refuses_a_quantized_checkpoint(model, tmp_path):
    copy.deepcopy(model).quantize("int8").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds int8 weights, which are for inference"):
        train._model(train.TrainConfig(init_from=str(tmp_path)), CONFIG.vocab_size)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_load_a_quantized_model(model, scheme, tmp_path):
    plain, folder = tmp_path / "plain", tmp_path / scheme
    model.save_pretrained(plain)
    quantized = GPT2.from_pretrained(plain, weights=scheme)  # load, then quantize
    quantized.save_pretrained(folder)
    loaded = GPT2.from_pretrained(folder)
    assert loaded.quantization == scheme
    for (name, a), (_, b) in zip(quantized.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert GPT2.from_pretrained(folder, weights=scheme).quantization == scheme
    other = "bf16" if scheme == "int8" else "int8"
    with pytest.raises(ValueError, match=f"holds {scheme} weights"):
        GPT2.from_pretrained(folder, weights=other)
    with pytest.raises(ValueError, match="keeps its dtypes"):
        GPT2.from_pretrained(folder, dtype=torch.float16)


def test_transformers_refuses_a_quantized_folder(model, tmp_path):
    """It names the quantization it does not know in a warning, then refuses the [out, in] int8 weights."""
    copy.deepcopy(model).quantize("int8").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "gpt2fast"
    with pytest.raises(RuntimeError, match="mismatch|size"):
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path)


def test_int8_weights_do_not_load_into_a_plain_model(model, tmp_path):
    """A quantized file whose config lost its quantization_config: refused, never cast to float."""
    copy.deepcopy(model).quantize("int8").save_pretrained(tmp_path)
    plain = json.loads((tmp_path / "config.json").read_text())
    del plain["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(plain))
    with pytest.raises((ValueError, KeyError), match="int8|scale"):
        GPT2.from_pretrained(tmp_path)


def test_another_quantization_method_is_refused_by_name(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes'"):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.skipif(not VOCAB.exists(), reason=f"GPT-2 vocabulary not found at {VOCAB}")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_cli_generates_with_quantized_weights(scheme, tmp_path, capsys):
    torch.manual_seed(0)
    GPT2(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path)  # GPT-2's vocabulary
    tok = Tokenizer.from_pretrained(VOCAB)
    prompt = tok.encode("The")
    main(["generate", "--model", str(tmp_path), "--prompt", "The", "--max-new-tokens", "6", "--temperature", "0",
          "--tokenizer", str(VOCAB), "--weights", scheme])
    quantized = GPT2.from_pretrained(tmp_path, weights=scheme)
    want = quantized.generate(torch.tensor([prompt]), 6, do_sample=False)
    assert capsys.readouterr().out == tok.decode(want[0].tolist()) + "\n"
