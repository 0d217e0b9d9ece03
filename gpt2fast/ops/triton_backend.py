"""The `triton` backend: the kernels in `gpt2fast.kernels`, as torch.library custom ops with autograd.

Each kernel is a custom op (`gpt2fast::<op>_triton`, its backward `gpt2fast::<op>_backward_triton`)
with a fake implementation, so torch.compile(fullgraph=True) traces through it and AOTAutograd
through its backward. Importing this module never imports triton: the probe does, on first use, and
that is when triton's @jit picks its mode, the interpreter when TRITON_INTERPRET=1 (CPU tensors only
then; otherwise CUDA tensors only).
"""
import importlib
import re
from typing import Optional

import torch
from torch import Tensor

from . import custom_ops
from .registry import register, register_backend

NAME = "triton"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels(name: str):
    return importlib.import_module(f"gpt2fast.kernels.{name}")


# Whether @triton.jit chose the interpreter for the kernels; set by the probe, which always runs
# before any `supports` (a plain global: torch.compile traces `supports`, and cannot trace imports).
_interpreted = False


def _probe() -> Optional[str]:
    global _interpreted
    try:
        import triton  # noqa: F401
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as e:
        return f"triton is not installed ({type(e).__name__}: {e})"
    _kernels("bias_gelu")  # decorated now, as the layer_norm kernels below: the interpreter if TRITON_INTERPRET=1
    _interpreted = isinstance(_kernels("layer_norm")._forward_kernel, InterpretedFunction)
    if _interpreted:
        return _interpreter_fault(triton.__version__)
    if not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET is not 1 (set it to run the kernels on the CPU, slowly)"
    major, minor = torch.cuda.get_device_capability()
    if torch.version.hip is None and major < 7:
        return f"the CUDA device has compute capability {major}.{minor}; Triton needs 7.0 or newer"
    return None


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _interpreter_fault(triton_version: str) -> Optional[str]:
    """Why the interpreter would fail inside the kernels, or None. Their loops have run-time bounds, which
    triton 3.6's interpreter takes only under numpy < 2.4 (triton-lang/triton#9171, fixed after 3.6)."""
    import numpy

    if _major_minor(triton_version) <= (3, 6) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton_version}'s interpreter fails on loops with run-time bounds under numpy "
                f"{numpy.__version__} (triton-lang/triton#9171): install numpy<2.4 to run the kernels on the CPU")
    return None


register_backend(NAME, "Triton kernels (gpt2fast.kernels)", _probe)


def _device_and_dtype(t: Tensor) -> Optional[str]:
    if t.dtype not in DTYPES:
        return f"dtype {t.dtype} (the kernels take float32, float16, bfloat16)"
    if _interpreted:
        return None if t.device.type == "cpu" else f"tensors on {t.device}: under TRITON_INTERPRET=1 only CPU ones"
    if t.device.type != "cuda":
        return f"tensors on {t.device}: Triton runs CUDA tensors (CPU ones under TRITON_INTERPRET=1)"
    return None


# ---- layer_norm ----


@torch.library.custom_op("gpt2fast::layer_norm_triton", mutates_args=())
def layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                  residual: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd); h = x + residual, or an empty tensor without one (an output may not alias x)."""
    y, h, mean, rstd = _kernels("layer_norm").layer_norm_forward(x, weight, bias, eps, residual)
    return y, x.new_empty(0) if h is None else h, mean, rstd


layer_norm_op.register_fake(custom_ops.layer_norm_fake)


@torch.library.custom_op("gpt2fast::layer_norm_backward_triton", mutates_args=())
def layer_norm_backward_op(grad_y: Tensor, grad_h: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
                           rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dweight, dbias); h is the normalised input (x + residual, or x)."""
    return _kernels("layer_norm").layer_norm_backward(grad_y, grad_h, h, weight, mean, rstd)


layer_norm_backward_op.register_fake(custom_ops.layer_norm_backward_fake)
_backward, _setup_context = custom_ops.layer_norm_autograd(layer_norm_backward_op)
layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _layer_norm_supports(x, weight, bias, eps=1e-5, residual=None) -> Optional[str]:
    from gpt2fast.kernels.layer_norm import MAX_WIDTH

    if not 0 < x.shape[-1] <= MAX_WIDTH:
        return f"width {x.shape[-1]} (the kernel takes 1 to {MAX_WIDTH})"
    return _device_and_dtype(x)


