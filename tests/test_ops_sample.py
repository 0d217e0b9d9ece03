"""ops.sample: greedy, support, exact distribution, parity with HF's warpers, determinism, errors.

The distribution the op must draw from is written out here in fp64 from HF's definitions
(logits / T; keep >= the k-th largest; sort ascending, drop where the cumulative softmax is
<= 1 - top_p, keeping at least the top token), independently of the reference backend.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import gpt2fast
from gpt2fast import ops
from gpt2fast.ops.reference import filtered_logits
from conftest import randn

INF = math.inf
P_VALUE = 1e-3
DRAWS = 20_000


def kept_tokens(row, temperature, top_k, top_p, top_p_margin=0.0) -> torch.Tensor:
    """[V] bool: the tokens HF's warpers keep for one row of logits, computed in fp64.

    A +inf logit takes all the mass, evenly shared by the +inf entries (the limit of softmax), so such
    rows become 0 at +inf and -inf elsewhere first. `top_p_margin` > 0 keeps the tokens whose cumulative
    probability lies within the margin of 1 - top_p, where fp32 and fp64 may rightly disagree.
    """
    s = row.double().clone()
    if (s == INF).any():
        s = torch.where(s == INF, 0.0, -INF).double()
    s = s / temperature
    keep = s > -INF
    if top_k:
        kth = torch.sort(s, descending=True).values[min(top_k, len(s)) - 1]
        keep &= s >= kth
    if top_p is not None and top_p < 1:
        s = s.masked_fill(~keep, -INF)
        order = torch.sort(s, stable=True).indices  # ascending; among ties the lower id goes first
        p = torch.exp(s[order] - s.max())
        cumulative = torch.cumsum(p / p.sum(), 0)
        drop = cumulative <= 1 - top_p - top_p_margin
        drop[-1] = False
        keep[order[drop]] = False
    return keep


def oracle_probs(row, temperature, top_k, top_p) -> torch.Tensor:
    """[V] fp64: the exact renormalised distribution to draw from."""
    keep = kept_tokens(row, temperature, top_k, top_p)
    s = row.double()
    if (s == INF).any():
        s = torch.where(s == INF, 0.0, -INF).double()
    s = (s / temperature).masked_fill(~keep, -INF)
    p = torch.exp(s - s.max())
    return p / p.sum()


def assert_distribution(ids: torch.Tensor, probs: torch.Tensor, what: str = "") -> None:
    """Counts of `ids` never fall outside `probs`' support and pass a chi-square test against it."""
    counts = torch.bincount(ids.cpu(), minlength=len(probs)).double()
    assert len(counts) == len(probs), f"{what}: drew an id >= V"
    outside = (probs == 0) & (counts > 0)
    assert not outside.any(), f"{what}: drew tokens {outside.nonzero().flatten().tolist()} of probability 0"
    expected = probs * counts.sum()
    support = probs > 0
    observed, expected = counts[support], expected[support]
    small = expected < 5  # pool the rare tokens so that the chi-square approximation holds
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    if len(observed) < 2:
        return  # a single possible outcome: the support check above is the whole test
    p_value = chisquare(observed.numpy(), expected.numpy()).pvalue
    assert p_value > P_VALUE, (f"{what}: chi-square p = {p_value:.2e}; "
                               f"observed {observed.tolist()}, expected {expected.tolist()}")


def draw(logits_row, n, backend, device, seed=0, **params):
    logits = logits_row.to(device)[None].repeat(n, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    with gpt2fast.use_backend(backend):
        ids = ops.sample(logits, generator=generator, **params)
    assert ids.shape == (n,) and ids.dtype == torch.int64 and ids.device == logits.device
    return ids


def random_logits(V, seed, scale=1.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, generator=g) * scale).to(dtype)


# ---- greedy ----


def test_temperature_zero_is_argmax(backend, device, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1000, generator=g) * 3).to(device=device, dtype=dtype)
    with gpt2fast.use_backend(backend):
        ids = ops.sample(logits, temperature=0)
        ids_filtered = ops.sample(logits, temperature=0.0, top_k=5, top_p=0.3)
    expected = [int(torch.nonzero(r == r.max())[0]) for r in logits.double().cpu()]
    assert ids.tolist() == expected
    assert ids_filtered.tolist() == expected  # the argmax survives any top-k / top-p


