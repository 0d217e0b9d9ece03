"""Every Triton kernel compiles for the GPU, as its launcher calls it, on a machine without one.

The interpreter (which the other tests run) executes the kernels' Python, not Triton's compiler: code
it accepts may still fail to compile, or compile to more shared memory than an H100 has. Here each
launcher runs on CPU tensors in a fresh process without TRITON_INTERPRET, against a stand-in driver
whose target is an H100 (sm_90), with launches turned into compile-only warm-ups: Triton's compiler
and the ptxas it ships take every kernel down to a cubin, in every dtype and each code path its
launcher picks for an H100 (target=H100: its tiles and split counts). Nothing runs.
"""
import json
import os
import subprocess
import sys

import pytest

from test_triton_backend import REASON

pytestmark = pytest.mark.skipif(REASON is not None and "not installed" in REASON, reason=f"{REASON}")

H100_SHARED_MEMORY = 227 * 1024  # bytes a block may use on sm_90

COMPILE_ALL = r"""
import json, math, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

class H100:  # the driver calls a compile-only launch makes
    def get_current_device(self): return 0
    def get_current_stream(self, device): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(H100())
compiled = []
run = JITFunction.run
def warm_up(self, *args, grid, warmup, **kwargs):
    kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append(dict(kernel=f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}", shared=kernel.metadata.shared,
                         num_warps=kernel.metadata.num_warps, cubin=len(kernel.asm["cubin"])))
JITFunction.run = warm_up

from gpt2fast.kernels import (bias_gelu, causal_attention, cross_entropy, decode_attention, gelu_mlp, layer_norm,
                              quantized_linear, sample)
from gpt2fast.kernels.target import H100
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    r = lambda *shape: torch.randn(*shape).to(dtype)
    x, w, b = r(4, 768), r(768), r(768)
    _, h, mean, rstd = layer_norm.layer_norm_forward(x, w, b, 1e-5, r(4, 768))
    layer_norm.layer_norm_forward(x, w, b, 1e-5)
    layer_norm.layer_norm_backward(x, x, h, w, mean, rstd, target=H100)
    layer_norm.layer_norm_backward(x, None, h, w, mean, rstd, target=H100)
    bias_gelu.bias_gelu_forward(r(4, 3072), r(3072))
    bias_gelu.bias_gelu_backward(r(4, 3072), r(4, 3072), r(3072))
    gelu_mlp.gelu_mlp_forward(r(4, 768), r(768, 3072), r(3072), r(3072, 768), r(768), save_pre=True, target=H100)
    gelu_mlp.gelu_mlp_forward(r(77, 768), r(768, 3072), r(3072), r(3072, 768), r(768), save_pre=False, target=H100)
    for D in causal_attention.HEAD_DIMS:
        q = r(1, 2, 77, D)
        out, lse = causal_attention.causal_attention_forward(q, q, q, target=H100)
        causal_attention.causal_attention_backward(q, q, q, q, out, lse.zero_(), target=H100)
    for D in decode_attention.HEAD_DIMS:
        decode_attention.decode_attention_forward(r(2, 2, 1, D), r(2, 2, 64, D), r(2, 2, 64, D), torch.tensor([5, 64]),
                                                  target=H100)
        decode_attention.decode_attention_forward(r(2, 2, 1, D), r(2, 2, 64, D), r(2, 2, 64, D), torch.tensor([5, 64]),
                                                  r(2, 2, 1, D), r(2, 2, 1, D), target=H100)
    logits = r(2, 50257)
    seed = torch.tensor([0])
    sample.sample_forward(logits, 0.8, 50, 0.9, seed, target=H100)
    sample.sample_forward(logits, 1.0, 0, 1.0, seed, target=H100)
    targets, scale = torch.tensor([3, -100, 50256, 0]), torch.ones(1)
    cross_entropy.cross_entropy_rows(r(4, 50257), targets, scale, -100, True)
    cross_entropy.cross_entropy_rows(r(4, 50257), targets, scale, -100, False)
    int8 = torch.randint(-127, 128, (2304, 768), dtype=torch.int8)
    for rows in (1, 77):
        quantized_linear.quantized_linear_forward(r(rows, 768), int8, torch.rand(2304), r(2304))
        quantized_linear.quantized_linear_forward(r(rows, 768), torch.randn(2304, 768).bfloat16(), None, None)
json.dump(compiled, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def jit_kernels(module_name):
    """The @triton.jit kernels a module launches: its functions named _*_kernel."""
    import importlib

    module = importlib.import_module(f"gpt2fast.kernels.{module_name}")
    return {f"{module_name}.{name}" for name in vars(module) if name.startswith("_") and name.endswith("_kernel")}


@pytest.mark.parametrize("module", ["layer_norm", "bias_gelu", "gelu_mlp", "causal_attention", "decode_attention",
                                    "sample", "cross_entropy", "quantized_linear"])
def test_every_kernel_compiles_for_sm90_within_shared_memory(compiled, module):
    kernels = jit_kernels(module)
    assert kernels, f"no kernels found in gpt2fast.kernels.{module}"
    assert kernels <= {c["kernel"] for c in compiled}, f"never compiled: {kernels - {c['kernel'] for c in compiled}}"
    for c in compiled:
        if c["kernel"] in kernels:
            assert c["cubin"] > 0, c
            assert c["shared"] <= H100_SHARED_MEMORY, c
