"""Every Triton kernel run with the configuration its launcher picks on an H100.

Without a GPU the other tests run the kernels in triton's interpreter, configured for it (kernels/target.py):
32 x 16 attention tiles, four LayerNorm backward programs, decode split counts for four SMs, sampling tiles
of 65536. Here each launcher is asked for the H100's configuration (target=H100): its tiles, blocks, split
and program counts and precisions, on shapes that cross those tiles' edges, against fp64 oracles, with
torch.empty poisoned (conftest.py) so that an element left unwritten fails. fp32 and fp16 run exactly as on
the GPU; bf16 runs the GPU's tiles with its dot operands upcast to fp32 (target.upcasts_dot_operands:
triton 3.6's interpreter multiplies bf16 tiles wrongly). With CUDA, the same tests run compiled.

What the interpreter cannot show: TF32's rounding (it multiplies fp32 exactly whatever the precision asked;
the TF32 launches are held to fp16's tolerance, for TF32 keeps fp16's 10 bits of mantissa, which only a GPU
tests), num_warps and num_stages (it runs each program whole, one after another: no races between programs
either), shared memory and registers (test_triton_compile.py compiles the launches for sm_90).

The last tests state that these configurations are the H100's: each launch the tests make is what the
launcher's configuration function gives for the H100, and a CUDA device with 132 SMs is the H100 target.
"""
import dataclasses
import math
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch

from conftest import FLOAT_DTYPES, assert_close, randn
from test_linear_cross_entropy import GRAD_SCALE, assert_matches, oracle as cross_entropy_oracle
from test_linear_cross_entropy import make_inputs as cross_entropy_inputs
from test_ops_attention import naive_causal_attention, naive_decode_attention, qkv
from test_ops_layer_norm import make_inputs as layer_norm_inputs, naive_layer_norm
from test_ops_mlp import mlp_weights, naive_gelu_mlp, naive_gelu_tanh, naive_linear
from test_ops_sample import kept_tokens
from test_triton_backend import DEVICE, needs_triton
from test_triton_causal_attention import naive_grads, naive_lse
from test_triton_decode_attention import decode_case

triton = pytest.importorskip("triton", reason="triton is not installed")
from gpt2fast.kernels import bias_gelu, causal_attention, cross_entropy, decode_attention, gelu_mlp  # noqa: E402
from gpt2fast.kernels import layer_norm, sample  # noqa: E402
from gpt2fast.ops import custom_ops  # noqa: E402
from gpt2fast.kernels.target import H100, Target, upcasts_dot_operands  # noqa: E402

pytestmark = needs_triton

H100_TF32 = dataclasses.replace(H100, tf32=True)  # an H100 where torch allows TF32 matmuls
# The dtypes, and fp32 again with TF32 products: the attention and MLP matmuls' precisions.
PRECISIONS = [(torch.float32, H100), (torch.float32, H100_TF32), (torch.bfloat16, H100), (torch.float16, H100)]
PRECISION_IDS = ["float32", "float32-tf32", "bfloat16", "float16"]


def tolerance(dtype, target):
    """The dtype whose tolerance results get: TF32 products keep fp16's 10 bits of mantissa."""
    return torch.float16 if target.tf32 else dtype


# ---- layer_norm ----

LN_SHAPE = (2, 67, 100)  # 134 rows: 132 backward programs, two of which take a second row; width 100, block 128


