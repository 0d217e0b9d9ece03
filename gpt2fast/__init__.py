"""gpt2fast: a fast, clean GPT-2 for PyTorch.

    from gpt2fast import GPT2, Tokenizer
    model = GPT2.from_pretrained("gpt2")           # or an HF folder
    out = model.generate(ids, 32, top_p=0.9, seed=0)

Every hot path runs through `gpt2fast.ops`; pick its backend with `set_backend`, `use_backend` or
the GPT2FAST_BACKEND environment variable.
"""
from . import ops
from .config import PRESETS, GPT2Config
from .gpt2 import GPT2
from .hf import apply_to_transformers_gpt2, patch_hf, revert_transformers_gpt2, unpatch
from .model import KVCache, Transformer
from .ops import get_backend, set_backend, use_backend
from .tokenizer import CharTokenizer, Tokenizer

__version__ = "0.1.0"
__all__ = ["GPT2", "GPT2Config", "KVCache", "Transformer", "PRESETS", "Tokenizer", "CharTokenizer", "ops",
           "set_backend", "get_backend", "use_backend", "patch_hf", "unpatch", "apply_to_transformers_gpt2",
           "revert_transformers_gpt2", "__version__"]
