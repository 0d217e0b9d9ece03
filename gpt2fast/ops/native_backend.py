"""The `native` backend: the C++ and CUDA kernels of csrc/, built into the extension module gpt2fast._C.

The extension defines each op as a PyTorch operator, `gpt2fast::<op>_native`, with a CPU kernel, a CUDA
kernel or both (csrc/bindings.cpp checks the tensors). Here each gets its fake function (torch.compile
traces through it), its autograd formula where training needs one, and its registration with
gpt2fast.ops. Importing this module never loads the extension: the probe does, on first use, and reads
the kernels' limits from it (csrc/gpt2fast.h states them, and nothing else does).
"""
from typing import Optional

import torch
from torch import Tensor

from . import custom_ops, reference
from .registry import register, register_backend

NAME = "native"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REBUILD = "`pip install --no-build-isolation -e .` where torch is installed"

# The kernels' limits, from gpt2fast._C.limits() (csrc/gpt2fast.h's constants); filled by the probe, which
# always runs before any `supports`, so that those are plain lookups that torch.compile can trace.
LAYER_NORM_MAX_WIDTH = 0
CAUSAL_HEAD_DIMS: tuple[int, ...] = ()
DECODE_HEAD_DIMS: tuple[int, ...] = ()
DECODE_MAX_QUERIES = 0
QUANTIZED_AMX = False  # whether the CPU quantized_linear's widest build here is its AMX one
DECODE_CPU_VECTORIZED = False  # whether the CPU decode_attention runs its AVX-512 build here
BIAS_GELU_CPU_VECTORIZED = False  # whether the CPU bias_gelu runs its AVX-512 build here


def _probe() -> Optional[str]:
    global LAYER_NORM_MAX_WIDTH, CAUSAL_HEAD_DIMS, DECODE_HEAD_DIMS, DECODE_MAX_QUERIES, QUANTIZED_AMX, \
        DECODE_CPU_VECTORIZED, BIAS_GELU_CPU_VECTORIZED
    try:
        from gpt2fast import _C  # loading it defines the operators
    except ImportError as e:
        return f"the extension gpt2fast._C is not built ({type(e).__name__}: {e}); reinstall with {REBUILD}"
    if not hasattr(_C, "limits"):
        return f"the extension gpt2fast._C is older than this gpt2fast (it has no limits()); rebuild it with {REBUILD}"
    limits = _C.limits()
    LAYER_NORM_MAX_WIDTH = limits["layer_norm_max_width"]
    CAUSAL_HEAD_DIMS = limits["causal_attention_head_dims"]
    DECODE_HEAD_DIMS = limits["decode_attention_head_dims"]
    DECODE_MAX_QUERIES = limits["decode_attention_max_queries"]
    _find_kernels()
    _register_python_parts()
    if hasattr(_C, "quantized_linear_isas"):  # the CPU matmul's build this CPU runs, for `gpt2fast backends`
        widest = _C.quantized_linear_isas()[-1]
        BACKEND.description += f"; the CPU quantized_linear runs its {widest} build"
        QUANTIZED_AMX = widest == "amx"
    DECODE_CPU_VECTORIZED = getattr(_C, "decode_attention_cpu_vectorized", lambda: False)()
    BIAS_GELU_CPU_VECTORIZED = getattr(_C, "bias_gelu_cpu_vectorized", lambda: False)()
    return None


BACKEND = register_backend(NAME, "C++ and CUDA kernels (csrc/, gpt2fast._C)", _probe)

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# (op, device type) -> whether the loaded extension has that kernel; filled by the probe, so that the
# `supports` checks are plain lookups that torch.compile can trace.
_KERNELS: dict[tuple[str, str], bool] = {}


def _find_kernels() -> None:
    """Which kernels the loaded extension has. A build without CUDA (a CPU torch, or no nvcc) has none for
    CUDA, and a build older than an op none at all."""
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith("gpt2fast::") and qualified.endswith("_native"):
            for device_type, key in _DISPATCH_KEYS.items():
                _KERNELS[qualified.split("::")[1], device_type] = \
                    torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)