def run_layer_norm(dtype, with_residual):
    """(inputs, forward outputs, backward outputs) of a training step's LayerNorm, the backward launched for
    the H100 (the forward's configuration depends on the width only); with a residual, grad_h reaches h."""
    x, residual, weight, bias = layer_norm_inputs(LN_SHAPE, dtype, DEVICE)
    residual = residual if with_residual else None
    grad_y = randn(*LN_SHAPE, dtype=dtype, device=DEVICE, seed=20)
    grad_h = randn(*LN_SHAPE, dtype=dtype, device=DEVICE, seed=21) if with_residual else None
    y, h, mean, rstd = layer_norm.layer_norm_forward(x, weight, bias, 1e-5, residual)
    grads = layer_norm.layer_norm_backward(grad_y, grad_h, x if h is None else h, weight, mean, rstd, target=H100)
    return (x, residual, weight, bias, grad_y, grad_h), (y, h, mean, rstd), grads


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm(poisoned_empty, dtype, with_residual):
    inputs, (y, h, mean, rstd), (dh, dweight, dbias) = run_layer_norm(dtype, with_residual)
    x, residual, weight, bias, grad_y, grad_h = inputs
    if with_residual:
        assert_close(h, x.double() + residual.double())
    else:
        assert h is None
        h = x
    h64 = h.detach().double().requires_grad_()
    assert_close(y, naive_layer_norm(h, weight, bias, 1e-5))
    assert_close(mean, h64.mean(-1), torch.float32)
    assert_close(rstd, (h64.var(-1, unbiased=False) + 1e-5).rsqrt(), torch.float32)

    w64 = weight.detach().double().requires_grad_()
    loss64 = (naive_layer_norm(h64, w64, torch.zeros_like(w64), 1e-5) * grad_y.double()).sum()
    want_dh, want_dweight = torch.autograd.grad(loss64, (h64, w64))
    if with_residual:
        want_dh = want_dh + grad_h.double()
    rows = math.prod(LN_SHAPE[:-1])
    assert_close(dh, want_dh, scale=2)
    assert_close(dweight, want_dweight, scale=2 * rows ** 0.5)  # sums over every row
    assert_close(dbias, grad_y.double().reshape(rows, -1).sum(0), scale=2 * rows ** 0.5)


# ---- bias_gelu ----

GELU_SHAPE = (2, 35, 200)  # 70 rows of 200: tiles of 32 x 128, three down (the last of 6 rows), two across


def run_bias_gelu(dtype):
    """(x, bias, grad_y), then y and (dx, dbias): the configuration depends on the shape only."""
    x = randn(*GELU_SHAPE, dtype=dtype, device=DEVICE, seed=9, scale=2.5)
    bias = randn(GELU_SHAPE[-1], dtype=dtype, device=DEVICE, seed=10)
    grad_y = randn(*GELU_SHAPE, dtype=dtype, device=DEVICE, seed=11)
    return (x, bias, grad_y), bias_gelu.bias_gelu_forward(x, bias), bias_gelu.bias_gelu_backward(grad_y, x, bias)


def test_bias_gelu(poisoned_empty, dtype):
    (x, bias, grad_y), y, (dx, dbias) = run_bias_gelu(dtype)
    leaves = [t.detach().double().requires_grad_() for t in (x, bias)]
    y64 = naive_gelu_tanh(leaves[0] + leaves[1])
    want_dx, want_dbias = torch.autograd.grad((y64 * grad_y.double()).sum(), leaves)
    rows = math.prod(GELU_SHAPE[:-1])
    assert_close(y, y64.detach(), scale=2)
    assert_close(dx, want_dx, scale=2)
    assert_close(dbias, want_dbias, scale=2 * rows ** 0.5)


# ---- gelu_mlp ----

# (x's shape, hidden width, save_pre): 581 rows, ten blocks of 64 (the last of 5 rows) in groups of 8
# (GROUP_M), the second of 2, storing the pre-activation; 5 rows, a decode step's, in one block of 16, not
# storing it. Hidden 136: two blocks of 128 columns, the second of 8, and 5 K steps of 32 in the projection;
# 33 inputs: a K step of 32 and one of 1.
MLP_SHAPES = [((7, 83, 33), 136, True), ((1, 5, 33), 136, False)]


def run_gelu_mlp(dtype, target, shape, hidden, save_pre):
    """(x, weights), then gelu_mlp_forward's (y, act, pre) launched for target."""
    x = randn(*shape, dtype=dtype, device=DEVICE, seed=1)
    weights = mlp_weights(shape[-1], hidden, dtype, DEVICE, seed=2)
    return (x, weights), gelu_mlp.gelu_mlp_forward(x, *weights, save_pre, target=target)


