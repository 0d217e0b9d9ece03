"""ops.causal_attention and ops.decode_attention against explicit fp64 QK^T / mask / softmax / @V."""
import math

import pytest
import torch

import gpt2fast
from gpt2fast import ops
from conftest import assert_close, randn


def softmax64(scores: torch.Tensor) -> torch.Tensor:
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def naive_causal_attention(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    T, D = q.shape[-2:]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return softmax64(scores.masked_fill(future, -math.inf)) @ v


def naive_decode_attention(q, k_cache, v_cache, lengths):
    """Reads only each sequence's valid prefix, one query at a time."""
    B, H, Tq, D = q.shape
    out = torch.empty(B, H, Tq, D, dtype=torch.float64, device=q.device)
    for b, length in enumerate(lengths.tolist()):
        for i in range(Tq):
            position = length - Tq + i
            keys = k_cache[b, :, :position + 1].double()
            values = v_cache[b, :, :position + 1].double()
            scores = (q[b, :, i, None].double() @ keys.transpose(-1, -2)) / math.sqrt(D)  # [H, 1, pos+1]
            out[b, :, i] = (softmax64(scores) @ values)[:, 0]
    return out


def qkv(shape, dtype, device, seed=0, requires_grad=False):
    # q at twice the scale of k so that the softmax is far from uniform.
    tensors = (randn(*shape, dtype=dtype, device=device, seed=seed, scale=2.0),
               randn(*shape, dtype=dtype, device=device, seed=seed + 1),
               randn(*shape, dtype=dtype, device=device, seed=seed + 2))
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def kv_cache(B, H, S, D, lengths, dtype, device, seed=0, garbage=1e3):
    """Random caches whose entries beyond each length hold `garbage` (large finite values, or NaN)."""
    k = randn(B, H, S, D, dtype=dtype, device=device, seed=seed)
    v = randn(B, H, S, D, dtype=dtype, device=device, seed=seed + 1)
    for b, length in enumerate(lengths):
        if math.isnan(garbage):
            k[b, :, length:] = v[b, :, length:] = math.nan
        else:
            k[b, :, length:] = randn(H, S - length, D, dtype=dtype, device=device, seed=seed + 2 + b, scale=garbage)
            v[b, :, length:] = randn(H, S - length, D, dtype=dtype, device=device, seed=seed + 9 + b, scale=garbage)
    return k, v


# ---- causal_attention (prefill) ----

CAUSAL_SHAPES = [(1, 1, 1, 64), (2, 3, 77, 64), (1, 2, 77, 32), (3, 2, 33, 128), (1, 4, 1, 128), (2, 1, 50, 32)]


@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=str)
def test_causal_attention_matches_naive(backend, device, dtype, shape):
    q, k, v = qkv(shape, dtype, device)
    with gpt2fast.use_backend(backend):
        y = ops.causal_attention(q, k, v)
    assert y.dtype == dtype and y.device == q.device
    assert_close(y, naive_causal_attention(q, k, v))


