"""Generation: the KV cache against full recomputation, padding, seeds, streaming, greedy vs HF, eos, checks."""
from __future__ import annotations

import pytest
import torch

from gpt2fast import ops
from helpers import assert_logits_close, build_pair, hf_greedy, random_ids

V = 101
N_POSITIONS = 64


@pytest.fixture(scope="module")
def pair():
    return build_pair(seed=7, vocab_size=V, n_positions=N_POSITIONS, n_embd=60, n_head=5, n_layer=2)


@pytest.fixture(scope="module")
def model(pair):
    return pair[1]


def greedy_alone(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """The greedy continuation of one unpadded prompt [T] -> [new]."""
    return model.generate(prompt[None], new, do_sample=False)[0, prompt.numel():]


# ---- the KV cache ----

@torch.no_grad()
def test_cached_decoding_matches_full_recomputation(model):
    seq = random_ids(V, 2, 5, seed=1)
    cache = model.new_cache(2, capacity=20)
    assert_logits_close(model(seq, cache)[:, -1], model(seq)[:, -1], rel=1e-5)
    for step in range(12):
        next_ids = random_ids(V, 2, 1, seed=100 + step)
        seq = torch.cat([seq, next_ids], dim=1)
        cached = model(next_ids, cache)
        assert cached.shape == (2, 1, V)
        assert_logits_close(cached[:, -1], model(seq)[:, -1], rel=1e-5)
    assert cache.lengths.tolist() == [seq.shape[1]] * 2


@torch.no_grad()
def test_appending_several_tokens_to_a_cache_matches_full_recomputation(model):
    seq = random_ids(V, 2, 10, seed=2)
    cache = model.new_cache(2, capacity=10)
    model(seq[:, :4], cache)
    assert_logits_close(model(seq[:, 4:7], cache), model(seq)[:, 4:7], rel=1e-5)
    assert_logits_close(model(seq[:, 7:], cache), model(seq)[:, 7:], rel=1e-5)


@torch.no_grad()
def test_ragged_cache_rows_match_each_sequence_alone(model):
    """Right-padded prompts with input_lengths: each row continues at its own length."""
    lengths = torch.tensor([3, 7, 5])
    rows = [random_ids(V, 1, int(n), seed=10 + i)[0] for i, n in enumerate(lengths)]
    padded = torch.zeros(3, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : row.numel()] = row
    cache = model.new_cache(3, capacity=9)
    last = model(padded, cache, input_lengths=lengths, last_only=True)[:, -1]
    for i, row in enumerate(rows):
        assert_logits_close(last[i], model(row[None])[0, -1], rel=1e-5)
    next_ids = random_ids(V, 3, 1, seed=20)
    step = model(next_ids, cache)[:, -1]
    assert cache.lengths.tolist() == (lengths + 1).tolist()
    for i, row in enumerate(rows):
        assert_logits_close(step[i], model(torch.cat([row, next_ids[i]])[None])[0, -1], rel=1e-5)


# ---- batches of prompts of different lengths ----

@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_prompt_its_own_greedy_tokens(model, side):
    new, pad_id = 12, 7  # padding with a real token id: it must be ignored, not merely harmless
    rows = [random_ids(V, 1, n, seed=30 + n)[0] for n in (3, 7, 5)]
    width = max(r.numel() for r in rows)
    ids = torch.full((3, width), pad_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - row.numel(), width) if side == "left" else slice(0, row.numel())
        ids[i, cols], mask[i, cols] = row, 1
    out = model.generate(ids, new, do_sample=False, attention_mask=mask)
    assert out.shape == (3, width + new)
    assert torch.equal(out[:, :width], ids)
    for i, row in enumerate(rows):
        assert torch.equal(out[i, width:], greedy_alone(model, row, new)), f"row {i}"


def test_left_padded_batch_matches_hf_batched_greedy(pair):
    hf, model = pair
    ids = random_ids(V, 2, 6, seed=40)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    ours = model.generate(ids, 16, do_sample=False, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(ours, theirs)


# ---- sampling, seeds and streaming ----

@pytest.mark.parametrize("params", [{}, dict(temperature=0.7, top_k=20), dict(top_p=0.9)])
def test_same_seed_same_tokens_different_seeds_differ(model, params):
    ids = random_ids(V, 2, 4, seed=50)
    first = model.generate(ids, 16, seed=0, **params)
    assert torch.equal(model.generate(ids, 16, seed=0, **params), first)
    assert not torch.equal(model.generate(ids, 16, seed=1, **params), first)
    assert ((first >= 0) & (first < V)).all()


@torch.no_grad()
def test_stream_yields_the_tokens_drawn_from_the_whole_sequence_recomputed(model):
    """Each step's tokens [B] are those ops.sample draws, from a generator seeded alike, from the logits of the
    whole sequence so far recomputed without a cache."""
    ids = random_ids(V, 3, 4, seed=60)
    steps = list(model.stream(ids, 10, seed=5, top_p=0.95))
    assert len(steps) == 10
    generator, seq = torch.Generator().manual_seed(5), ids
    for token in steps:
        assert token.shape == (3,) and token.dtype == torch.long
        expected = ops.sample(model(seq)[:, -1], 1.0, None, 0.95, generator)
        assert torch.equal(token, expected)
        seq = torch.cat([seq, expected[:, None]], dim=1)
    assert len(set(seq[:, 4:].flatten().tolist())) > 1  # draws, not one token repeated


def test_greedy_by_do_sample_false_and_by_temperature_0_equal_hf(pair):
    hf, model = pair
    ids = random_ids(V, 2, 8, seed=70)
    expected = hf_greedy(hf, ids, 24)
    assert torch.equal(model.generate(ids, 24, do_sample=False), expected)
    assert torch.equal(model.generate(ids, 24, temperature=0.0, seed=0), expected)
    # do_sample=False wins over sampling parameters, which then do not matter.
    assert torch.equal(model.generate(ids, 24, do_sample=False, temperature=1.5, top_p=0.5, seed=3), expected)


def test_top_k_1_sampling_is_greedy(model):
    ids = random_ids(V, 2, 8, seed=80)
    greedy = model.generate(ids, 20, do_sample=False)
    for seed in (0, 1):
        assert torch.equal(model.generate(ids, 20, top_k=1, temperature=1.3, seed=seed), greedy)


# ---- eos ----

def test_a_finished_sequence_keeps_emitting_eos_while_others_go_on(model):
    new = 10
    ids = random_ids(V, 2, 6, seed=90)
    greedy = [greedy_alone(model, ids[i], new) for i in range(2)]
    eos = int(greedy[0][0])  # row 0 finishes at its first token
    assert (greedy[0] != eos).any()  # left alone it would go on to other tokens, so eos must be forced
    out = model.generate(ids, new, do_sample=False, eos_token_id=eos)
    for i in range(2):
        expected = greedy[i].clone()
        hits = (expected == eos).nonzero()
        if hits.numel():
            expected[int(hits[0]) + 1:] = eos  # once finished, eos forever
        assert torch.equal(out[i, 6:], expected[: out.shape[1] - 6]), f"row {i}"
    assert (out[0, 6:] == eos).all()
    stops = [int((g == eos).nonzero()[0]) + 1 if (g == eos).any() else new for g in greedy]
    assert out.shape[1] == 6 + max(stops)


@pytest.mark.parametrize("sampled", [False, True])
def test_generation_stops_early_when_every_sequence_has_finished(model, sampled):
    ids = random_ids(V, 1, 5, seed=95)
    kwargs = dict(do_sample=True, seed=11) if sampled else dict(do_sample=False)
    free = model.generate(ids, 16, **kwargs)[0, 5:]
    eos = int(free[3])
    stop = int((free == eos).nonzero()[0]) + 1  # the first time eos comes, at step 3 or before
    out = model.generate(ids, 16, eos_token_id=eos, **kwargs)
    assert out.shape == (1, 5 + stop)
    assert torch.equal(out[0, 5:], free[:stop])
    assert len(list(model.stream(ids, 16, eos_token_id=eos, **kwargs))) == stop


# ---- edges and checks ----

def test_max_new_tokens_0_returns_the_input(model):
    ids = random_ids(V, 2, 5, seed=3)
    out = model.generate(ids, 0)
    assert torch.equal(out, ids) and out.data_ptr() != ids.data_ptr()
    assert list(model.stream(ids, 0)) == []


def test_filling_the_context_exactly_is_allowed_and_one_more_is_refused(model):
    ids = random_ids(V, 1, N_POSITIONS - 4, seed=4)
    assert model.generate(ids, 4, do_sample=False).shape == (1, N_POSITIONS)
    with pytest.raises(ValueError, match=rf"\+ max_new_tokens \(5\) = {N_POSITIONS + 1} is longer than the context, "
                                         rf"n_positions = {N_POSITIONS}"):
        model.generate(ids, 5)


@pytest.mark.parametrize("params, match", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_k=2.5), "top_k must be an int >= 0"),
])
def test_bad_sampling_parameters_are_refused(model, params, match):
    ids = random_ids(V, 1, 3)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, 4, **params)
    with pytest.raises(ValueError, match=match):
        next(model.stream(ids, 4, **params))