@pytest.mark.parametrize("shape,hidden,save_pre", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,target", PRECISIONS, ids=PRECISION_IDS)
def test_gelu_mlp(poisoned_empty, dtype, target, shape, hidden, save_pre):
    (x, weights), (y, act, pre) = run_gelu_mlp(dtype, target, shape, hidden, save_pre)
    pre64 = x.double() @ weights[0].double()  # without b_fc, which the bias_gelu backward adds
    assert y.dtype == act.dtype == dtype
    assert_close(act, naive_gelu_tanh(naive_linear(x, weights[0], weights[1])), tolerance(dtype, target), scale=2)
    assert_close(y, naive_gelu_mlp(x, *weights), tolerance(dtype, target), scale=3)
    if save_pre:
        assert_close(pre, pre64, tolerance(dtype, target), scale=2)
    else:
        assert pre is None


# ---- causal_attention ----

# T = 197: two blocks of 128 queries (forward and dQ) or keys (dK, dV), the second ending 5 rows into a
# step, whether steps are of 64 keys (forward) or 32 rows (backward); 32 x 16 tiles for exact fp32.
ATTENTION_SHAPE = (2, 1, 197, 64)


def run_causal_attention(dtype, target):
    """(q, k, v, grad_out), then the forward's (out, lse) and the backward's (dq, dk, dv), launched for target."""
    q, k, v = qkv(ATTENTION_SHAPE, dtype, DEVICE, seed=1)
    grad_out = randn(*ATTENTION_SHAPE, dtype=dtype, device=DEVICE, seed=4)
    out, lse = causal_attention.causal_attention_forward(q, k, v, target=target)
    grads = causal_attention.causal_attention_backward(grad_out, q, k, v, out, lse, target=target)
    return (q, k, v, grad_out), (out, lse), grads


@pytest.mark.parametrize("dtype,target", PRECISIONS, ids=PRECISION_IDS)
def test_causal_attention(poisoned_empty, dtype, target):
    (q, k, v, grad_out), (out, lse), grads = run_causal_attention(dtype, target)
    assert out.dtype == dtype
    assert_close(out, naive_causal_attention(q, k, v), tolerance(dtype, target))
    assert_close(lse, naive_lse(q, k), tolerance(torch.float32, target), scale=2)
    for name, got, want in zip("qkv", grads, naive_grads(q, k, v, grad_out)):
        assert got.dtype == dtype, name
        assert_close(got, want, tolerance(dtype, target), scale=4, msg=lambda m, name=name: f"grad {name}: {m}")


# ---- decode_attention ----

# (B, H, S, D, lengths, Tq), the cache cut as the H100 cuts it.
DECODE_CASES = {
    # 6 heads: the cache's length bounds the split count, 4 chunks of one 64-key block, the last of 8 keys;
    # lengths end a key into a chunk (three appended keys straddling its edge), on a chunk's edge, at S,
    # and leave chunks wholly past them.
    "few-heads": (3, 2, 200, 64, [65, 128, 200], 3),
    # 88 heads: the SM count bounds it, 3 chunks of two 64-key blocks (the combine pads 3 partials to 4);
    # lengths of one key, one key into the second chunk, mid-block, and S.
    "many-heads": (4, 22, 320, 16, [1, 129, 250, 320], 1),
}


# (dtype, case, append): every dtype on the few-heads cut, reading the cache and appending to it; the
# many-heads cut in fp16, appending as decoding does (its 264 programs take seconds in the interpreter, and
# the dtypes' dot paths are the few-heads runs').
DECODE_RUNS = ([(dtype, "few-heads", append) for dtype in FLOAT_DTYPES for append in (False, True)]
               + [(torch.float16, "many-heads", True)])
DECODE_RUN_IDS = [f"{str(dtype).removeprefix('torch.')}-{case}-{'append' if append else 'cached'}"
                  for dtype, case, append in DECODE_RUNS]


def run_decode_attention(dtype, case, append):
    """(q, k_cache, v_cache, lengths, k_new, v_new) as they were, decode_attention_forward's output launched
    for the H100, and the caches after it; with append, k_new and v_new (else None) are the newest Tq tokens',
    which the launch writes into the caches."""
    B, H, S, D, lengths, Tq = DECODE_CASES[case]
    q, k, v, lengths_t = decode_case(B, H, S, D, [n - Tq for n in lengths] if append else lengths, Tq, dtype)
    k_new = v_new = None
    if append:
        lengths_t += Tq
        k_new, v_new = (randn(B, H, Tq, D, dtype=dtype, device=DEVICE, seed=seed) for seed in (20, 21))
    inputs = (q, k.clone(), v.clone(), lengths_t, k_new, v_new)
    return inputs, decode_attention.decode_attention_forward(q, k, v, lengths_t, k_new, v_new, target=H100), (k, v)


@pytest.mark.parametrize("dtype,case,append", DECODE_RUNS, ids=DECODE_RUN_IDS)
def test_decode_attention(poisoned_empty, dtype, case, append):
    (q, k, v, lengths, k_new, v_new), y, (k_after, v_after) = run_decode_attention(dtype, case, append)
    Tq = q.shape[2]
    if append:
        for b, length in enumerate(lengths.tolist()):
            k[b, :, length - Tq:length], v[b, :, length - Tq:length] = k_new[b], v_new[b]
    # The new tokens written where they go, nothing else touched.
    torch.testing.assert_close(k_after, k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_after, v, rtol=0, atol=0, equal_nan=True)
    assert y.dtype == dtype
    assert_close(y, naive_decode_attention(q, k, v, lengths))


# ---- sample ----

# (B, V): rows wider than a 4096-wide tile, one per program, read in two blocks (the second of 904 columns);
# rows of 100 in blocks of 128, 32 stacked per program, the second program's last 24 rows past B.
SAMPLE_SHAPES = {"wide": (2, 5000), "stacked": (40, 100)}
SAMPLE_PARAMS = {"plain": dict(), "top_k": dict(top_k=7), "top_p": dict(top_p=0.9),
                 "both": dict(temperature=0.7, top_k=30, top_p=0.8)}


def sampling(params):
    """(temperature, top_k, top_p) of SAMPLE_PARAMS' entry, 0 and 1 meaning off."""
    return params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0)


