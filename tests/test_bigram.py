import math
from collections import Counter

import pytest
import torch

from gpt2fast.bigram import CountingBigram, NeuralBigram, bigram_counts, run_bigrams
from gpt2fast.cli import main
from gpt2fast.data import default_data_dir, load_text, split_text

SHAKESPEARE = default_data_dir() / "tinyshakespeare.txt"
TINY_TEXT = "abba cab\nbacca abc\n"


def encode_chars(text: str) -> tuple[list[str], list[int]]:
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return chars, [stoi[c] for c in text]


@pytest.fixture(scope="module")
def shakespeare():
    if not SHAKESPEARE.exists():
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE} (set GPT2FAST_DATA)")
    text = load_text(SHAKESPEARE)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    train, val = split_text(text)
    return chars, torch.tensor([stoi[c] for c in train]), torch.tensor([stoi[c] for c in val])


@pytest.fixture(scope="module")
def counting_shakespeare(shakespeare):
    chars, train, _ = shakespeare
    return CountingBigram().fit(train, len(chars))


# --- counting bigram on a hand-checkable text -------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 1.0, 0.5])
def test_counting_probs_follow_definition(smoothing):
    chars, ids = encode_chars(TINY_TEXT)
    V = len(chars)
    pairs = Counter(zip(ids[:-1], ids[1:]))
    model = CountingBigram().fit(ids, V, smoothing)
    for a in range(V):
        row_total = sum(pairs[(a, b)] + smoothing for b in range(V))
        for b in range(V):
            assert model.counts[a, b] == pairs[(a, b)]
            expected = (pairs[(a, b)] + smoothing) / row_total
            assert model.probs[a, b].item() == pytest.approx(expected)


def test_counting_loss_is_mean_nll_of_pairs():
    chars, ids = encode_chars(TINY_TEXT)
    model = CountingBigram().fit(ids, len(chars))
    expected = -sum(math.log(model.probs[a, b].item()) for a, b in zip(ids[:-1], ids[1:]))
    assert model.loss(ids) == pytest.approx(expected / (len(ids) - 1))


def test_unsmoothed_model_gives_infinite_loss_on_unseen_pair():
    chars, ids = encode_chars(TINY_TEXT)
    a = chars.index("a")
    model = CountingBigram().fit(ids, len(chars), smoothing=0.0)
    assert model.counts[a, a] == 0
    assert math.isinf(model.loss([a, a]))
    assert math.isfinite(CountingBigram().fit(ids, len(chars), smoothing=1.0).loss([a, a]))


def test_token_without_successor_gets_uniform_row():
    # "z" only ends the text, so with k = 0 its row has no counts at all.
    chars, ids = encode_chars("abz")
    model = CountingBigram().fit(ids, len(chars), smoothing=0.0)
    z = chars.index("z")
    assert torch.allclose(model.probs[z], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert len(model.sample(5, z, torch.Generator().manual_seed(0))) == 6


def test_counting_errors():
    with pytest.raises(RuntimeError, match="fit"):
        CountingBigram().loss([0, 1])
    with pytest.raises(ValueError, match="smoothing"):
        CountingBigram().fit([0, 1], 2, smoothing=-1.0)
    with pytest.raises(ValueError, match="2 tokens"):
        CountingBigram().fit([0, 1], 2).loss([0])


# --- neural bigram on small inputs ------------------------------------------------------


def test_neural_forward_shapes_and_initial_loss():
    V = 7
    model = NeuralBigram(V)
    idx = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx)
    assert logits.shape == (3, 5, V) and loss is None
    _, loss = model(idx, idx)
    # Zero-initialised logits predict uniformly.
    assert loss.item() == pytest.approx(math.log(V))


def test_neural_evaluate_matches_forward_loss():
    chars, ids = encode_chars(TINY_TEXT)
    model = NeuralBigram(len(chars))
    torch.nn.init.normal_(model.logits_table.weight, generator=torch.Generator().manual_seed(0))
    seq = torch.tensor(ids)
    _, loss = model(seq[None, :-1], seq[None, 1:])
    assert model.evaluate(seq) == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("optimizer, lr", [("adamw", 0.1), ("sgd", 10.0)])
def test_neural_fit_reduces_loss(optimizer, lr):
    chars, ids = encode_chars(TINY_TEXT * 20)
    ids = torch.tensor(ids)
    model = NeuralBigram(len(chars))
    result = model.fit(
        ids, ids, steps=100, batch_size=16, lr=lr, block_size=8,
        generator=torch.Generator().manual_seed(0), progress=False, optimizer=optimizer,
    )
    best = CountingBigram().fit(ids, len(chars), smoothing=0.0).loss(ids)
    assert result["train_loss"] < math.log(len(chars)) - 0.5
    assert result["train_loss"] == pytest.approx(best, abs=0.1)


