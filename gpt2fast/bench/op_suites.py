"""The per-op suites: shapes, inputs, the work a call must do, and the peers each op is measured against.

GPU shapes are GPT-2's (small: width 768, xl: 1600; 1024-token context); CPU shapes are cut so that the
whole CPU run takes minutes. Backends are not named here: every registered one is measured (suite.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .suite import Case, Impl, Setting, nbytes, suite

EPS = 1e-5
VOCAB = 50257


# ---- layer_norm: memory-bound; with a residual it also adds and writes the new residual stream ----

def _unfused(norm):
    """A LayerNorm as the op computes it, from an unfused norm(h, weight, bias, eps): add, then normalise."""
    def layer_norm(x, weight, bias, eps, residual):
        h = x if residual is None else x + residual
        y = norm(h, weight, bias, eps)
        return y if residual is None else (y, h)
    return layer_norm


def _torch_layer_norm(h, weight, bias, eps):
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def _liger_layer_norm(h, weight, bias, eps):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction  # optional: skipped where it does not import
    return LigerLayerNormFunction.apply(h, weight, bias, eps)


def _layer_norm_bytes(x, weight, bias, eps, residual):
    writes = 2 if residual is not None else 1  # y, and h = x + residual
    return nbytes(x, weight, bias, residual) + writes * nbytes(x)


@suite("layer_norm")
def layer_norm(s: Setting) -> list[Case]:
    shapes = s.pick(gpu=[(8192, 768), (65536, 768), (8192, 1600)], cpu=[(2048, 768), (8192, 768), (2048, 1600)],
                    quick=[(1024, 768)])
    peers = {"F.layer_norm": Impl(_unfused(_torch_layer_norm)), "liger": Impl(_unfused(_liger_layer_norm))}

    def case(rows, width, residual):
        def make_args():
            r = s.randn(rows, width) if residual else None
            return s.randn(rows, width), s.randn(width), s.randn(width), EPS, r
        return Case("layer_norm", f"{rows}x{width}" + (" +residual" if residual else ""),
                    dict(rows=rows, width=width, residual=residual), make_args, _layer_norm_bytes, "bytes", peers)

    return [case(rows, width, residual) for rows, width in shapes for residual in (False, True)]


# ---- bias_gelu: the fused epilogue, memory-bound ----

def _bias_gelu_bytes(x, bias):
    return nbytes(x, bias) + nbytes(x)  # x and bias read, an output the size of x written


@suite("bias_gelu")
def bias_gelu(s: Setting) -> list[Case]:
    # On the CPU also a decode step's rows at batch 16 and 64 (the weight-only quantized MLP's activation).
    shapes = s.pick(gpu=[(8192, 3072)], cpu=[(16, 3072), (64, 3072), (2048, 3072)], quick=[(256, 3072)])
    peers = {"eager": Impl(lambda x, bias: F.gelu(x + bias, approximate="tanh"))}
    return [Case("bias_gelu", f"{rows}x{width}", dict(rows=rows, width=width),
                 lambda rows=rows, width=width: (s.randn(rows, width), s.randn(width)),
                 _bias_gelu_bytes, "bytes", peers)
            for rows, width in shapes]


# ---- causal_attention (prefill): compute-bound ----

SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH)


def _causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _causal_flops(q, k, v):
    B, H, T, D = q.shape
    return 2 * (2 * B * H * T * T * D) // 2  # QK^T and PV, 2*T*T*D flops each per head; the mask halves both


@suite("causal_attention")
def causal_attention(s: Setting) -> list[Case]:
    shapes = s.pick(gpu=[(8, 12, 1024, 64), (4, 25, 1024, 64)], cpu=[(1, 12, 512, 64), (1, 25, 512, 64)],
                    quick=[(1, 12, 128, 64)])
    # One peer per SDPA kernel; the device lacks some (the CPU has flash and math only): their first call says so.
    peers = {f"sdpa {b.name.removesuffix('_ATTENTION').lower()}": Impl(_causal_sdpa, context=lambda b=b: sdpa_kernel(b))
             for b in SDPA_BACKENDS}
    return [Case("causal_attention", "x".join(map(str, shape)), dict(zip("BHTD", shape)),
                 lambda shape=shape: tuple(s.randn(*shape) for _ in range(3)), _causal_flops, "flops", peers)
            for shape in shapes]


# ---- decode_attention: one new token per sequence against its KV cache, memory-bound ----

def _sdpa_length_mask(q, k_cache, v_cache, lengths):
    valid = torch.arange(k_cache.shape[2], device=q.device) < lengths[:, None]  # [B, S]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid[:, None, None, :])


def _decode_bytes(q, k_cache, v_cache, lengths):
    B, H, _, D = k_cache.shape
    cache_read = 2 * H * D * k_cache.element_size() * int(lengths.sum())  # only the valid entries must be read
    return 2 * nbytes(q) + cache_read + nbytes(lengths)  # q read, output written (same shape)


@suite("decode_attention")
def decode_attention(s: Setting) -> list[Case]:
    # CPU: one sequence at GPT-2's context, a few, and a batch decoded together (64 sequences, short caches).
    shapes = s.pick(gpu=[(16, 12, 1024, 64)], cpu=[(1, 12, 1024, 64), (4, 12, 512, 64), (64, 12, 128, 64)],
                    quick=[(2, 12, 128, 64)])

    def make_args(B, H, S, D):
        lengths = torch.randint(S // 2, S + 1, (B,), device=s.device)  # a batch of sequences at different lengths
        return s.randn(B, H, 1, D), s.randn(B, H, S, D), s.randn(B, H, S, D), lengths

    return [Case("decode_attention", f"B{B} H{H} cache {S} D{D}", dict(B=B, H=H, S=S, D=D),
                 lambda shape=(B, H, S, D): make_args(*shape), _decode_bytes, "bytes",
                 {"sdpa + length mask": Impl(_sdpa_length_mask)})
            for B, H, S, D in shapes]


# ---- gelu_mlp: two matmuls around a GELU, compute-bound ----

def _eager_mlp(x, w_fc, b_fc, w_proj, b_proj):
    return torch.addmm(b_proj, F.gelu(torch.addmm(b_fc, x, w_fc), approximate="tanh"), w_proj)


def _matmuls_only(x, w_fc, b_fc, w_proj, b_proj):
    return (x @ w_fc) @ w_proj  # the floor: the same matmuls with nothing around them


def _mlp_flops(x, w_fc, b_fc, w_proj, b_proj):
    return 2 * 2 * x.shape[0] * w_fc.shape[0] * w_fc.shape[1]  # two matmuls of rows x width x hidden


@suite("gelu_mlp")
def gelu_mlp(s: Setting) -> list[Case]:
    # A decode step's rows (where the weights' reading is the cost) and a prefill's.
    shapes = s.pick(gpu=[(8192, 768, 3072)],
                    cpu=[(1, 768, 3072), (4, 768, 3072), (16, 768, 3072), (64, 768, 3072), (512, 768, 3072)],
                    quick=[(64, 768, 3072)])
    compiled = ("not run with --quick on the CPU: compiling takes longer than the whole run"
                if s.quick and s.device == "cpu" else Impl(torch.compile(_eager_mlp, dynamic=False)))
    peers = {"eager": Impl(_eager_mlp), "torch.compile": compiled, "matmuls only": Impl(_matmuls_only)}

    def make_args(rows, width, hidden):
        return (s.randn(rows, width), s.randn(width, hidden, scale=width**-0.5), s.randn(hidden),
                s.randn(hidden, width, scale=hidden**-0.5), s.randn(width))

    return [Case("gelu_mlp", f"{rows}x{width}->{hidden}->{width}", dict(rows=rows, width=width, hidden=hidden),
                 lambda shape=(rows, width, hidden): make_args(*shape), _mlp_flops, "flops", peers)
            for rows, width, hidden in shapes]


# ---- sample: top-p over GPT-2's vocabulary ----

TOP_P = 0.9


def _hf_top_p_sample(logits, temperature, top_k, top_p, generator):
    """transformers' sampling: logits to fp32, TemperatureLogitsWarper, TopPLogitsWarper (an ascending sort,
    cumulative softmax, drop what stays <= 1 - top_p, keep the last), softmax, multinomial."""
    scores = logits.float() / temperature
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    probs = scores.masked_fill(remove, -math.inf).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _sample_bytes(logits, *_):
    return nbytes(logits) + 8 * logits.shape[0]  # the logits read, one int64 id per row written


@suite("sample")
def sample(s: Setting) -> list[Case]:
    batches = s.pick(gpu=[1, 16, 256], cpu=[1, 16, 64], quick=[1])

    def make_args(batch):
        # Peaked like a trained model's logits (scale 4): the 0.9 nucleus is a few hundred tokens, not half the vocabulary.
        generator = torch.Generator(device=s.device).manual_seed(0)
        return s.randn(batch, VOCAB, scale=4.0), 1.0, None, TOP_P, generator

    def greedy_args(batch):
        return s.randn(batch, VOCAB, scale=4.0), 0.0

    top_p = [Case("sample", f"B{batch} V{VOCAB} top-p {TOP_P}", dict(B=batch, V=VOCAB, top_p=TOP_P),
                  lambda batch=batch: make_args(batch), _sample_bytes, "bytes",
                  {"HF top-p": Impl(_hf_top_p_sample)})
             for batch in batches]
    # Greedy (temperature 0) at a decode step's batches, with torch's max (values and indices) beside argmax.
    greedy = [Case("sample", f"B{batch} V{VOCAB} greedy", dict(B=batch, V=VOCAB, top_p=None),
                   lambda batch=batch: greedy_args(batch), _sample_bytes, "bytes",
                   {"max indices": Impl(lambda logits, temperature: logits.max(dim=-1).indices)})
              for batch in s.pick(gpu=[16, 256], cpu=[16, 64], quick=[16])]
    return top_p + greedy


# ---- linear_cross_entropy: the LM head and its loss, forward and backward, compute-bound ----

def _unfused_cross_entropy(x, weight, targets, ignore_index, reduction):
    """What a training step does without the op: all the logits, then the loss, then both gradients."""
    loss = F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index, reduction=reduction)
    return loss, *torch.autograd.grad(loss, (x, weight))


def _liger_cross_entropy(x, weight, targets, ignore_index, reduction):
    # optional: skipped where it does not import; like the op, it computes the gradients in its forward
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)(weight, x, targets)


def _cross_entropy_flops(x, weight, *_):
    return 3 * 2 * x.shape[0] * x.shape[1] * weight.shape[0]  # the logits, then the gradients of x and weight


@suite("linear_cross_entropy")
def linear_cross_entropy(s: Setting) -> list[Case]:
    shapes = s.pick(gpu=[(8192, 768), (8192, 1600)], cpu=[(256, 768)], quick=[(32, 256)])
    peers = {"F.cross_entropy(x @ W.T)": Impl(_unfused_cross_entropy), "liger": Impl(_liger_cross_entropy)}

    def make_args(rows, width):
        # x and weight require grad, so that every backend computes the gradients in the call timed.
        x = s.randn(rows, width).requires_grad_()
        weight = s.randn(VOCAB, width, scale=width**-0.5).requires_grad_()
        return x, weight, torch.randint(0, VOCAB, (rows,), device=s.device), -100, "mean"

    return [Case("linear_cross_entropy", f"{rows}x{width} V{VOCAB} fwd+bwd", dict(rows=rows, width=width, V=VOCAB),
                 lambda shape=(rows, width): make_args(*shape), _cross_entropy_flops, "flops", peers)
            for rows, width in shapes]


# ---- linear: x @ W + b, W [in, out]; a decode step's few rows read the whole weight: memory-bound there ----

def _linear_bytes(x, weight, bias):
    return nbytes(x, weight, bias) + x.shape[0] * weight.shape[1] * x.element_size()


@suite("linear")
def linear(s: Setting) -> list[Case]:
    # GPT-2 small's attention input projection, at a decode step's rows and at a prefill's.
    shapes = s.pick(gpu=[(1, 768, 2304), (16, 768, 2304), (8192, 768, 2304)],
                    cpu=[(1, 768, 2304), (4, 768, 2304), (8, 768, 2304), (16, 768, 2304), (64, 768, 2304),
                         (256, 768, 2304)], quick=[(1, 768, 2304)])
    peers = {"F.linear(x, W.T)": Impl(lambda x, weight, bias: F.linear(x, weight.T, bias))}  # what nn.Linear runs

    def make_args(rows, width, out):
        return s.randn(rows, width), s.randn(width, out, scale=width**-0.5), s.randn(out)

    return [Case("linear", f"{rows}x{width}->{out}", dict(rows=rows, width=width, out=out),
                 lambda shape=(rows, width, out): make_args(*shape), _linear_bytes, "bytes", peers)
            for rows, width, out in shapes]


# ---- lm_head: the logits x @ wte^T over GPT-2's vocabulary; at decoding, reading wte is the cost ----

def _lm_head_bytes(x, weight):
    return nbytes(x, weight) + x.shape[0] * weight.shape[0] * x.element_size()


@suite("lm_head")
def lm_head(s: Setting) -> list[Case]:
    shapes = s.pick(gpu=[(1, 768), (16, 768), (1, 1600)], cpu=[(1, 768), (4, 768), (8, 768), (16, 768), (64, 768)],
                    quick=[(1, 768)])
    peers = {"F.linear": Impl(F.linear)}  # what transformers' lm_head runs

    def make_args(rows, width):
        return s.randn(rows, width), s.randn(VOCAB, width, scale=width**-0.5)

    return [Case("lm_head", f"{rows}x{width}->V{VOCAB}", dict(rows=rows, width=width, V=VOCAB),
                 lambda shape=(rows, width): make_args(*shape), _lm_head_bytes, "bytes", peers)
            for rows, width in shapes]


# ---- quantized_linear: weight-only int8 / bf16; a decode step's few rows read the stored weights ----

def _quantized_bytes(x, weight, scale, bias):
    return nbytes(x, weight, scale, bias) + x.shape[0] * weight.shape[0] * x.element_size()


def _int8pack_mm(x, weight, scale, bias):
    """PyTorch's own int8 weight-only matmul (the kernel torchao's int8 weight-only CPU path calls)."""
    if weight.dtype != torch.int8:
        raise TypeError("torch._weight_int8pack_mm takes int8 weights only")
    y = torch._weight_int8pack_mm(x, weight, scale)
    return y if bias is None else y + bias


@suite("quantized_linear")
def quantized_linear(s: Setting) -> list[Case]:
    # GPT-2 small's attention input projection and its LM head, at a decode step's rows (1, 16 and 64
    # sequences), int8 with its scales and bf16; the fp32 matmul of the same shape is the `linear` suite.
    shapes = s.pick(gpu=[(1, 768, 2304), (16, 768, 2304), (64, 768, 2304), (1, 768, VOCAB)],
                    cpu=[(1, 768, 2304), (16, 768, 2304), (64, 768, 2304), (1, 768, VOCAB)], quick=[(1, 768, 2304)])
    peers = {"torch._weight_int8pack_mm": Impl(_int8pack_mm)}

    def make_args(rows, width, out, scheme):
        x, bias = s.randn(rows, width), s.randn(out)
        if scheme == "bf16":
            return x, s.randn(out, width, scale=width**-0.5).to(torch.bfloat16), None, bias
        q = torch.randint(-127, 128, (out, width), dtype=torch.int8, device=x.device)
        return x, q, torch.rand(out, device=x.device) / (127 * width**0.5), bias

    return [Case("quantized_linear", f"{scheme} {rows}x{width}->{out}",
                 dict(rows=rows, width=width, out=out, weights=scheme),
                 lambda shape=(rows, width, out, scheme): make_args(*shape), _quantized_bytes, "bytes",
                 peers if scheme == "int8" else {})
            for scheme in ("int8", "bf16") for rows, width, out in shapes]