def run_sample(shape, params, seed):
    """(logits, sample_forward's ids) launched for the H100; logits of spread 4, as GPT-2's."""
    B, V = SAMPLE_SHAPES[shape]
    logits = randn(B, V, device=DEVICE, seed=B, scale=4.0)
    seed = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    return logits, sample.sample_forward(logits, *sampling(SAMPLE_PARAMS[params]), seed, target=H100)


@pytest.mark.parametrize("params", SAMPLE_PARAMS)
@pytest.mark.parametrize("shape", SAMPLE_SHAPES)
def test_sample(poisoned_empty, shape, params):
    V = SAMPLE_SHAPES[shape][1]
    for seed in range(2):
        logits, ids = run_sample(shape, params, seed)
        assert 0 <= ids.min() and ids.max() < V  # -1, the poison, where a row's id was not written
        for row, token in zip(logits.cpu(), ids.tolist()):
            # The fp32 sums may rightly disagree with fp64 within the margin on the nucleus boundary.
            assert kept_tokens(row, *sampling(SAMPLE_PARAMS[params]), top_p_margin=1e-5)[token], (seed, token)


# ---- cross_entropy ----

CE_ROWS = 8  # every third target ignored, one in the last tile
CE_VOCAB = cross_entropy.MAX_BLOCK + 3  # rows read in two tiles, the second of 3 logits


def run_cross_entropy(dtype, grads):
    """(x, weight, targets), then the triton backend's (mean loss, dx, dweight), gradients if asked: the row
    kernel in the ops layer's chunk loop."""
    x, weight, targets = (t.detach().to(DEVICE) for t in cross_entropy_inputs((CE_ROWS,), 16, CE_VOCAB, dtype,
                                                                               ignore_every=3))
    targets[0] = CE_VOCAB - 1
    return (x, weight, targets), custom_ops.linear_cross_entropy_chunks(x, weight, targets, -100, True, grads, grads,
                                                                         cross_entropy.cross_entropy_rows)