@register("layer_norm", NAME, supports=_layer_norm_supports)
def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    y, h, _, _ = layer_norm_op(x, weight, bias, eps, residual)
    return y if residual is None else (y, h)


# ---- bias_gelu ----


@torch.library.custom_op("gpt2fast::bias_gelu_triton", mutates_args=())
def bias_gelu_op(x: Tensor, bias: Tensor) -> Tensor:
    return _kernels("bias_gelu").bias_gelu_forward(x, bias)


bias_gelu_op.register_fake(custom_ops.bias_gelu_fake)


@torch.library.custom_op("gpt2fast::bias_gelu_backward_triton", mutates_args=())
def bias_gelu_backward_op(grad_y: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dbias)."""
    return _kernels("bias_gelu").bias_gelu_backward(grad_y, x, bias)


bias_gelu_backward_op.register_fake(custom_ops.bias_gelu_backward_fake)
_backward, _setup_context = custom_ops.bias_gelu_autograd(bias_gelu_backward_op)
bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def _bias_gelu_supports(x, bias) -> Optional[str]:
    return "width 0" if x.shape[-1] == 0 else _device_and_dtype(x)


@register("bias_gelu", NAME, supports=_bias_gelu_supports)
def bias_gelu(x, bias):
    return bias_gelu_op(x, bias)


# ---- causal_attention ----


@torch.library.custom_op("gpt2fast::causal_attention_triton", mutates_args=())
def causal_attention_op(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse): lse [B, H, T] fp32 is each query's log-sum-exp of its scaled scores, for the backward."""
    return _kernels("causal_attention").causal_attention_forward(q, k, v)


causal_attention_op.register_fake(custom_ops.causal_attention_fake)


@torch.library.custom_op("gpt2fast::causal_attention_backward_triton", mutates_args=())
def causal_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                 lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv)."""
    return _kernels("causal_attention").causal_attention_backward(grad_out, q, k, v, out, lse)


@causal_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _causal_attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _causal_attention_backward(ctx, grad_out, _grad_lse):
    return causal_attention_backward_op(grad_out, *ctx.saved_tensors)


causal_attention_op.register_autograd(_causal_attention_backward, setup_context=_causal_attention_setup_context)


def _causal_attention_supports(q, k, v) -> Optional[str]:
    from gpt2fast.kernels.causal_attention import HEAD_DIMS

    if q.shape[3] not in HEAD_DIMS:
        return f"head dim {q.shape[3]} (the kernel takes {', '.join(map(str, HEAD_DIMS))})"
    return _device_and_dtype(q)


@register("causal_attention", NAME, supports=_causal_attention_supports)
def causal_attention(q, k, v):
    return causal_attention_op(q, k, v)[0]


# ---- gelu_mlp ----


@torch.library.custom_op("gpt2fast::gelu_mlp_triton", mutates_args=())
def gelu_mlp_op(x: Tensor, w_fc: Tensor, b_fc: Tensor, w_proj: Tensor, b_proj: Tensor,
                save_pre: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, act, pre): act = gelu_tanh(pre + b_fc), pre = x @ w_fc, or an empty tensor unless save_pre (the
    backward then recomputes it)."""
    y, act, pre = _kernels("gelu_mlp").gelu_mlp_forward(x, w_fc, b_fc, w_proj, b_proj, save_pre)
    return y, act, x.new_empty(0) if pre is None else pre


gelu_mlp_op.register_fake(custom_ops.gelu_mlp_fake)
_backward, _setup_context = custom_ops.gelu_mlp_autograd(bias_gelu_backward_op)
gelu_mlp_op.register_autograd(_backward, setup_context=_setup_context)


@register("gelu_mlp", NAME, supports=lambda x, *weights: _device_and_dtype(x))
def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj):
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_fc, b_fc, w_proj, b_proj))
    return gelu_mlp_op(x, w_fc, b_fc, w_proj, b_proj, save_pre)[0]


# ---- decode_attention (inference only: no autograd) ----


@torch.library.custom_op("gpt2fast::decode_attention_triton", mutates_args=())
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor) -> Tensor:
    return _kernels("decode_attention").decode_attention_forward(q, k_cache, v_cache, lengths)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, lengths):
    return q.new_empty(q.shape)


@torch.library.custom_op("gpt2fast::decode_attention_append_triton", mutates_args=("k_cache", "v_cache"))
def decode_attention_append_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                               k_new: Tensor, v_new: Tensor) -> Tensor:
    return _kernels("decode_attention").decode_attention_forward(q, k_cache, v_cache, lengths, k_new, v_new)