def test_greedy_takes_the_first_index_on_ties(backend, device, dtype):
    rows = [[1, 5, 2, 5, 5], [7, 7, 7, 7, 7], [0, -INF, 3, 3, -INF], [-INF, -INF, -INF, -INF, 2],
            [0, INF, -INF, INF, 9], [4, 1, 2, 3, 4]]
    logits = torch.tensor(rows, dtype=dtype, device=device)
    with gpt2fast.use_backend(backend):
        ids = ops.sample(logits, temperature=0)
    assert ids.tolist() == [1, 0, 2, 4, 1, 0]


@pytest.mark.parametrize("rows", [1, 7])
def test_greedy_takes_the_first_index_on_ties_in_wide_rows(backend, device, rows):
    """GPT-2's vocabulary: the rows are reduced in vectors and in chunks, and the first maximum must still win."""
    logits = randn(rows, 50257, seed=5).to(device)
    firsts = [50256, 777, 0, 31, 40000, 8191, 12345][:rows]
    for r, first in enumerate(firsts):
        for at in {first, min(first + 1, 50256), 50256, first + (50256 - first) // 2}:
            logits[r, at] = 10.0
    with gpt2fast.use_backend(backend):
        ids = ops.sample(logits, temperature=0)
    assert ids.tolist() == firsts


def test_tiny_positive_temperature_is_greedy_or_refused(backend, device):
    """T -> 0+ is the argmax; a T so small that logits / T overflows must not crash inside torch."""
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [-2.0, 5.0, 4.0, -1.0]], device=device)
    with gpt2fast.use_backend(backend):
        try:
            ids = ops.sample(logits, temperature=1e-39, generator=torch.Generator(device=device).manual_seed(0))
        except ValueError as e:
            assert "temperature" in str(e)
            return
    assert ids.tolist() == [2, 1]


# ---- support: never a token outside top-k / the nucleus ----