@pytest.mark.parametrize("grads", [True, False], ids=["grads", "loss"])
def test_cross_entropy(poisoned_empty, dtype, grads):
    (x, weight, targets), (loss, dx, dweight) = run_cross_entropy(dtype, grads)
    want = cross_entropy_oracle(x, weight, targets)  # the loss, and the gradients of GRAD_SCALE * loss
    if grads:
        assert_matches((loss, GRAD_SCALE * dx, GRAD_SCALE * dweight), want, dtype)
    else:
        assert dx is None and dweight is None
        assert_matches((loss,), want[:1], dtype)


# ---- the configurations are the H100's ----


class Launch(NamedTuple):
    kernel: str  # the @triton.jit function's name
    grid: tuple
    args: dict  # its arguments by name, and the launch options (num_warps)


@pytest.fixture
def launches(monkeypatch):
    """The kernel launches the test makes, in order, recorded and not run (their outputs stay unwritten)."""
    made = []

    def record(kernel, *args, grid, warmup, **options):
        made.append(Launch(kernel.fn.__name__, tuple(grid), dict(zip(kernel.arg_names, args)) | options))

    monkeypatch.setattr(type(layer_norm._forward_kernel), "run", record)  # the interpreter's class, or the JIT's
    return made


def picked(launch, *names):
    return tuple(launch.args[name] for name in names)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_launches_are_the_h100s(launches, with_residual):
    run_layer_norm(torch.float32, with_residual)
    rows, width = math.prod(LN_SHAPE[:-1]), LN_SHAPE[-1]
    programs = layer_norm.backward_program_count(rows, H100)
    assert programs == H100.sm_count < rows  # every SM busy, and some programs take a second row
    assert [(launch.kernel, launch.grid) for launch in launches] == [("_forward_kernel", (rows,)),
                                                                      ("_backward_kernel", (programs,))]
    for launch in launches:  # the width decides the rest, on every machine
        assert picked(launch, "BLOCK", "num_warps") == layer_norm._block_and_warps(width)
    assert launches[0].args["HAS_RESIDUAL"] == launches[1].args["HAS_DH"] == with_residual


def test_bias_gelu_launches_are_the_h100s(launches):
    run_bias_gelu(torch.float32)
    rows, width = math.prod(GELU_SHAPE[:-1]), GELU_SHAPE[-1]
    block_m, block_n, grid = bias_gelu._tiles(rows, width)  # the shape decides, on every machine
    assert rows % block_m and width % block_n and min(grid) > 1  # partial tiles down and across
    assert [(launch.kernel, launch.grid, picked(launch, "BLOCK_M", "BLOCK_N")) for launch in launches] == [
        ("_forward_kernel", grid, (block_m, block_n)), ("_backward_kernel", grid, (block_m, block_n))]