def _has_kernel(op: str, device_type: str) -> bool:
    return _KERNELS.get((op, device_type), False)


def _refusal(op: str, t: Tensor, *no_grad: Optional[Tensor]) -> Optional[str]:
    """Why the operator gpt2fast::`op` cannot take t (its dtype, or no kernel for its device), or, for an op
    without a backward, the inputs `no_grad` requiring grad (None: no input); None if it can."""
    if t.dtype not in DTYPES:
        return f"dtype {t.dtype} (the kernels take float32, float16, bfloat16)"
    if no_grad and torch.is_grad_enabled():
        for g in no_grad:
            if g is not None and g.requires_grad:
                return "inputs that require grad (the kernel has no backward: the reference runs, with autograd)"
    device_type = t.device.type
    if not _has_kernel(op, device_type):
        rebuild = (" (it was built without CUDA, or before this op: with a CUDA torch and nvcc, rebuild it with "
                   f"{REBUILD})") if device_type == "cuda" else ""
        return f"tensors on {t.device}: gpt2fast._C has no {device_type} kernel of {op}{rebuild}"
    return None


def _register_python_parts() -> None:
    """Fake (meta) functions and autograd formulas of the operators the loaded extension defines (a build
    older than an op lacks it; _refusal then keeps the op on the reference)."""
    ops = torch.ops.gpt2fast
    fakes = {
        "layer_norm_native": custom_ops.layer_norm_fake,
        "layer_norm_backward_native": custom_ops.layer_norm_backward_fake,
        "bias_gelu_native": custom_ops.bias_gelu_fake,
        "bias_gelu_backward_native": custom_ops.bias_gelu_backward_fake,
        "gelu_mlp_native": custom_ops.gelu_mlp_fake,
        "causal_attention_native": custom_ops.causal_attention_fake,
        "decode_attention_native": lambda q, k_cache, v_cache, lengths: q.new_empty(q.shape),
        "decode_attention_append_native": lambda q, k_cache, v_cache, lengths, k_new, v_new: q.new_empty(q.shape),
        "sample_native": lambda logits, *params: logits.new_empty(logits.shape[0], dtype=torch.int64),
        "greedy_native": lambda logits: logits.new_empty(logits.shape[0], dtype=torch.int64),
        "quantized_linear_native": lambda x, weight, scale, bias: x.new_empty(*x.shape[:-1], weight.shape[0]),
        "quantized_linear_out_native": lambda x, weight, scale, bias, out, isa: None,
    }
    for op, fake in fakes.items():
        if hasattr(ops, op):
            torch.library.register_fake(f"gpt2fast::{op}")(fake)
    autograd = {  # built lazily: a formula names its backward op, which exists only in a build that has it
        "layer_norm_native": lambda: custom_ops.layer_norm_autograd(ops.layer_norm_backward_native),
        "bias_gelu_native": lambda: custom_ops.bias_gelu_autograd(ops.bias_gelu_backward_native),
        "gelu_mlp_native": lambda: custom_ops.gelu_mlp_autograd(ops.bias_gelu_backward_native),
    }
    for op, formula in autograd.items():
        if hasattr(ops, op):
            backward, setup_context = formula()
            torch.library.register_autograd(f"gpt2fast::{op}", backward, setup_context=setup_context)


# ---- layer_norm ----


def _layer_norm_supports(x, weight, bias, eps=1e-5, residual=None) -> Optional[str]:
    if not 0 < x.shape[-1] <= LAYER_NORM_MAX_WIDTH:
        return f"width {x.shape[-1]} (the kernels take 1 to {LAYER_NORM_MAX_WIDTH})"
    return _refusal("layer_norm_native", x)


@register("layer_norm", NAME, supports=_layer_norm_supports)
def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    y, h, _, _ = torch.ops.gpt2fast.layer_norm_native(x, weight, bias, float(eps), residual)
    return y if residual is None else (y, h)


# ---- bias_gelu and gelu_mlp ----


