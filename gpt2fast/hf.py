"""Run a live `transformers` GPT-2 through gpt2fast's ops, in place.

    model = transformers.GPT2LMHeadModel.from_pretrained("gpt2")
    gpt2fast.patch_hf(model)      # its LayerNorms, attention and MLPs now run through gpt2fast.ops
    gpt2fast.unpatch(model)       # back to transformers' own forwards

`patch_hf` replaces the `forward` of each module instance; the modules keep their parameters, so the
weights are shared, never copied (HF's Conv1D stores [in, out], the layout `ops.gelu_mlp` takes). A
module whose `forward` other code already replaced on the instance (accelerate's device and offload
hooks, another patch) is left as it is, and so is an MLP whose Conv1D layers are wrapped or hooked (LoRA).
`apply_to_transformers_gpt2()` does the same for every GPT-2 model transformers builds afterwards (call
it before `from_pretrained`); `revert_transformers_gpt2()` undoes it, for those models too.

A patched module runs transformers' own forward whenever the fast path could not give its result
exactly: an attention mask with padding (or any mask other than the causal one), a cache other than a
plain `DynamicCache` (static, sliding, quantised caches), attention weights asked for
(`output_attentions`), attention dropout while training, cross-attention, an attention implementation
other than "eager" or "sdpa", arguments its attention function would read (`is_causal`, ...), autocast,
or tensors whose dtypes differ. Config flags are decided once, when patching: attention stays
transformers' with `scale_attn_weights=False`, `scale_attn_by_inverse_layer_idx`,
`reorder_and_upcast_attn` or `add_cross_attention`, and the MLP with an activation other than GELU's
tanh approximation; `patch_hf` logs which, and why.
"""
from __future__ import annotations

import functools
import inspect
import logging
import weakref

import torch

from . import ops
from .checkpoint import TANH_GELUS

log = logging.getLogger("gpt2fast")

# Tested with transformers 5.17, 5.24 and 5.25; within the range, GPT2Attention's signature is checked as well.
MIN_TRANSFORMERS, BELOW_TRANSFORMERS = "5.17", "6"
_ATTENTION_ARGS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                   "output_attentions")
_CACHE_ARGS = ("cache", "past_key_values")  # its name in 5.24, and in older releases (5.17)


def check_transformers_version() -> None:
    """RuntimeError unless the installed transformers is one whose GPT-2 the patch knows."""
    import transformers
    from packaging.version import Version

    installed = Version(transformers.__version__)
    if not Version(MIN_TRANSFORMERS) <= installed < Version(BELOW_TRANSFORMERS):
        raise RuntimeError(f"gpt2fast's transformers patch supports transformers >= {MIN_TRANSFORMERS}, "
                           f"< {BELOW_TRANSFORMERS}; transformers {transformers.__version__} is installed")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    names = list(inspect.signature(GPT2Attention.forward).parameters)[1:7]
    if names[1] not in _CACHE_ARGS or tuple(names[:1] + names[2:]) != _ATTENTION_ARGS:
        raise RuntimeError(f"transformers {transformers.__version__}: GPT2Attention.forward takes {names}, "
                           f"not the arguments gpt2fast's patch was written for")


def patch_hf(model):
    """Run `model` (a transformers GPT2LMHeadModel, GPT2Model or another GPT-2 head) through gpt2fast.ops,
    in place; returns it. Patching twice changes nothing."""
    check_transformers_version()
    _patch_transformer(_gpt2_model(model))
    return model


def unpatch(model):
    """Restore the forwards `patch_hf` (or `apply_to_transformers_gpt2`) replaced; returns the model."""
    for module in _gpt2_model(model).modules():
        if _patched(module):
            del module.forward
    return model


_built_while_applied: weakref.WeakSet = weakref.WeakSet()
_original_init = None


