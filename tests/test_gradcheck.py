"""torch.autograd.gradcheck in fp64 through every differentiable op, on the reference backend.

The Triton and CUDA kernels take fp32, fp16 and bf16 only (fp64 falls back to the reference), so their
backward passes are checked against these gradients at fp32 and bf16 tolerances in the per-op tests.
"""
import pytest
import torch

import gpt2fast
from gpt2fast import ops


def r(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


CASES = {
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), lambda: (r(3, 7), r(7, seed=1), r(7, seed=2))),
    "layer_norm with residual": (lambda x, w, b, res: ops.layer_norm(x, w, b, 1e-5, res),
                                 lambda: (r(2, 3, 7), r(7, seed=1), r(7, seed=2), r(2, 3, 7, seed=3))),
    "causal_attention": (ops.causal_attention, lambda: (r(1, 2, 5, 4), r(1, 2, 5, 4, seed=1), r(1, 2, 5, 4, seed=2))),
    "bias_gelu": (ops.bias_gelu, lambda: (r(4, 6, scale=2.0), r(6, seed=1))),
    "gelu_mlp": (ops.gelu_mlp, lambda: (r(3, 4), r(4, 8, seed=1), r(8, seed=2), r(8, 4, seed=3), r(4, seed=4))),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_op_passes_gradcheck_in_float64(case):
    fn, make = CASES[case]
    with gpt2fast.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda *args: fn(*args), make(), eps=1e-6, atol=1e-7)


class _Loss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, targets):
        return self.model.loss(ids, targets)


def test_the_model_passes_gradcheck_in_float64():
    """Every op together, through a tiny GPT-2 and its fused loss: the gradient of the position table."""
    from torch.func import functional_call

    from gpt2fast import GPT2
    from gpt2fast.config import GPT2Config

    torch.manual_seed(0)
    loss = _Loss(GPT2(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)).double().eval())
    ids, targets = torch.randint(0, 11, (1, 5)), torch.randint(0, 11, (1, 5))
    table = loss.model.wpe.weight.detach().clone().requires_grad_()
    with gpt2fast.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda t: functional_call(loss, {"model.wpe.weight": t}, (ids, targets)),
                                        (table,), eps=1e-6, atol=1e-7)
