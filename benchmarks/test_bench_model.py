"""pytest-benchmark over the end-to-end phases of `python -m gpt2fast bench` (gpt2fast/bench/e2e.py):
prefill, first token, decode and a training step, gpt2fast, transformers and transformers patched by
gpt2fast.patch_hf on the same weights.

    python -m pytest benchmarks/test_bench_model.py --benchmark-only
    GPT2FAST_BENCH_MODELS=gpt2,gpt2-xl GPT2FAST_BENCH_QUICK=1 python -m pytest benchmarks --benchmark-only
"""
import os

import pytest

from gpt2fast.bench import e2e, hf_patch
from gpt2fast.bench.suite import default_setting
from gpt2fast.bench.timing import Prepared, sync

SETTING = default_setting(quick=os.environ.get("GPT2FAST_BENCH_QUICK") == "1")
MODELS = os.environ.get("GPT2FAST_BENCH_MODELS", "gpt2").split(",")
PHASES = [(model, phase) for model in MODELS
          for phase in hf_patch.with_patched_hf(e2e.phases(model, SETTING), model, SETTING)]


@pytest.mark.parametrize("model,phase,impl", [
    pytest.param(model, phase, impl, id=f"{model}-{phase.name}-batch{phase.batch}-{impl}")
    for model, phase in PHASES for impl in phase.runs])
def test_model(benchmark, model, phase, impl):
    make = phase.runs[impl]
    if isinstance(make, str):
        pytest.skip(make)
    fn = make()
    benchmark.group = f"{model} {phase.name} batch {phase.batch}"
    benchmark.extra_info["tokens_per_call"] = phase.tokens
    if isinstance(fn, Prepared):  # its set-up (the prefill before decode steps) runs before each round, untimed
        def setup():
            state = fn.prepare()
            sync(SETTING.device)
            return (state,), {}

        def run(state):
            fn.run(state)
            sync(SETTING.device)

        benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1)
        return

    def call():
        fn()
        sync(SETTING.device)

    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