def test_causal_attention_is_causal(backend, device):
    """Changing the keys and values of the last token changes only the last row."""
    q, k, v = qkv((2, 3, 20, 64), torch.float32, device, seed=5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 1.0
    v2[:, :, -1] -= 1.0
    with gpt2fast.use_backend(backend):
        y, y2 = ops.causal_attention(q, k, v), ops.causal_attention(q, k2, v2)
    assert_close(y[:, :, :-1], y2[:, :, :-1].double())
    assert (y[:, :, -1] - y2[:, :, -1]).abs().max() > 0.1


def test_causal_attention_non_contiguous_input(backend, device):
    # [B, T, H, D] transposed to [B, H, T, D]: the layout the model hands over.
    q, k, v = (t.transpose(1, 2) for t in qkv((2, 77, 3, 64), torch.float32, device, seed=3))
    assert not q.is_contiguous()
    with gpt2fast.use_backend(backend):
        y = ops.causal_attention(q, k, v)
    assert_close(y, naive_causal_attention(q, k, v))


@pytest.mark.parametrize("shape", [(2, 3, 77, 64), (1, 2, 9, 128), (1, 1, 1, 32)], ids=str)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_causal_attention_backward_matches_naive(backend, device, grad_dtype, shape):
    q, k, v = qkv(shape, grad_dtype, device, seed=13, requires_grad=True)
    grad_y = randn(*shape, dtype=grad_dtype, device=device, seed=30)
    with gpt2fast.use_backend(backend):
        loss = (ops.causal_attention(q, k, v) * grad_y).sum()
    grads = torch.autograd.grad(loss, (q, k, v))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    loss64 = (naive_causal_attention(q64, k64, v64) * grad_y.double()).sum()
    expected = torch.autograd.grad(loss64, (q64, k64, v64))
    for name, got, want in zip("qkv", grads, expected):
        assert got.dtype == grad_dtype, name
        assert_close(got, want, scale=4, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 12, 1024, 64), (1, 25, 1024, 64), (2, 4, 512, 128)], ids=str)
def test_causal_attention_gpt2_shapes_on_gpu(backend, dtype, shape):
    q, k, v = qkv(shape, dtype, "cuda")
    with gpt2fast.use_backend(backend):
        y = ops.causal_attention(q, k, v)
    assert_close(y, naive_causal_attention(q, k, v))


# ---- decode_attention ----

# (B, H, S, D, lengths, Tq): lengths differ per sequence, down to one token and up to a full cache.
DECODE_CASES = [
    (3, 2, 20, 64, [1, 9, 20], 1),
    (3, 2, 20, 64, [3, 9, 20], 3),
    (1, 3, 77, 32, [77], 1),
    (2, 2, 40, 128, [5, 33], 3),
    (4, 1, 16, 64, [16, 1, 7, 2], 1),
    (2, 2, 9, 32, [3, 3], 3),
    (5, 2, 24, 64, [17] * 5, 1),  # a batch decoded together: one length
]


def _decode_id(case):
    B, H, S, D, lengths, Tq = case
    return f"B{B}-H{H}-S{S}-D{D}-len{'_'.join(map(str, lengths))}-Tq{Tq}"


