"""The static decoder behind generate: its modes agree token for token, batches, reuse, memory, refusals.

Every mode runs the same decode step over the same static buffers: "eager" calls it, "compile" runs it
through torch.compile, "graph" replays it from a CUDA graph (CUDA only). On the CPU the tests compare
eager with compile; with CUDA they run on the GPU and compare all three.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

import gpt2fast
from gpt2fast import GPT2
from gpt2fast.config import GPT2Config
from gpt2fast.generate import Decoder, decoder_for
from conftest import CUDA
from helpers import assert_logits_close, random_ids

DEVICE = "cuda" if CUDA else "cpu"
V = 101
FAST_MODES = ["compile", "graph"] if CUDA else ["compile"]
# On the CPU each compile costs seconds: there the compiled step is checked on the sampling modes that
# exercise the most (greedy's argmax path, and top-k with top-p), and not across batch shapes.
COMPILED_ON_CPU = ("greedy", "top_k_top_p")
SAMPLING = {
    "greedy": dict(do_sample=False),
    "temperature": dict(temperature=0.8, seed=1),
    "top_k": dict(temperature=1.2, top_k=7, seed=2),
    "top_p": dict(top_p=0.8, seed=3),
    "top_k_top_p": dict(temperature=0.9, top_k=20, top_p=0.9, seed=4),
}


def tiny(n_positions=64, seed=0, **kw) -> GPT2:
    torch.manual_seed(seed)
    config = dict(vocab_size=V, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2) | kw
    model = GPT2(GPT2Config(**config)).eval().to(DEVICE)
    with torch.no_grad():  # wider weights than GPT-2's init, so that greedy tokens vary from step to step
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny()


def padded_batch(lengths, seed=0):
    """Left-padded prompts of the given lengths: (ids, attention_mask, [each prompt alone])."""
    rows = [random_ids(V, 1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(rows), width), 5)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.numel():], mask[i, width - row.numel():] = row, 1
    return ids.to(DEVICE), mask.to(DEVICE), [r.to(DEVICE) for r in rows]


@pytest.mark.parametrize("mode", FAST_MODES)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_fast_modes_give_the_eager_tokens(model, mode, sampling):
    """Greedy, and sampled with the same seed: the same tokens, step for step, batch of unequal prompts."""
    if mode == "compile" and not CUDA and sampling not in COMPILED_ON_CPU:
        pytest.skip("compiled on the CPU for greedy and top-k + top-p only (compile time)")
    ids, mask, _ = padded_batch([3, 9, 6], seed=10)
    kwargs = SAMPLING[sampling]
    eager = model.generate(ids, 24, attention_mask=mask, decode="eager", **kwargs)
    assert torch.equal(model.generate(ids, 24, attention_mask=mask, decode=mode, **kwargs), eager)
    # Again, from the decoder kept with the model: a replay of the same graph, re-seeded.
    assert torch.equal(model.generate(ids, 24, attention_mask=mask, decode=mode, **kwargs), eager)


@pytest.mark.parametrize("mode", ["eager", "compile", "graph"] if CUDA else ["eager"])
def test_each_sequence_of_a_batch_gets_its_solo_tokens(model, mode):
    lengths = [1, 17, 4, 30, 9, 2, 23, 12]
    ids, mask, rows = padded_batch(lengths, seed=20)
    out = model.generate(ids, 16, attention_mask=mask, do_sample=False, decode=mode)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], 16, do_sample=False, decode="eager")
        assert torch.equal(out[i, ids.shape[1]:], alone[0, row.numel():]), f"row {i} (prompt of {lengths[i]})"


def test_a_batch_of_256_prompts_of_different_lengths_gives_rows_their_solo_tokens(model):
    """Batch 256, prompts of 1 to 40 tokens padded on the left, greedy: rows spread over the batch, each
    against its prompt decoded alone."""
    lengths = torch.randint(1, 41, (256,), generator=torch.Generator().manual_seed(3)).tolist()
    ids, mask, rows = padded_batch(lengths, seed=60)
    out = model.generate(ids, 8, attention_mask=mask, do_sample=False)
    assert out.shape == (256, ids.shape[1] + 8)
    for i in (0, 1, 77, 128, 200, 255):
        alone = model.generate(rows[i][None], 8, do_sample=False)
        assert torch.equal(out[i, ids.shape[1]:], alone[0, rows[i].numel():]), f"row {i} (prompt of {lengths[i]})"


@pytest.mark.parametrize("lookahead", [0, 1, 3])
def test_eos_ends_the_stream_on_the_same_step_whatever_the_host_lag(model, lookahead, monkeypatch):
    """The host may learn of eos a few steps late; the stream still ends right after the step where the
    last sequence finished, with the same tokens."""
    ids = random_ids(V, 2, 5, seed=30).to(DEVICE)
    free = model.generate(ids, 20, do_sample=False, decode="eager")[:, 5:].tolist()
    eos = min(set(free[0]) & set(free[1]), key=lambda t: abs(free[0].index(t) - free[1].index(t)) - free[0].index(t))
    finish = [row.index(eos) + 1 for row in free]
    assert finish[0] != finish[1] and max(finish) < 20  # the rows finish at different steps, before the end
    expected = list(model.stream(ids, 20, do_sample=False, eos_token_id=eos, decode="eager"))
    real_init = Decoder.__init__

    def init_with_lookahead(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.lookahead = lookahead
        self._host_flags = torch.empty(lookahead + 1, dtype=torch.bool, pin_memory=CUDA)
        self._events = [torch.cuda.Event() for _ in range(lookahead + 1)] if CUDA else []

    monkeypatch.setattr(Decoder, "__init__", init_with_lookahead)
    gpt2fast.generate._DECODERS.clear()
    got = list(model.stream(ids, 20, do_sample=False, eos_token_id=eos, decode="eager"))
    assert len(got) == len(expected) == max(finish)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert (got[-1] == eos).all()


def test_the_decoder_is_kept_for_the_same_settings_and_replaced_otherwise(model):
    ids = random_ids(V, 2, 4, seed=40).to(DEVICE)
    settings = dict(temperature=1.0, top_k=None, top_p=0.9, eos_token_id=None, seeded=True, mode="eager")
    model.generate(ids, 10, top_p=0.9, seed=0, decode="eager")
    first = decoder_for(model, 2, 64, **settings)
    model.generate(ids, 10, top_p=0.9, seed=1, decode="eager")
    assert decoder_for(model, 2, 64, **settings) is first
    assert decoder_for(model, 2, 64, **(settings | dict(top_p=0.5))) is not first
    other = tiny(seed=1)
    assert decoder_for(other, 2, 64, **settings) is not decoder_for(model, 2, 64, **settings)


def test_release_decoder_frees_the_kept_buffers():
    model = tiny(seed=5)
    model.generate(random_ids(V, 1, 4, seed=46).to(DEVICE), 4, do_sample=False)
    cache = __import__("weakref").ref(gpt2fast.generate._DECODERS[model].cache)
    gpt2fast.generate.release_decoder(model)
    gc.collect()
    assert model not in gpt2fast.generate._DECODERS and cache() is None


def test_a_decoder_follows_the_models_weights_when_they_are_replaced():
    """model.to(dtype) gives new weight tensors: a decoder (and graph) made for the old ones is not reused."""
    model = tiny(seed=2)
    ids = random_ids(V, 1, 4, seed=41).to(DEVICE)
    model.generate(ids, 8, do_sample=False)
    model.to(torch.float64 if DEVICE == "cpu" else torch.bfloat16)
    out = model.generate(ids, 8, do_sample=False)
    assert gpt2fast.generate._DECODERS[model].cache.k.dtype == model.dtype
    assert out.shape == (1, 12)


def test_the_decoder_does_not_keep_the_model_alive():
    model = tiny(seed=3)
    model.generate(random_ids(V, 1, 4, seed=42).to(DEVICE), 4, do_sample=False)
    assert len(gpt2fast.generate._DECODERS) >= 1
    ref = __import__("weakref").ref(model)
    del model
    gc.collect()
    assert ref() is None


def _live_tensor_bytes() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    # Dense tensors only: a sparse one (another test's parameter, alive for the session) has no storage to read.
    dense = [t for t in tensors if t.layout == torch.strided and t.device.type != "meta"]
    return len(tensors), sum(t.untyped_storage().nbytes() for t in dense)


def test_no_memory_growth_over_10000_generated_tokens():
    """A context of 10,240 positions, 10,000 tokens sampled with top-p: after the first 1,000, nothing
    more is held, on the host or (with CUDA) on the device."""
    model = tiny(n_positions=10_240, seed=4, n_layer=1)
    ids = random_ids(V, 2, 8, seed=43).to(DEVICE)
    marks = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run fastest on one thread
    try:
        for step, tokens in enumerate(model.stream(ids, 10_000, top_p=0.9, seed=0), start=1):
            if step in (1_000, 10_000):
                if CUDA:
                    torch.cuda.synchronize()
                marks[step] = (_live_tensor_bytes(), torch.cuda.memory_allocated() if CUDA else 0)
    finally:
        torch.set_num_threads(threads)
    assert set(marks) == {1_000, 10_000}
    assert marks[10_000] == marks[1_000]


@torch.no_grad()
def test_prefill_and_decode_steps_match_full_recomputation(model):
    """The pair the decoder runs: a prefill of right-padded prompts, then a token per sequence per step, each
    row's logits against its whole sequence recomputed without a cache. A second prefill into the same cache,
    filled by the first, starts it afresh."""
    lengths = torch.tensor([2, 5, 3], device=DEVICE)
    rows = [random_ids(V, 1, int(n), seed=70 + i)[0].to(DEVICE) for i, n in enumerate(lengths)]
    ids = torch.zeros(3, 5, dtype=torch.long, device=DEVICE)
    for i, row in enumerate(rows):
        ids[i, :row.numel()] = row
    cache = model.new_cache(3, 9)
    for _ in range(2):
        logits, seqs = model.prefill(ids, cache, lengths), list(rows)
        for _ in range(4):
            for i, seq in enumerate(seqs):
                assert_logits_close(logits[i], model(seq[None])[0, -1], rel=1e-5)
            tokens = logits.argmax(-1)
            seqs = [torch.cat([seq, tokens[i:i + 1]]) for i, seq in enumerate(seqs)]
            logits = model.decode_step(tokens, cache)
        assert cache.lengths.tolist() == (lengths + 4).tolist()


def test_bad_decode_modes_are_refused(model):
    ids = random_ids(V, 1, 3, seed=44).to(DEVICE)
    with pytest.raises(ValueError, match="decode must be one of"):
        model.generate(ids, 2, decode="fast")
    if not CUDA:
        with pytest.raises(ValueError, match="decode='graph' needs a CUDA device"):
            model.generate(ids, 2, decode="graph")


def test_a_full_decoder_cache_is_refused_not_overrun(model):
    ids = random_ids(V, 1, 3, seed=45).to(DEVICE)
    decoder = decoder_for(model, 1, 4, temperature=0.0, top_k=None, top_p=None, eos_token_id=None, seeded=False,
                          mode="eager")
    decoder.start(ids, torch.tensor([3], device=DEVICE))
    decoder.step()
    with pytest.raises(ValueError, match="KV cache is full"):
        decoder.step()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_batch_of_256_prompts_of_different_lengths_on_gpu(mode):
    """gpt2's shapes at batch 256 in bf16, top-p sampled: the graph gives the eager tokens."""
    model = GPT2(GPT2Config()).to("cuda", torch.bfloat16).eval()
    lengths = torch.randint(1, 128, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    ids, mask, _ = padded_batch(lengths, seed=50)
    ids = ids % model.config.vocab_size
    eager = model.generate(ids, 32, attention_mask=mask, top_p=0.9, seed=0, decode="eager")
    assert torch.equal(model.generate(ids, 32, attention_mask=mask, top_p=0.9, seed=0, decode=mode), eager)