def apply_to_transformers_gpt2() -> None:
    """Patch every transformers GPT-2 model built from now on (GPT2Model and every head built on it).

    torch's LayerNorm class is shared by every model, so it is GPT2Model's constructor that is patched:
    each GPT-2 it builds is patched as `patch_hf` does, and `revert_transformers_gpt2` unpatches them.
    """
    global _original_init
    check_transformers_version()
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

    if _original_init is not None:
        return
    _original_init = GPT2Model.__init__

    @functools.wraps(_original_init)
    def __init__(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        _patch_transformer(self)
        _built_while_applied.add(self)

    GPT2Model.__init__ = __init__


def revert_transformers_gpt2() -> None:
    """Undo `apply_to_transformers_gpt2`: GPT2Model's constructor, and every model it patched."""
    global _original_init
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

    if _original_init is None:
        return
    GPT2Model.__init__, _original_init = _original_init, None
    for model in list(_built_while_applied):
        unpatch(model)
    _built_while_applied.clear()


def _gpt2_model(model):
    """The GPT2Model inside `model`, or TypeError naming what `model` is."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model, GPT2PreTrainedModel

    if isinstance(model, GPT2Model):
        return model
    if isinstance(model, GPT2PreTrainedModel) and isinstance(getattr(model, "transformer", None), GPT2Model):
        return model.transformer
    raise TypeError(f"expected a transformers GPT-2 model (GPT2LMHeadModel, GPT2Model or another GPT-2 head), "
                    f"got {type(model).__module__}.{type(model).__qualname__}")


def _patch_transformer(transformer) -> None:
    config = transformer.config
    attention_flags = [f"{flag}={getattr(config, flag)!r}" for flag, fast in (
        ("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False), ("add_cross_attention", False)) if getattr(config, flag) != fast]
    mlp_ok = config.activation_function in TANH_GELUS
    if attention_flags:
        log.warning(f"gpt2fast: GPT-2 attention left to transformers: {', '.join(attention_flags)} "
                    f"is not what gpt2fast's attention computes")
    if not mlp_ok:
        log.warning(f"gpt2fast: GPT-2 MLP left to transformers: activation_function="
                    f"{config.activation_function!r} is not one of {TANH_GELUS} (GELU, tanh approximation)")
    patches = [(transformer.ln_f, _layer_norm_forward)]
    for block in transformer.h:
        patches += [(block.ln_1, _layer_norm_forward), (block.ln_2, _layer_norm_forward)]
        patches += [(block.attn, _attention_forward)] if not attention_flags else []
        patches += [(block.mlp, _mlp_forward)] if mlp_ok else []
    taken = [m for m, _ in patches if "forward" in vars(m) and not _patched(m)]
    if taken:
        log.warning(f"gpt2fast: {len(taken)} GPT-2 modules left as they are: other code (accelerate's hooks, "
                    f"another patch) replaced their forward, first {type(taken[0]).__name__}")
    for module, fast in patches:
        if "forward" not in vars(module):
            module.forward = functools.partial(fast, module, module.forward)


def _patched(module) -> bool:
    forward = vars(module).get("forward")
    return isinstance(forward, functools.partial) and forward.func in (
        _layer_norm_forward, _attention_forward, _mlp_forward)


def _plain(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether the ops can take these tensors as they come: one dtype and device, no autocast, which would run
    transformers' matmuls in another precision than the ops, and plain tensors: a quantized weight (int8, or a
    tensor subclass such as torchao's, whatever dtype it reports) is transformers' quantizer's to run."""
    return (not torch.is_autocast_enabled(x.device.type)
            and all(p is not None and type(p) in (torch.Tensor, torch.nn.Parameter) and p.dtype == x.dtype
                    and p.device == x.device for p in params))


def _layer_norm_forward(module, original, x):
    if not _plain(x, module.weight, module.bias) or len(module.normalized_shape) != 1:
        return original(x)
    return ops.layer_norm(x, module.weight, module.bias, module.eps)


def _conv1d(module) -> bool:
    """A transformers Conv1D with nothing around it (an adapter such as LoRA replaces or hooks it)."""
    from transformers.pytorch_utils import Conv1D

    return (type(module) is Conv1D and not (module._forward_hooks or module._forward_pre_hooks)
            and "forward" not in vars(module))


def _mlp_forward(module, original, hidden_states):
    fc, proj = module.c_fc, module.c_proj
    if not (_conv1d(fc) and _conv1d(proj) and _plain(hidden_states, fc.weight, fc.bias, proj.weight, proj.bias)):
        return original(hidden_states)
    return module.dropout(ops.gelu_mlp(hidden_states, fc.weight, fc.bias, proj.weight, proj.bias))


def _linear(conv, x: torch.Tensor) -> torch.Tensor:
    """conv(x), by ops.linear where conv is a plain Conv1D: the same matmul, split across the CPU's
    threads when only a few rows come (decoding)."""
    return ops.linear(x, conv.weight, conv.bias) if _conv1d(conv) and _plain(x, conv.weight, conv.bias) else conv(x)


def _attention_forward(module, original, hidden_states, cache=None, attention_mask=None,
                       encoder_hidden_states=None, encoder_attention_mask=None, output_attentions=False, **kwargs):
    cache = kwargs.pop("past_key_values", cache)  # older releases (5.17) pass the cache by this name
    if not _fast_attention(module, hidden_states, cache, attention_mask, encoder_hidden_states,
                           output_attentions, kwargs):
        return original(hidden_states, cache, attention_mask, encoder_hidden_states, encoder_attention_mask,
                        output_attentions, **kwargs)
    B, T, C = hidden_states.shape
    q, k, v = (t.view(B, T, module.num_heads, module.head_dim).transpose(1, 2)
               for t in _linear(module.c_attn, hidden_states).split(module.split_size, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, module.layer_idx)
    S = k.shape[2]
    if S == T:
        y = ops.causal_attention(q, k, v)
    else:  # the new tokens against every cached one: each row holds all S
        y = ops.decode_attention(q, k, v, torch.full((B,), S, dtype=torch.int32, device=q.device))
    y = _linear(module.c_proj, y.transpose(1, 2).reshape(B, T, C))
    return module.resid_dropout(y), None


def _fast_attention(module, x, cache, mask, encoder_hidden_states, output_attentions, kwargs) -> bool:
    """Whether gpt2fast's attention gives exactly what transformers' forward would for this call."""
    config = module.config
    implementation = config._attn_implementation
    if (encoder_hidden_states is not None or output_attentions or _attentions_recorded()
            or implementation not in ("eager", "sdpa") or not getattr(config, "is_causal", True)
            or (module.training and module.attn_dropout.p > 0) or x.dim() != 3
            or not _plain(x)
            or not _attention_function_args(implementation).isdisjoint(kwargs)):
        return False
    past = 0
    if cache is not None:
        if not _plain_dynamic_cache(cache, module.layer_idx):
            return False
        past = cache.get_seq_length(module.layer_idx)
    T = x.shape[1]
    if mask is None:
        # sdpa reads no mask as causal when queries and keys are as many, and as "every key" for one
        # query; eager as "every key" always.
        return T == 1 or (past == 0 and implementation == "sdpa")
    return _is_causal_mask(mask, T, past + T)


def _attentions_recorded() -> bool:
    """Whether the model forward running now records the attention weights (output_attentions=True)."""
    from transformers.utils.output_capturing import _active_collector

    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


@functools.cache
def _attention_function_args(implementation: str) -> frozenset[str]:
    """The keyword arguments transformers' attention function would read beyond those GPT2Attention passes
    (sdpa's `is_causal`, ...): a call carrying any of them is left to transformers."""
    from transformers.models.gpt2.modeling_gpt2 import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    function = eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    params = inspect.signature(function).parameters
    return frozenset(name for name, p in params.items() if p.kind is not p.VAR_KEYWORD) - {
        "module", "query", "key", "value", "attention_mask", "dropout", "scaling"}


def _plain_dynamic_cache(cache, layer: int) -> bool:
    """A DynamicCache whose layer appends keys and values and returns them all (not a static, sliding or
    quantised one)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache:
        return False
    if layer < len(cache.layers):
        return type(cache.layers[layer]) is DynamicLayer
    return cache.layer_class_to_replicate is DynamicLayer


# The mask last checked, and the answer: every layer of a forward gets the same mask, so it is read once.
_last_mask: tuple = (None, None, None)


def _is_causal_mask(mask, q_len: int, kv_len: int) -> bool:
    """Whether a 4-D mask (bool, or float with 0 and the dtype's min, as transformers makes them) lets each
    of the q_len newest tokens see exactly the keys up to its own position: no padding, nothing else."""
    global _last_mask
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (q_len, kv_len):
        return False
    ref, version, answer = _last_mask
    if ref is not None and ref() is mask and version == mask._version:
        return answer
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    if mask.dtype == torch.bool:
        answer = bool((mask == causal).all())
    else:
        answer = bool(torch.where(causal, mask == 0, mask <= torch.finfo(mask.dtype).min).all())
    _last_mask = (weakref.ref(mask), mask._version, answer)
    return answer