def _cpu_kernel_refusal(t: Tensor, vectorized: bool) -> Optional[str]:
    """Why a CPU kernel, fp32 and measured in its AVX-512 build only, cannot take t (None if it can)."""
    if t.dtype != torch.float32:
        return f"{t.dtype} on the CPU (the CPU kernel takes float32)"
    if not vectorized:
        return "a CPU without AVX-512 (the CPU kernel's portable build is not measured against torch's)"
    return None


def _bias_gelu_supports(x, bias) -> Optional[str]:
    if x.device.type != "cpu":
        return _refusal("bias_gelu_native", x)
    # The CPU kernel: fp32, forward only (the quantized MLP's activation, at inference).
    return _refusal("bias_gelu_native", x, x, bias) or _cpu_kernel_refusal(x, BIAS_GELU_CPU_VECTORIZED)


@register("bias_gelu", NAME, supports=_bias_gelu_supports)
def bias_gelu(x, bias):
    return torch.ops.gpt2fast.bias_gelu_native(x, bias)


@register("gelu_mlp", NAME, supports=lambda x, *weights: _refusal("gelu_mlp_native", x))
def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj):
    return torch.ops.gpt2fast.gelu_mlp_native(x, w_fc, b_fc, w_proj, b_proj)[0]  # act and pre: for the backward


# ---- causal_attention (inference only: the kernel has no backward yet) ----


def _causal_attention_supports(q, k, v) -> Optional[str]:
    if q.shape[3] not in CAUSAL_HEAD_DIMS:
        return f"head dim {q.shape[3]} (the kernel takes {', '.join(map(str, CAUSAL_HEAD_DIMS))})"
    return _refusal("causal_attention_native", q, q, k, v)


@register("causal_attention", NAME, supports=_causal_attention_supports)
def causal_attention(q, k, v):
    return torch.ops.gpt2fast.causal_attention_native(q, k, v)[0]  # (out, lse): lse is for a backward


# ---- decode_attention (inference only: decoding needs no autograd) ----


def _decode_attention_supports(q, k_cache, v_cache, lengths, k_new=None, v_new=None) -> Optional[str]:
    if q.shape[2] > DECODE_MAX_QUERIES:
        return f"{q.shape[2]} queries (the kernel takes 1 to {DECODE_MAX_QUERIES})"
    if q.shape[3] not in DECODE_HEAD_DIMS:
        return f"head dim {q.shape[3]} (the kernel takes {', '.join(map(str, DECODE_HEAD_DIMS))})"
    reason = _refusal("decode_attention_native", q, q, k_cache, v_cache)
    if reason is None and q.is_cpu:
        reason = _cpu_kernel_refusal(q, DECODE_CPU_VECTORIZED)
        if reason is None and (k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1):
            return "caches whose rows are not dense (the CPU kernel reads and appends in place)"
    return reason


def _rows_of_16_bytes(t: Tensor) -> bool:
    """Whether the decode kernel reads t's rows as they are (else the binding would read a copy). By the
    storage offset, not the address, so that torch.compile can trace it (storage starts 16-byte aligned)."""
    vec = 16 // t.element_size()
    return (t.stride(-1) == 1 and t.storage_offset() % vec == 0
            and all(t.stride(d) % vec == 0 for d in range(3) if t.shape[d] > 1))


@register("decode_attention", NAME, supports=_decode_attention_supports)
def decode_attention(q, k_cache, v_cache, lengths, k_new=None, v_new=None):
    if k_new is None:
        return torch.ops.gpt2fast.decode_attention_native(q, k_cache, v_cache, lengths)
    in_place = q.is_cpu or (_rows_of_16_bytes(k_cache) and _rows_of_16_bytes(v_cache))  # CPU: rows dense (supports)
    if _has_kernel("decode_attention_append_native", q.device.type) and in_place:  # the kernel appends, in place
        return torch.ops.gpt2fast.decode_attention_append_native(q, k_cache, v_cache, lengths, k_new, v_new)
    reference.append_kv(k_cache, v_cache, lengths, k_new, v_new)  # an older build, or caches read through a copy
    return torch.ops.gpt2fast.decode_attention_native(q, k_cache, v_cache, lengths)


# ---- sample (no autograd: it draws integers) ----