@pytest.mark.parametrize("max_new_tokens", [-1, 2.0])
def test_bad_max_new_tokens_is_refused(model, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(random_ids(V, 1, 3), max_new_tokens)


def test_attention_mask_with_an_empty_row_is_refused(model):
    ids = random_ids(V, 2, 4)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match="attention_mask row 1 has no tokens to attend to"):
        model.generate(ids, 3, attention_mask=mask)


def test_attention_mask_of_another_shape_is_refused(model):
    ids = random_ids(V, 2, 4)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\), input_ids \(2, 4\)"):
        model.generate(ids, 3, attention_mask=torch.ones(2, 3))


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError, match=r"T >= 1"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[V]]), 3)


@pytest.mark.parametrize("value", [2, -1, 0.5, float("nan")])
def test_attention_mask_values_other_than_0_and_1_are_refused(model, value):
    ids = random_ids(V, 2, 4)
    mask = torch.ones(2, 4)
    mask[1, 2] = value
    with pytest.raises(ValueError, match=rf"attention_mask must hold only 0 and 1, got {float(value)!r} at row 1, "
                                         rf"column 2"):
        model.generate(ids, 3, attention_mask=mask)


def test_a_boolean_or_integer_attention_mask_is_taken(model):
    ids = random_ids(V, 2, 5, seed=90)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    expected = model.generate(ids, 4, do_sample=False, attention_mask=mask.float())
    assert torch.equal(model.generate(ids, 4, do_sample=False, attention_mask=mask.bool()), expected)
    assert torch.equal(model.generate(ids, 4, do_sample=False, attention_mask=mask), expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eos_token_id=V), rf"eos_token_id must be an int in \[0, {V - 1}\], got {V}"),
    (dict(eos_token_id=-1), rf"eos_token_id must be an int in \[0, {V - 1}\], got -1"),
    (dict(eos_token_id=True), r"eos_token_id must be an int .*got True"),
    (dict(eos_token_id=3.0), r"eos_token_id must be an int .*got 3.0"),
    (dict(temperature=True), r"temperature must be a finite number >= 0, got True"),
    (dict(temperature="1"), r"temperature must be a finite number >= 0, got '1'"),
    (dict(temperature=torch.tensor([1.0])), r"temperature must be a finite number >= 0"),
    (dict(top_k=torch.tensor(2.0)), r"top_k must be an int >= 0"),
    (dict(top_p=torch.tensor(True)), r"top_p must be in \(0, 1\]"),
    (dict(do_sample="no"), r"do_sample must be True or False, got 'no'"),
    (dict(seed=1.5), r"seed must be an int"),
    (dict(seed=2**64), r"seed must be an int"),
], ids=str)
def test_bad_generation_arguments_are_named(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(random_ids(V, 1, 3), 4, **kwargs)


@pytest.mark.parametrize("max_new_tokens", [True, False, 2.0, "3"])
def test_max_new_tokens_must_be_an_int_not_a_bool(model, max_new_tokens):
    with pytest.raises(ValueError, match=rf"max_new_tokens must be an int >= 0, got {max_new_tokens!r}"):
        model.generate(random_ids(V, 1, 3), max_new_tokens)


def test_numpy_scalars_and_0d_tensors_are_taken_as_numbers(model):
    np = pytest.importorskip("numpy")
    ids = random_ids(V, 2, 4, seed=91)
    expected = model.generate(ids, 6, temperature=0.75, top_k=20, top_p=0.875, seed=4)
    for real, integer in ((np.float32, np.int64), (np.float64, np.int32), (torch.tensor, torch.tensor)):
        out = model.generate(ids, integer(6), temperature=real(0.75), top_k=integer(20), top_p=real(0.875),
                             seed=integer(4))
        assert torch.equal(out, expected), real


@pytest.mark.parametrize("call", [lambda m: m([[1, 2, 3]]), lambda m: m.generate([[1, 2, 3]], 2),
                                  lambda m: next(m.stream((1, 2, 3), 2))], ids=["forward", "generate", "stream"])
def test_a_list_of_ids_is_refused_by_type(model, call):
    with pytest.raises(TypeError, match=r"input_ids must be a tensor \[B, T\] of token ids, got (list|tuple) "
                                        r"\(a list of ids: torch.tensor\(\[ids\]\)\)"):
        call(model)


def test_an_attention_mask_that_is_not_a_tensor_is_refused_by_type(model):
    with pytest.raises(TypeError, match="attention_mask must be a tensor shaped as input_ids, got list"):
        model.generate(random_ids(V, 1, 3), 2, attention_mask=[[1, 1, 1]])


# ---- one model, several generations at once ----

@torch.no_grad()
def greedy_recomputed(model, prompt: torch.Tensor, new: int) -> list[int]:
    """The greedy continuation of prompt [1, T], each token from the whole sequence recomputed without a cache."""
    seq = prompt
    for _ in range(new):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, prompt.shape[1]:].tolist()