@decode_attention_append_op.register_fake
def _(q, k_cache, v_cache, lengths, k_new, v_new):
    return q.new_empty(q.shape)


def _decode_attention_supports(q, k_cache, v_cache, lengths, k_new=None, v_new=None) -> Optional[str]:
    from gpt2fast.kernels.decode_attention import HEAD_DIMS, MAX_QUERIES

    if q.shape[2] > MAX_QUERIES:
        return f"{q.shape[2]} queries (the kernel takes 1 to {MAX_QUERIES})"
    if q.shape[3] not in HEAD_DIMS:
        return f"head dim {q.shape[3]} (the kernel takes {', '.join(map(str, HEAD_DIMS))})"
    tensors = (q, k_cache, v_cache) + (() if k_new is None else (k_new, v_new))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs that require grad (the kernel has no backward: decoding is inference)"
    if k_new is not None and (k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1):
        return "caches without a unit stride along the head dim (the kernel writes the new keys into them)"
    return _device_and_dtype(q)


@register("decode_attention", NAME, supports=_decode_attention_supports)
def decode_attention(q, k_cache, v_cache, lengths, k_new=None, v_new=None):
    if k_new is None:
        return decode_attention_op(q, k_cache, v_cache, lengths)
    return decode_attention_append_op(q, k_cache, v_cache, lengths, k_new, v_new)


# ---- sample (no autograd: it draws integers) ----


@torch.library.custom_op("gpt2fast::sample_triton", mutates_args=())
def sample_op(logits: Tensor, temperature: float, top_k: int, top_p: float, seed: Tensor) -> Tensor:
    return _kernels("sample").sample_forward(logits, temperature, top_k, top_p, seed)


@sample_op.register_fake
def _(logits, temperature, top_k, top_p, seed):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


@register("sample", NAME, supports=lambda logits, *params: _device_and_dtype(logits))
def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy: the first of equal maxima, as the reference; no kernel needed
    # The kernel's uniforms come from Philox seeded by a draw from the generator (or torch's default one),
    # so a seed gives the same ids and the generator's state advances, without a host sync.
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=logits.device)
    return sample_op(logits, float(temperature), top_k or 0, 1.0 if top_p is None else float(top_p), seed)


# ---- linear_cross_entropy: torch matmuls around a kernel that turns each chunk of logits into its gradient ----


@torch.library.custom_op("gpt2fast::linear_cross_entropy_triton", mutates_args=())
def linear_cross_entropy_op(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, mean: bool,
                            grad_x: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dx, dweight): the loss's gradients come out of the forward (each an empty tensor unless asked for),
    so the backward only scales them."""
    loss, dx, dw = custom_ops.linear_cross_entropy_chunks(x, weight, targets, ignore_index, mean, grad_x, grad_weight,
                                                          _kernels("cross_entropy").cross_entropy_rows)
    return loss, x.new_empty(0) if dx is None else dx, weight.new_empty(0) if dw is None else dw


linear_cross_entropy_op.register_fake(custom_ops.linear_cross_entropy_fake)
_backward, _setup_context = custom_ops.linear_cross_entropy_autograd()
linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


@register("linear_cross_entropy", NAME, supports=lambda x, *args: _device_and_dtype(x))
def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean"):
    grads = torch.is_grad_enabled()
    return linear_cross_entropy_op(x, weight, targets, ignore_index, reduction == "mean",
                                   grads and x.requires_grad, grads and weight.requires_grad)[0]


# ---- quantized_linear (inference only: no autograd) ----


@torch.library.custom_op("gpt2fast::quantized_linear_triton", mutates_args=())
def quantized_linear_op(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    return _kernels("quantized_linear").quantized_linear_forward(x, weight, scale, bias)


@quantized_linear_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _quantized_linear_supports(x, weight, scale=None, bias=None) -> Optional[str]:
    if x.shape[-1] == 0:
        return "width 0"
    tensors = (x, weight) + tuple(t for t in (scale, bias) if t is not None)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs that require grad (the kernel has no backward: quantized weights are for inference)"
    return _device_and_dtype(x)


@register("quantized_linear", NAME, supports=_quantized_linear_supports)
def quantized_linear(x, weight, scale=None, bias=None):
    return quantized_linear_op(x, weight, scale, bias)