@register("sample", NAME, supports=lambda logits, *params: _refusal("sample_native", logits))
def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    if temperature == 0:
        # Greedy: the first of equal maxima, as the reference. On the CPU in fp32 a kernel (one pass, vectorized);
        # elsewhere max's indices, which on the CPU beat argmax (1.7 ms against 2.9 ms for 64 rows of 50257).
        if logits.dtype == torch.float32 and _has_kernel("greedy_native", logits.device.type):
            return torch.ops.gpt2fast.greedy_native(logits)
        return logits.max(dim=-1).indices
    # The kernel's draws are keyed by a seed drawn from the generator (or torch's default one), so a seed
    # gives the same ids and the generator's state advances.
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=logits.device)
    return torch.ops.gpt2fast.sample_native(logits, float(temperature), top_k or 0,
                                            1.0 if top_p is None else float(top_p), seed)


# ---- quantized_linear (no autograd: inference) ----


# The CPU kernel's rows: a decode step's, or a short prompt's. It never dequantizes the weights in memory,
# which pays up to 128 rows (at 128 it beat the reference's dequantize-then-matmul 1.1x to 3.5x on gpt2's
# matmuls, a 2-core Xeon); past that x no longer stays in its caches, and at 256 rows of width 3072 or 1024 of
# 768 BLAS was faster (0.4x to 0.6x). Its AMX forms (CPUs with AMX) beat the reference up to 1024 rows: int8
# weights (the int8 tiles) 1.22x, 1.15x and 1.12x for 768 -> 2304, 768 -> 3072 and 3072 -> 768 at 1024 rows,
# 1.15x to 1.63x at 512, 1.28x to 2.53x at 256; bf16 weights (the bf16 tiles) 1.27x, 1.28x and 1.07x at 1024,
# 1.30x to 1.97x at 256 (medians of 5 calls, a 2-core Xeon).
QUANTIZED_MAX_ROWS = 128
QUANTIZED_AMX_MAX_ROWS = 1024  # where the CPU's widest build is its AMX one (GPT2FAST_CPU_ISA aside)


def _quantized_linear_supports(x, weight, scale=None, bias=None) -> Optional[str]:
    if x.dtype != torch.float32:
        return f"x of dtype {x.dtype} (the CPU kernel takes float32 activations)"
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > (QUANTIZED_AMX_MAX_ROWS if QUANTIZED_AMX and x.is_cpu else QUANTIZED_MAX_ROWS):
        return (f"{rows} rows (the CPU kernel is for a decode step's or a short prompt's, up to {QUANTIZED_MAX_ROWS}, "
                f"or {QUANTIZED_AMX_MAX_ROWS} with AMX; BLAS is faster past)")
    return _refusal("quantized_linear_native", x, x, weight, scale, bias)


@register("quantized_linear", NAME, supports=_quantized_linear_supports)
def quantized_linear(x, weight, scale=None, bias=None):
    return torch.ops.gpt2fast.quantized_linear_native(x, weight, scale, bias)


# ---- linear_cross_entropy: ATen's matmuls, a chunk of rows at a time, around the CUDA row kernel ----


@torch.library.custom_op("gpt2fast::linear_cross_entropy_chunked_native", mutates_args=())
def linear_cross_entropy_op(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, mean: bool,
                            grad_x: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dx, dweight), the gradients made in the forward (each an empty tensor unless asked for)."""
    loss, dx, dw = custom_ops.linear_cross_entropy_chunks(x, weight, targets, ignore_index, mean, grad_x, grad_weight,
                                                          torch.ops.gpt2fast.cross_entropy_rows_native)
    return loss, x.new_empty(0) if dx is None else dx, weight.new_empty(0) if dw is None else dw


linear_cross_entropy_op.register_fake(custom_ops.linear_cross_entropy_fake)
_backward, _setup_context = custom_ops.linear_cross_entropy_autograd()
linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


@register("linear_cross_entropy", NAME, supports=lambda x, *args: _refusal("cross_entropy_rows_native", x))
def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean"):
    grads = torch.is_grad_enabled()
    return linear_cross_entropy_op(x, weight, targets, ignore_index, reduction == "mean",
                                   grads and x.requires_grad, grads and weight.requires_grad)[0]