@pytest.mark.parametrize("shape,hidden,save_pre", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,target", PRECISIONS, ids=PRECISION_IDS)
def test_gelu_mlp_launches_are_the_h100s(launches, dtype, target, shape, hidden, save_pre):
    run_gelu_mlp(dtype, target, shape, hidden, save_pre)
    rows, width = math.prod(shape[:-1]), shape[-1]
    (block_m, block_n, block_k), precision = gelu_mlp.launch_config(dtype, rows, target)
    assert rows % block_m and hidden % block_n and width % block_k  # partial blocks every way
    assert [picked(launch, "GELU", "STORE_PRE") for launch in launches] == [(True, save_pre), (False, False)]
    for launch, N in zip(launches, (hidden, width)):
        assert launch.grid == (triton.cdiv(rows, block_m) * triton.cdiv(N, block_n),)
        assert picked(launch, "BLOCK_M", "BLOCK_N", "BLOCK_K", "PRECISION") == (block_m, block_n, block_k, precision)
        assert launch.args["UPCAST"] == upcasts_dot_operands(dtype)  # the interpreter's, for bf16 only


@pytest.mark.parametrize("dtype,target", PRECISIONS, ids=PRECISION_IDS)
def test_causal_attention_launches_are_the_h100s(launches, dtype, target):
    run_causal_attention(dtype, target)
    B, H, T, D = ATTENTION_SHAPE
    forward, backward = (causal_attention.launch_config(dtype, D, b, target) for b in (False, True))
    assert [launch.kernel for launch in launches] == ["_forward_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"]
    # (launch, its configuration, the names of its rows per program and per step)
    tiled = [(launches[0], forward, ("BLOCK_M", "BLOCK_N")), (launches[2], backward, ("BLOCK_N", "BLOCK_M")),
             (launches[3], backward, ("BLOCK_M", "BLOCK_N"))]
    for launch, config, tile_names in tiled:
        per_program, per_step = config.tiles
        assert T > per_program and T % per_program and T % per_step  # blocks and steps that end past T
        assert launch.grid == (B * H, triton.cdiv(T, per_program))
        assert picked(launch, *tile_names, "PRECISION", "num_warps") == (*config.tiles, config.precision,
                                                                          config.num_warps)
        assert launch.args["UPCAST"] == upcasts_dot_operands(dtype)  # the interpreter's, for bf16 only


@pytest.mark.parametrize("dtype,case,append", DECODE_RUNS, ids=DECODE_RUN_IDS)
def test_decode_attention_launches_are_the_h100s(launches, dtype, case, append):
    run_decode_attention(dtype, case, append)
    B, H, S, _, _, Tq = DECODE_CASES[case]
    split = decode_attention.cache_split(B * H, S, H100)
    if case == "few-heads":  # bound by the cache's length: chunks of one block
        assert split.splits == triton.cdiv(S, 64) > 1 and split.chunk == split.block_n
    else:  # bound by the SM count: chunks of several blocks, a count that is no power of two
        assert split.splits < triton.cdiv(S, 64) and split.chunk > split.block_n
        assert split.splits != triton.next_power_of_2(split.splits)
    assert [(launch.kernel, launch.grid) for launch in launches] == [("_split_kernel", (B * H, split.splits)),
                                                                      ("_combine_kernel", (B * H, Tq))]
    assert picked(launches[0], "num_splits", "chunk", "BLOCK_N") == split
    # fp32 products for fp32 (never TF32), and for the interpreter's bf16.
    assert picked(launches[0], "FP32_DOT", "APPEND") == (dtype == torch.float32 or upcasts_dot_operands(dtype), append)
    assert launches[1].args["num_splits"] == split.splits


@pytest.mark.parametrize("shape", SAMPLE_SHAPES)
def test_sample_launches_are_the_h100s(launches, shape):
    run_sample(shape, "both", seed=0)
    B, V = SAMPLE_SHAPES[shape]
    rows, block = sample.tile_shape(B, V, H100)
    if shape == "wide":  # a row per program, read in blocks
        assert rows == 1 and block < V
    else:  # a block per row, rows stacked, the last program's partly past B
        assert block >= V and 1 < rows and B % rows
    (launch,) = launches
    assert launch.grid == (triton.cdiv(B, rows),) and picked(launch, "ROWS", "BLOCK") == (rows, block)


def test_cross_entropy_launches_are_the_h100s(launches):
    run_cross_entropy(torch.float32, grads=True)
    (launch,) = launches  # one chunk of rows; the vocabulary decides its tiles, on every machine
    assert launch.kernel == "_cross_entropy_kernel" and launch.grid == (CE_ROWS,)
    assert launch.args["BLOCK"] == cross_entropy.MAX_BLOCK < CE_VOCAB


def test_a_cuda_device_with_132_sms_is_the_h100_target(monkeypatch):
    """What a launch with no target runs on an H100 (Target.of its device, where the kernels are compiled) is
    the H100 target the tests above launch for."""
    monkeypatch.setattr("gpt2fast.kernels.target.INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    for allow_tf32, target in [(False, H100), (True, H100_TF32)]:
        monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=allow_tf32))
        assert Target.of(torch.device("cuda", 0)) == target
