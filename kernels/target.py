"""The machine a kernel launch is configured for.

The tiles, split counts and program counts a launcher picks depend on its tensors' dtypes and shapes and
on the machine: how many SMs it has, whether it is triton's CPU interpreter, and whether fp32 products
may round to TF32. A launcher's `target` (None: the machine of the device its tensors are on) lets a
caller ask for another machine's configuration; the tests run the H100's in the interpreter.
"""
from dataclasses import dataclass

import torch
from triton import knobs

# Whether @triton.jit makes the kernels interpreted functions: it reads TRITON_INTERPRET when they are
# decorated, right after their modules import this one.
INTERPRETED = knobs.runtime.interpret


@dataclass(frozen=True)
class Target:
    sm_count: int  # streaming multiprocessors: about how many programs run at once
    interpreter: bool  # triton's CPU interpreter: one program at a time, at a cost per operation
    tf32: bool = False  # fp32 matmul products may round to TF32 (torch.backends.cuda.matmul.allow_tf32)

    @staticmethod
    def of(device: torch.device) -> "Target":
        """The machine that launches on tensors of `device` run on. A CPU (the interpreter's, and the
        compile-only checks') counts as 4 SMs: work split among programs is split among a few."""
        if device.type == "cuda":
            return Target(torch.cuda.get_device_properties(device).multi_processor_count, INTERPRETED,
                          torch.backends.cuda.matmul.allow_tf32)
        return Target(4, INTERPRETED)


H100 = Target(sm_count=132, interpreter=False)  # H100 SXM, under torch's default matmul settings (no TF32)


def upcasts_dot_operands(dtype: torch.dtype) -> bool:
    """Whether tl.dot's operands of `dtype` go to fp32 first, whatever the target: bfloat16 ones where the
    kernels run interpreted, as triton 3.6's interpreter multiplies bfloat16 tiles as their raw uint16 bits
    (exact: a product of two bfloat16 values fits in fp32's mantissa)."""
    return INTERPRETED and dtype == torch.bfloat16