# Logits on a grid of quarters: ties are common (so the tie rules are exercised) and dividing by the
# temperature in fp32 cannot create ties that fp64 would not see.
grid_logits = st.lists(st.integers(-40, 40).map(lambda i: i / 4), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=grid_logits, temperature=st.floats(0.05, 5.0),
       top_k=st.none() | st.integers(0, 14), top_p=st.none() | st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_never_draws_outside_top_k_or_nucleus(backend, device, row, temperature, top_k, top_p, seed):
    logits = torch.tensor(row)
    allowed = kept_tokens(logits, temperature, top_k, top_p, top_p_margin=1e-5)
    ids = draw(logits, 300, backend, device, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p)
    drawn = set(ids.tolist())
    assert drawn <= set(allowed.nonzero().flatten().tolist()), f"drew {sorted(drawn)}, allowed {allowed.tolist()}"


def test_top_k_keeps_every_tie_at_the_kth_value(backend, device):
    logits = torch.tensor([3.0, 1.0, 3.0, 0.0, 3.0, 2.0, 3.0, -1.0])
    ids = draw(logits, 2000, backend, device, seed=3, top_k=2)
    assert set(ids.tolist()) == {0, 2, 4, 6}


def test_top_p_keeps_at_least_the_top_token(backend, device):
    logits = random_logits(16, seed=4)
    ids = draw(logits, 500, backend, device, seed=5, top_p=1e-9)
    assert set(ids.tolist()) == {int(logits.argmax())}


@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")  # triton's interpreter: -inf, as wanted
@pytest.mark.parametrize("temperature", [1e-300, 1e-46, 1e-40])
def test_a_temperature_below_fp32_range_is_greedy(backend, device, temperature):
    """1e-46 rounds to 0 in fp32, where the top score would be 0 / 0; 1e-40 is an fp32 subnormal."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(9)).to(device)
    with gpt2fast.use_backend(backend):
        ids = ops.sample(logits, temperature=temperature, generator=torch.Generator(device=device).manual_seed(1))
    assert torch.equal(ids, logits.argmax(dim=-1))


# 1e-46 and smaller round to 0 in fp32, where a sampler's acceptance test `above < top_p * Z` never holds:
# each backend must still end, with the top token.
@pytest.mark.parametrize("top_p", [1e-300, 1e-50, 1e-46, 1e-45, 1e-38])
def test_top_p_below_fp32_range_ends_with_the_top_token(backend, device, top_p):
    logits = random_logits(33, seed=6)
    ids = draw(logits, 64, backend, device, seed=7, top_p=top_p)
    assert set(ids.tolist()) == {int(logits.argmax())}


def test_top_p_below_fp32_range_takes_the_top_ranked_of_tied_tokens(backend, device):
    logits = torch.full((9,), 0.7)  # all tied: the stable sort ranks the highest id on top
    ids = draw(logits, 64, backend, device, seed=8, top_k=4, top_p=1e-300)
    assert set(ids.tolist()) == {8}


# ---- distribution: chi-square against the exact probabilities ----

# (V, temperature, top_k, top_p); top_k 0 and top_p 1 mean "off".
DISTRIBUTION_CASES = [
    (8, 1.0, None, None),
    (16, 0.7, 5, None),
    (12, 1.3, None, 0.8),
    (16, 1.0, 6, 0.9),
    (10, 2.0, 3, 0.5),
    (8, 0.5, 0, 1.0),
    (16, 1.0, 20, 0.95),
]


@pytest.mark.parametrize("V,temperature,top_k,top_p", DISTRIBUTION_CASES)
def test_distribution_matches_exact_probabilities(backend, device, dtype, V, temperature, top_k, top_p):
    logits = random_logits(V, seed=V + int(10 * temperature), dtype=dtype)
    probs = oracle_probs(logits, temperature, top_k, top_p)
    ids = draw(logits, DRAWS, backend, device, seed=11, temperature=temperature, top_k=top_k, top_p=top_p)
    assert_distribution(ids, probs, f"T={temperature} top_k={top_k} top_p={top_p}")


EXTREME_ROWS = {
    "posinf": ([0.0, INF, -1.0, INF, INF, -INF, 2.0, 3.0], [0, 1 / 3, 0, 1 / 3, 1 / 3, 0, 0, 0]),
    "neginf": ([0.5, -INF, 1.0, -INF, 0.0, 2.0, -INF, -0.5], None),
    "huge": ([1e4, 1e4 - 0.5, -1e4, 1e4 - 1.0, 9998.0, -1e4, 1e4 - 0.25, 0.0], None),
    "all_equal": ([2.5] * 11, [1 / 11] * 11),
    "ties": ([3.0, 1.0, 3.0, 3.0, 2.9, 0.0, -2.0, 1.0], None),
}


@pytest.mark.parametrize("name", EXTREME_ROWS)
@pytest.mark.parametrize("params", [dict(), dict(top_k=3), dict(top_p=0.9),
                                    dict(temperature=0.5, top_k=4, top_p=0.7)], ids=["plain", "top_k", "top_p", "all"])
def test_distribution_of_extreme_logits(backend, device, name, params):
    row, uniform = EXTREME_ROWS[name]
    logits = torch.tensor(row)
    probs = oracle_probs(logits, params.get("temperature", 1.0), params.get("top_k"), params.get("top_p"))
    if uniform is not None and not params:
        torch.testing.assert_close(probs, torch.tensor(uniform, dtype=torch.float64))  # the oracle itself
    ids = draw(logits, DRAWS, backend, device, seed=12, **params)
    assert_distribution(ids, probs, f"{name} {params}")


def test_batch_rows_draw_from_their_own_distribution(backend, device):
    rows = torch.stack([random_logits(10, seed=21), torch.tensor([-INF] * 9 + [INF]), torch.zeros(10),
                        random_logits(10, seed=22, scale=4.0)])
    reps = 5000
    generator = torch.Generator(device=device).manual_seed(13)
    with gpt2fast.use_backend(backend):
        ids = ops.sample(rows.to(device).repeat(reps, 1), top_k=7, generator=generator).view(reps, len(rows))
    for i, row in enumerate(rows):
        assert_distribution(ids[:, i], oracle_probs(row, 1.0, 7, None), f"row {i}")


def test_batch_rows_are_independent(backend, device):
    """Pairs of rows with one distribution: their joint counts match the product distribution."""
    logits = torch.tensor([0.3, -0.2, 0.9, 0.0])
    p = oracle_probs(logits, 1.0, None, None)
    ids = draw(logits, 2 * 10_000, backend, device, seed=14).view(-1, 2)
    pair = ids[:, 0] * 4 + ids[:, 1]
    assert_distribution(pair, torch.outer(p, p).flatten(), "pairs of rows")


# ---- exact parity of the filtering with HF's warpers ----


def hf_filtered(logits, temperature, top_k, top_p):
    scores, input_ids = logits.clone(), torch.zeros(logits.shape[0], 1, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(float(temperature))]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores


def assert_same_filtering(ours, theirs):
    assert torch.equal(ours == -INF, theirs == -INF), "different tokens filtered out"
    finite = ours > -INF
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 10, None), (1.3, None, 0.9),
                                                     (1.0, 50, 0.95), (2.0, 3, 0.5), (0.5, 1, 0.3),
                                                     (1.0, 100, 1.0), (0.9, 0, 0.8)])
def test_filtering_matches_hf_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(6, 80, generator=g) * 3
    assert_same_filtering(filtered_logits(logits, temperature, top_k, top_p),
                          hf_filtered(logits, temperature, top_k, top_p))


def test_filtering_matches_hf_with_ties_at_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0, 2.0, 3.0, -1.0], [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 2.0, 0.5]])
    for top_k in (1, 2, 3, 5):
        assert_same_filtering(filtered_logits(logits, 1.0, top_k, None), hf_filtered(logits, 1.0, top_k, None))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(row=st.lists(st.integers(-80, 80).map(lambda i: i / 8), min_size=1, max_size=30, unique=True),
       temperature=st.floats(0.05, 5.0), top_k=st.none() | st.integers(1, 35),
       top_p=st.none() | st.floats(0.01, 1.0))
def test_filtering_matches_hf_warpers_property(row, temperature, top_k, top_p):
    # Distinct logits: HF sorts unstably, so ties at the nucleus boundary have no single HF answer.
    logits = torch.tensor([row])
    assert_same_filtering(filtered_logits(logits, temperature, top_k, top_p),
                          hf_filtered(logits, temperature, top_k, top_p))


# ---- determinism ----


def test_same_seed_gives_same_ids(backend, device):
    logits = random_logits(50, seed=16).to(device)[None].repeat(500, 1)
    with gpt2fast.use_backend(backend):
        runs = [ops.sample(logits, 0.9, 20, 0.9, torch.Generator(device=device).manual_seed(s)) for s in (7, 7, 8)]
        generator = torch.Generator(device=device).manual_seed(7)
        first, second = ops.sample(logits, 0.9, 20, 0.9, generator), ops.sample(logits, 0.9, 20, 0.9, generator)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # another seed, another draw (500 draws over ~15 tokens)
    assert torch.equal(first, runs[0])
    assert not torch.equal(first, second)  # the generator's state advances


def test_global_seed_is_honoured_without_generator(backend, device):
    logits = random_logits(50, seed=17).to(device)[None].repeat(500, 1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with gpt2fast.use_backend(backend):
            torch.manual_seed(3)
            a = ops.sample(logits)
            torch.manual_seed(3)
            b = ops.sample(logits)
    assert torch.equal(a, b)


# ---- errors ----

ROW = torch.tensor([[0.1, 0.5, -0.3]])


@pytest.mark.parametrize("params,match", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature="1.0"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(top_k=True), "top_k"),
], ids=str)
def test_bad_sampling_parameters_are_rejected(backend, params, match):
    with gpt2fast.use_backend(backend), pytest.raises(ValueError, match=match):
        ops.sample(ROW, **params)


@pytest.mark.parametrize("logits,error,match", [
    (torch.tensor([0.1, 0.5]), ValueError, r"\[B, V\]"),
    (torch.zeros(2, 3, 4) + 0.5, ValueError, r"\[B, V\]"),
    (torch.empty(2, 0), ValueError, r"V >= 1"),
    (torch.tensor([[1, 2, 3]]), TypeError, "floating point"),
    (torch.tensor([[0.1, math.nan, 0.3]]), ValueError, "NaN"),
    (torch.tensor([[0.1, 0.2], [-INF, -INF]]), ValueError, "all -inf"),
    # NaN beside +inf, NaN in a row otherwise all -inf, NaN in a low-precision row: each still named as NaN
    (torch.tensor([[0.3, 0.1], [INF, math.nan]]), ValueError, "NaN"),
    (torch.tensor([[-INF, math.nan, -INF]]), ValueError, "NaN"),
    (torch.tensor([[0.5, math.nan, 0.25]], dtype=torch.bfloat16), ValueError, "NaN"),
], ids=["1d", "3d", "empty", "int", "nan", "all_neginf", "nan_and_inf", "nan_and_neginf", "nan_bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["sampled", "greedy"])
def test_bad_logits_are_rejected(backend, logits, error, match, temperature):
    with gpt2fast.use_backend(backend), pytest.raises(error, match=match):
        ops.sample(logits, temperature=temperature)


def test_generator_on_another_device_is_rejected(backend):
    logits = torch.zeros(2, 5, device="meta")
    with gpt2fast.use_backend(backend), pytest.raises(ValueError, match="generator"):
        ops.sample(logits, generator=torch.Generator().manual_seed(0))
