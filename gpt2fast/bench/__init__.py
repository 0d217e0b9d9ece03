"""`python -m gpt2fast bench`: every hot path and the whole model against PyTorch, transformers and the
device's measured limits, one small module per concern:

    timing.py     how a call is timed: warm-up, median and spread, L2 flushed between calls on CUDA
    ceilings.py   copy and read bandwidth and matmul peak, measured in the same run
    suite.py      Setting, Case, Impl and the suite registry; every registered backend runs on every case
    op_suites.py  the per-op suites: shapes, inputs, bytes or flops per call, peers
    e2e.py        the whole model: prefill, first token, decode, training step, against transformers (and on
                  the CPU against CTranslate2, and gpt2fast with int8 and bf16 weights)
    ctranslate2_peer.py  CTranslate2's Generator on the same weights, converted (a bench extra)
    hf_patch.py   transformers patched by gpt2fast.patch_hf, beside transformers in every end-to-end phase
    report.py     markdown tables, plots, the README table
    runner.py     the command: runs it all and writes the record
"""
from . import op_suites  # noqa: F401  (registers the suites)