def test_neural_fit_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        NeuralBigram(3).fit(torch.arange(3).repeat(10), torch.arange(3), steps=1, optimizer="lion")


def test_generate_shape_and_range():
    model = NeuralBigram(5)
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 10, torch.Generator().manual_seed(0))
    assert out.shape == (2, 13)
    assert torch.equal(out[:, :3], torch.zeros(2, 3, dtype=torch.long))
    assert out.min() >= 0 and out.max() < 5


# --- tiny Shakespeare --------------------------------------------------------------------


def test_counting_val_loss_on_shakespeare(shakespeare, counting_shakespeare):
    _, _, val = shakespeare
    assert 2.4 <= counting_shakespeare.loss(val) <= 2.6


def test_neural_converges_to_counting_loss(shakespeare, counting_shakespeare):
    chars, train, val = shakespeare
    model = NeuralBigram(len(chars))
    result = model.fit(
        train, val, steps=300, batch_size=128, lr=0.1,
        generator=torch.Generator().manual_seed(0), progress=False,
    )
    assert abs(result["val_loss"] - counting_shakespeare.loss(val)) < 0.05


def test_sampling_is_seeded_and_in_vocab(shakespeare, counting_shakespeare):
    chars, _, _ = shakespeare
    newline = chars.index("\n")
    sample = lambda seed: counting_shakespeare.sample(100, newline, torch.Generator().manual_seed(seed))
    first, again, other = sample(3), sample(3), sample(4)
    assert first == again and first != other
    assert len(first) == 101 and first[0] == newline
    assert set("".join(chars[i] for i in first)) <= set(chars)

    model = NeuralBigram(len(chars))
    gen = lambda seed: model.generate(
        torch.tensor([[newline]]), 100, torch.Generator().manual_seed(seed)
    )
    assert torch.equal(gen(3), gen(3))


# --- end to end --------------------------------------------------------------------------


def test_run_bigrams_on_small_text(tmp_path):
    text = "the cat sat on the mat.\nthe dog sat on the log.\n" * 50
    path = tmp_path / "small.txt"
    path.write_text(text)
    kwargs = dict(steps=60, batch_size=16, sample_len=40, seed=7, progress=False)
    result = run_bigrams(path, **kwargs)
    assert result == run_bigrams(path, **kwargs)
    vocab = set(text)
    assert result["vocab_size"] == len(vocab)
    assert result["uniform_loss"] == pytest.approx(math.log(len(vocab)))
    for name in ("counting", "neural"):
        entry = result[name]
        assert len(entry["sample"]) == 41 and set(entry["sample"]) <= vocab
        assert 0 < entry["train_loss"] < result["uniform_loss"]
        assert 0 < entry["val_loss"] < result["uniform_loss"]


def test_bigram_counts_vectorised_matches_loop():
    ids = torch.randint(0, 6, (200,), generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(6, 6, dtype=torch.long)
    for a, b in zip(ids[:-1].tolist(), ids[1:].tolist()):
        expected[a, b] += 1
    assert torch.equal(bigram_counts(ids, 6), expected)


# --- bad options and data, refused by name ----------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("steps", -1, "steps must be a finite number >= 0, got -1"),
    ("lr", 0.0, "lr must be a finite number > 0, got 0.0"),
    ("lr", float("nan"), "lr must be a finite number > 0, got nan"),
    ("smoothing", float("inf"), "smoothing must be a finite number >= 0, got inf"),
    ("batch_size", 0, "batch_size must be a finite number >= 1, got 0"),
    ("sample_len", -3, "sample_len must be a finite number >= 0, got -3"),
])
def test_run_bigrams_refuses_a_bad_option_before_reading(option, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_bigrams(tmp_path / "never-read.txt", **{option: value})


@pytest.mark.parametrize("text", ["", "x" * 30])
def test_run_bigrams_refuses_a_text_too_short_naming_it(text, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"short.txt is too short for the bigram models: {len(text)} characters"):
        run_bigrams(path, progress=False)


def test_cli_bigram_refuses_bad_input_in_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for args, named in ((["--steps=-1"], "steps"), ([f"--data={empty}"], str(empty)),
                        ([f"--data={tmp_path}"], f"{tmp_path} is a folder")):
        with pytest.raises(SystemExit) as exit_:
            main(["bigram", *args])
        message = str(exit_.value)
        assert message.startswith("gpt2fast bigram: error: ") and named in message and "\n" not in message
