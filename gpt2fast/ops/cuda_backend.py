"""The `cuda` backend: the C++ and CUDA kernels of csrc/, built into the extension module gpt2fast._C.

The extension defines each op as a PyTorch operator, `gpt2fast::<op>_cuda`, with a CPU kernel, a CUDA
kernel or both (csrc/bindings.cpp checks the tensors). Here each gets its fake function (torch.compile
traces through it), its autograd formula where training needs one, and its registration with
gpt2fast.ops. Importing this module never loads the extension: the probe does, on first use.
"""
from typing import Optional

import torch
from torch import Tensor

from .registry import register, register_backend

NAME = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Which devices the extension has kernels for ("cpu", and "cuda" where it was built with CUDA); set by the
# probe, which always runs before any `supports` (a plain global, which torch.compile can trace).
_devices: tuple[str, ...] = ()


def _probe() -> Optional[str]:
    global _devices
    try:
        from gpt2fast import _C
    except ImportError as e:
        return (f"the extension gpt2fast._C is not built ({type(e).__name__}: {e}); reinstall with "
                f"`pip install --no-build-isolation -e .` where torch is installed")
    _register_fakes()
    _devices = ("cpu", "cuda") if _C.with_cuda else ("cpu",)
    return None


register_backend(NAME, "C++ and CUDA kernels (csrc/, gpt2fast._C)", _probe)


def _device_and_dtype(t: Tensor, devices: tuple[str, ...]) -> Optional[str]:
    """Why an op whose kernels run on `devices` cannot take t, or None."""
    if t.dtype not in DTYPES:
        return f"dtype {t.dtype} (the kernels take float32, float16, bfloat16)"
    if t.device.type not in devices:
        return f"tensors on {t.device}: this op's kernels run on {' and '.join(devices)}"
    if t.device.type not in _devices:
        return f"tensors on {t.device}: gpt2fast._C was built without CUDA (a CPU build of torch, or no nvcc)"
    return None


def _register_fakes() -> None:
    """Fake (meta) functions of the extension's operators, once it is loaded and they exist."""
    torch.library.register_fake("gpt2fast::sample_cuda")(
        lambda logits, temperature, top_k, top_p, seed: logits.new_empty(logits.shape[0], dtype=torch.int64))


# ---- layer_norm ----


# ---- bias_gelu and gelu_mlp ----


# ---- causal_attention ----


# ---- decode_attention ----


# ---- sample (no autograd: it draws integers) ----


@register("sample", NAME, supports=lambda logits, *params: _device_and_dtype(logits, ("cpu",)))
def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy: the first of equal maxima, as the reference; no kernel needed
    # The kernel's draws are keyed by a seed drawn from the generator (or torch's default one), so a seed
    # gives the same ids and the generator's state advances.
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=logits.device)
    return torch.ops.gpt2fast.sample_cuda(logits, float(temperature), top_k or 0,
                                          1.0 if top_p is None else float(top_p), seed)
