"""The `triton` backend: the kernels in `gpt2fast.kernels`, as torch.library custom ops with autograd.

Each kernel is a custom op (`gpt2fast::<op>_triton`, its backward `gpt2fast::<op>_backward_triton`)
with a fake implementation, so torch.compile(fullgraph=True) traces through it and AOTAutograd
through its backward. Importing this module never imports triton: the probe does, on first use, and
that is when triton's @jit picks its mode, the interpreter when TRITON_INTERPRET=1 (CPU tensors only
then; otherwise CUDA tensors only).
"""
import importlib
from typing import Optional

import torch
from torch import Tensor

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
        return None
    if not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET is not 1 (set it to run the kernels on the CPU, slowly)"
    major, minor = torch.cuda.get_device_capability()
    if torch.version.hip is None and major < 7:
        return f"the CUDA device has compute capability {major}.{minor}; Triton needs 7.0 or newer"
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


@layer_norm_op.register_fake
def _(x, weight, bias, eps, residual):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(0 if residual is None else x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("gpt2fast::layer_norm_backward_triton", mutates_args=())
def layer_norm_backward_op(grad_y: Tensor, grad_h: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
                           rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dweight, dbias); h is the normalised input (x + residual, or x)."""
    return _kernels("layer_norm").layer_norm_backward(grad_y, grad_h, h, weight, mean, rstd)


@layer_norm_backward_op.register_fake
def _(grad_y, grad_h, h, weight, mean, rstd):
    return h.new_empty(h.shape), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, _, _, residual = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)


def _layer_norm_backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    grad_h = grad_h if ctx.has_residual else None  # else the grad of the empty placeholder output
    dh, dweight, dbias = layer_norm_backward_op(grad_y, grad_h, h, weight, mean, rstd)
    return dh, dweight, dbias, None, dh if ctx.has_residual else None


layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


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


@bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("gpt2fast::bias_gelu_backward_triton", mutates_args=())
def bias_gelu_backward_op(grad_y: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dbias)."""
    return _kernels("bias_gelu").bias_gelu_backward(grad_y, x, bias)


@bias_gelu_backward_op.register_fake
def _(grad_y, x, bias):
    return x.new_empty(x.shape), torch.empty_like(bias)


def _bias_gelu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_gelu_backward(ctx, grad_y):
    return bias_gelu_backward_op(grad_y, *ctx.saved_tensors)


bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup_context)


def _bias_gelu_supports(x, bias) -> Optional[str]:
    return "width 0" if x.shape[-1] == 0 else _device_and_dtype(x)


@register("bias_gelu", NAME, supports=_bias_gelu_supports)
def bias_gelu(x, bias):
    return bias_gelu_op(x, bias)