@pytest.mark.parametrize("lengths_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
@pytest.mark.parametrize("garbage", [math.nan, 1e3], ids=["nan", "large"])
def test_decode_attention_matches_naive_on_valid_prefix(backend, device, dtype, case, lengths_dtype, garbage):
    """Cache entries past each length hold NaN (as a torch.empty cache may) or large values: never read."""
    B, H, S, D, lengths, Tq = case
    q = randn(B, H, Tq, D, dtype=dtype, device=device, seed=1, scale=2.0)
    k, v = kv_cache(B, H, S, D, lengths, dtype, device, seed=2, garbage=garbage)
    lengths_t = torch.tensor(lengths, dtype=lengths_dtype, device=device)
    with gpt2fast.use_backend(backend):
        y = ops.decode_attention(q, k, v, lengths_t)
    assert y.dtype == dtype and y.shape == (B, H, Tq, D)
    assert_close(y, naive_decode_attention(q, k, v, lengths_t))


@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_attention_is_causal_within_new_tokens(backend, device, Tq):
    """Query i of the Tq new tokens ignores the keys and values of the new tokens after it."""
    B, H, S, D, lengths = 2, 2, 16, 64, [6, 11]
    q = randn(B, H, Tq, D, device=device, seed=4)
    k, v = kv_cache(B, H, S, D, lengths, torch.float32, device, seed=5)
    k2, v2 = k.clone(), v.clone()
    for b, length in enumerate(lengths):  # perturb the newest token only
        k2[b, :, length - 1] += 1.0
        v2[b, :, length - 1] += 1.0
    lengths_t = torch.tensor(lengths, device=device)
    with gpt2fast.use_backend(backend):
        y, y2 = ops.decode_attention(q, k, v, lengths_t), ops.decode_attention(q, k2, v2, lengths_t)
    assert_close(y[:, :, :-1], y2[:, :, :-1].double())
    assert (y[:, :, -1] - y2[:, :, -1]).abs().max() > 0.1


@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_attention_equals_causal_attention_on_a_prompt_cache(backend, device, dtype, Tq):
    """With the cache holding exactly a prompt, decoding its last Tq tokens gives prefill's last Tq rows."""
    B, H, T, S, D = 2, 3, 29, 40, 64
    q, k, v = qkv((B, H, T, D), dtype, device, seed=8)
    k_cache, v_cache = kv_cache(B, H, S, D, [T] * B, dtype, device, seed=9)
    k_cache[:, :, :T], v_cache[:, :, :T] = k, v
    lengths = torch.full((B,), T, device=device)
    with gpt2fast.use_backend(backend):
        prefill = ops.causal_attention(q, k, v)
        decoded = ops.decode_attention(q[:, :, -Tq:], k_cache, v_cache, lengths)
    assert_close(decoded, prefill[:, :, -Tq:].double(), scale=2)


@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
def test_decode_attention_appends_new_keys_and_values(backend, device, dtype, case):
    """With k_new/v_new, the caches hold NaN where the new tokens go: the call writes them there, touches
    nothing else, and attends as if they had been there all along."""
    B, H, S, D, lengths, Tq = case
    q = randn(B, H, Tq, D, dtype=dtype, device=device, seed=11, scale=2.0)
    k_new = randn(B, H, Tq, D, dtype=dtype, device=device, seed=12)
    v_new = randn(B, H, Tq, D, dtype=dtype, device=device, seed=13)
    k, v = kv_cache(B, H, S, D, [n - Tq for n in lengths], dtype, device, seed=14, garbage=math.nan)
    expected_k, expected_v = k.clone(), v.clone()
    for b, length in enumerate(lengths):
        expected_k[b, :, length - Tq:length], expected_v[b, :, length - Tq:length] = k_new[b], v_new[b]
    lengths_t = torch.tensor(lengths, device=device)
    with gpt2fast.use_backend(backend):
        y = ops.decode_attention(q, k, v, lengths_t, k_new, v_new)
    torch.testing.assert_close(k, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v, expected_v, rtol=0, atol=0, equal_nan=True)
    assert_close(y, naive_decode_attention(q, expected_k, expected_v, lengths_t))


@pytest.mark.gpu
@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_attention_gpt2_shapes_on_gpu(backend, dtype, Tq):
    B, H, S, D = 8, 12, 1024, 64
    lengths = torch.randint(Tq, S + 1, (B,), generator=torch.Generator().manual_seed(0)).tolist()
    q = randn(B, H, Tq, D, dtype=dtype, device="cuda", seed=1)
    k, v = kv_cache(B, H, S, D, lengths, dtype, "cuda", seed=2, garbage=math.nan)
    lengths_t = torch.tensor(lengths, device="cuda")
    with gpt2fast.use_backend(backend):
        y = ops.decode_attention(q, k, v, lengths_t)
    assert_close(y, naive_decode_attention(q, k, v, lengths_t))


@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
def test_reference_decode_path_matches_naive(case):
    """The reference itself (which masks the whole cache, with no host sync), whatever `auto` runs on the CPU,
    with NaN past each length."""
    from gpt2fast.ops.reference import decode_attention as decode_attention_masked

    B, H, S, D, lengths, Tq = case
    q = randn(B, H, Tq, D, seed=1, scale=2.0)
    k, v = kv_cache(B, H, S, D, lengths, torch.float32, "cpu", seed=2, garbage=math.nan)
    lengths_t = torch.tensor(lengths)
    assert_close(decode_attention_masked(q, k, v, lengths_t), naive_decode_attention(q, k, v, lengths_t))