def test_interleaved_streams_with_the_same_settings_keep_their_own_cache(model):
    a_ids, b_ids = random_ids(V, 1, 5, seed=92), random_ids(V, 1, 5, seed=93)
    a, b = model.stream(a_ids, 12, do_sample=False), model.stream(b_ids, 12, do_sample=False)
    got_a, got_b = [], []
    for ta, tb in zip(a, b):
        got_a.append(int(ta))
        got_b.append(int(tb))
    assert got_a == greedy_recomputed(model, a_ids, 12)
    assert got_b == greedy_recomputed(model, b_ids, 12)


def test_a_stream_started_inside_another_does_not_disturb_it(model):
    outer_ids, inner_ids = random_ids(V, 1, 6, seed=94), random_ids(V, 1, 3, seed=95)
    outer = model.stream(outer_ids, 10, do_sample=False)
    got = [int(next(outer)) for _ in range(4)]
    inner = model.generate(inner_ids, 10, do_sample=False)  # same settings: would take the kept decoder
    got += [int(t) for t in outer]
    assert got == greedy_recomputed(model, outer_ids, 10)
    assert inner[0, 3:].tolist() == greedy_recomputed(model, inner_ids, 10)


def test_generations_from_several_threads_match_each_alone(model):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [random_ids(V, 2, 4, seed=100 + i) for i in range(4)]
    alone = [model.generate(p, 16, top_p=0.9, seed=i) for i, p in enumerate(prompts)]

    def run(i):
        return [model.generate(prompts[i], 16, top_p=0.9, seed=i) for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    for i, outs in enumerate(results):
        assert all(torch.equal(out, alone[i]) for out in outs), i


def test_set_backend_holds_for_a_seeded_generation_in_a_worker_thread(model):
    from concurrent.futures import ThreadPoolExecutor

    import gpt2fast

    ids = random_ids(V, 2, 4, seed=110)
    before = gpt2fast.get_backend()
    gpt2fast.set_backend("torch")
    try:
        here = model.generate(ids, 12, seed=3)
        with ThreadPoolExecutor(1) as pool:
            there = pool.submit(lambda: (gpt2fast.get_backend(), model.generate(ids, 12, seed=3))).result()
    finally:
        gpt2fast.set_backend(before)
    assert there[0] == "torch" and torch.equal(there[1], here)


def test_an_unfinished_stream_collected_with_its_model_ends_quietly(monkeypatch):
    """A reference cycle (here the model holding its own stream) is collected at once: the model's weak entries
    are cleared before the stream's cleanup runs, which must not raise."""
    import gc
    import sys

    from gpt2fast import GPT2, GPT2Config
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    model = GPT2(GPT2Config(vocab_size=V, n_positions=N_POSITIONS, n_embd=32, n_head=2, n_layer=1))
    tokens = model.stream(random_ids(V, 1, 3), 5, do_sample=False)
    next(tokens)
    model.pending = tokens
    del model, tokens
    gc.collect()
    assert [u.exc_value for u in unraisable] == []


def test_training_mode_comes_back_after_the_last_of_interleaved_streams(model):
    model.train()
    try:
        a, b = model.stream(random_ids(V, 1, 3), 4, do_sample=False), model.stream(random_ids(V, 1, 3), 6,
                                                                                  do_sample=False)
        next(a), next(b)
        list(a)
        assert not model.training  # b still runs: no dropout for it
        list(b)
        assert model.training
    finally:
        model.eval()
