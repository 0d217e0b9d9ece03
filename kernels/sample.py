"""One token per row of logits [B, V]: temperature, then top-k, then top-p (HF's warpers), without sorting.

Each row works on the reference's fp32 scores s = (x - max x) / T, computed the same way, so that ties
and their order are the reference's, and on p = exp(s) (unnormalised probabilities).
- top-k keeps the scores >= the k-th largest. That value is found by bisection over the scores' bit
  patterns, read as integers that order as the floats do ("keys"): 32 passes that only count, and exact.
- top-p (HF: a stable ascending sort, dropping the tokens whose cumulative probability stays <= 1 - top_p)
  keeps token j iff the mass ranked above j is < top_p * Z, Z the mass top-k kept. "Ranked above" orders
  by score, then by id: the stable sort puts the higher id above among ties.
- The draw is by rejection, as FlashInfer does, not by finding the nucleus: draw j from the tokens ranked
  above a pivot in proportion to p (a running sum against u * their mass), then sum the mass ranked
  above j. If that is < top_p * Z, j is in the nucleus: accept it. Otherwise neither j nor anything
  ranked below it is, so j becomes the pivot and the draw repeats above it. An accepted token is
  distributed exactly as p restricted to the nucleus, and each round accepts with probability >= top_p,
  so it takes at most 1 / top_p rounds on average (two passes each); without top-p the first draw stands.
  The top-ranked token has no mass above it and is always accepted, even where top_p rounds to 0 in fp32
  (the nucleus keeps at least one token): each rejection moves the pivot up, so a row ends within V rounds.
Greedy decoding (temperature 0) is an argmax and needs no kernel.
"""
import torch
import triton
import triton.language as tl

from .target import Target

NO_KEY = tl.constexpr(-(2**31) - 1)  # below every key: a pivot that every token is ranked above, a threshold all pass


@triton.jit
def _load(X, rows, row_ok, stride_x, cols, V):
    """Raw logits of a [ROWS, BLOCK] tile in fp32; -inf past V and on rows past B."""
    mask = row_ok[:, None] & (cols < V)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=-float("inf"))
    return x.to(tl.float32)


@triton.jit
def _scores(x, x_max, temperature):
    """(x - max) / T as the reference computes it (IEEE division); a row holding +inf gives its +inf
    entries 0 and the rest -inf (all the mass, evenly, on the +inf entries)."""
    posinf = x_max == float("inf")
    x = tl.where(posinf, tl.where(x == float("inf"), 0.0, -float("inf")), x)
    return tl.math.div_rn(x - tl.where(posinf, 0.0, x_max), temperature)


@triton.jit
def _key(s):
    """s's bits as an int64 that orders as the float does: negative floats get their magnitude bits flipped."""
    bits = s.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _tile(X, rows, row_ok, stride_x, c0, V, x_max, temperature, BLOCK: tl.constexpr):
    """(cols, scores, keys) of the tile of columns starting at c0."""
    cols = c0 + tl.arange(0, BLOCK)
    s = _scores(_load(X, rows, row_ok, stride_x, cols, V), x_max[:, None], temperature)
    return cols, s, _key(s)


@triton.jit
def _candidates(key, cols, min_key, pivot_key, pivot_id):
    """The tokens top-k keeps (key >= min_key) that rank above the pivot (higher score, or equal and higher id)."""
    above = (key > pivot_key[:, None]) | ((key == pivot_key[:, None]) & (cols[None, :] > pivot_id[:, None]))
    return (key >= min_key[:, None]) & above


@triton.jit
def _row_max(X, rows, row_ok, stride_x, V, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    x_max = tl.full((ROWS,), -float("inf"), tl.float32)
    for c0 in range(0, V, BLOCK):
        x_max = tl.maximum(x_max, tl.max(_load(X, rows, row_ok, stride_x, c0 + tl.arange(0, BLOCK), V), axis=1))
    return tl.where(row_ok, x_max, 0.0)  # rows past B: any finite value, so their scores are never NaN


@triton.jit
def _kth_largest_key(X, rows, row_ok, stride_x, V, x_max, temperature, top_k,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The key of each row's k-th largest score: the largest t with at least k keys >= t, bit by bit."""
    t = tl.full((ROWS,), -(2**31), tl.int64)
    step = tl.full((), 2**31, tl.int64)
    while step > 0:
        candidate = t + step
        count = tl.zeros((ROWS,), tl.int32)
        for c0 in range(0, V, BLOCK):
            cols, _, key = _tile(X, rows, row_ok, stride_x, c0, V, x_max, temperature, BLOCK)
            count += tl.sum(((key >= candidate[:, None]) & (cols < V)[None, :]).to(tl.int32), axis=1)
        t = tl.where(count >= top_k, candidate, t)
        step = step // 2
    return t


@triton.jit
def _mass(X, rows, row_ok, stride_x, V, x_max, temperature, min_key, pivot_key, pivot_id,
          ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of p over the candidates (see _candidates)."""
    total = tl.zeros((ROWS,), tl.float32)
    for c0 in range(0, V, BLOCK):
        cols, s, key = _tile(X, rows, row_ok, stride_x, c0, V, x_max, temperature, BLOCK)
        total += tl.sum(tl.where(_candidates(key, cols, min_key, pivot_key, pivot_id), tl.exp(s), 0.0), axis=1)
    return total


@triton.jit
def _draw(X, rows, row_ok, stride_x, V, x_max, temperature, min_key, pivot_key, pivot_id, target,
          ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The first candidate, in id order, at which the running sum of p passes target; the last candidate
    with p > 0 where rounding leaves the whole sum at or below target. Tokens with p = 0 are never drawn."""
    running = tl.zeros((ROWS,), tl.float32)
    first = tl.full((ROWS,), 2**31 - 1, tl.int32)
    last = tl.full((ROWS,), -1, tl.int32)
    for c0 in range(0, V, BLOCK):
        cols, s, key = _tile(X, rows, row_ok, stride_x, c0, V, x_max, temperature, BLOCK)
        p = tl.where(_candidates(key, cols, min_key, pivot_key, pivot_id), tl.exp(s), 0.0)
        passed = (tl.cumsum(p, axis=1) + running[:, None] > target[:, None]) & (p > 0)
        first = tl.minimum(first, tl.min(tl.where(passed, cols[None, :], 2**31 - 1), axis=1))
        last = tl.maximum(last, tl.max(tl.where(p > 0, cols[None, :], -1), axis=1))
        running += tl.sum(p, axis=1)
    return tl.where(first < V, first, last)


@triton.jit
def _sample_kernel(X, Seed, Out, stride_x, B, V, temperature, top_k, top_p,
                   HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # fp32, as the kernel's float arguments are compiled; the interpreter would take a subnormal one as fp64.
    temperature = tl.full((), temperature, tl.float32)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    x_max = _row_max(X, rows, row_ok, stride_x, V, ROWS, BLOCK)
    no_pivot = tl.full((ROWS,), NO_KEY, tl.int64)
    min_key = no_pivot
    if HAS_TOP_K:
        min_key = _kth_largest_key(X, rows, row_ok, stride_x, V, x_max, temperature, top_k, ROWS, BLOCK)
    no_id = tl.full((ROWS,), -1, tl.int32)
    kept_mass = _mass(X, rows, row_ok, stride_x, V, x_max, temperature, min_key, no_pivot, no_id, ROWS, BLOCK)

    seed = tl.load(Seed)
    pivot_key, pivot_id, region_mass = no_pivot, no_id, kept_mass
    choice = no_id
    drawing = row_ok
    attempt = 0
    while tl.max(drawing.to(tl.int32), axis=0) > 0:
        u = tl.rand(seed, rows + attempt * B)  # a fresh uniform per row and attempt
        j = _draw(X, rows, row_ok, stride_x, V, x_max, temperature, min_key, pivot_key, pivot_id,
                  u * region_mass, ROWS, BLOCK)
        accept = drawing
        if HAS_TOP_P:
            x_j = tl.load(X + rows.to(tl.int64) * stride_x + j, mask=row_ok, other=0.0).to(tl.float32)
            key_j = _key(_scores(x_j, x_max, temperature))
            above_j = _mass(X, rows, row_ok, stride_x, V, x_max, temperature, min_key, key_j, j, ROWS, BLOCK)
            # The top-ranked token (nothing above it) is always kept, even for a top_p that rounds to 0.
            accept = drawing & ((above_j == 0.0) | (above_j < top_p * kept_mass))
            rejected = drawing & ~accept
            pivot_key = tl.where(rejected, key_j, pivot_key)
            pivot_id = tl.where(rejected, j, pivot_id)
            region_mass = tl.where(rejected, above_j, region_mass)
        choice = tl.where(accept, j, choice)
        drawing = drawing & ~accept
        attempt += 1
    tl.store(Out + rows, choice.to(tl.int64), mask=row_ok)


_MAX_BLOCK = 2**16  # columns per block at most: no tile is wider (tests lower it, to read short rows in many blocks)


def tile_shape(B: int, V: int, target: Target) -> tuple[int, int]:
    """(rows per program, columns per block) for B rows of V logits on `target`."""
    # Tiles of 4096 scores: a long row is read in blocks of 4096 (16 per thread at 8 warps); short rows are
    # stacked, several per program, so that a tile stays full. The interpreter runs one program at a time
    # in Python, at a cost per operation more than per element: there, tiles of 65536.
    tile = 2**16 if target.interpreter else 4096
    block = min(triton.next_power_of_2(V), tile, _MAX_BLOCK)
    return min(tile // block, triton.next_power_of_2(B)), block


def sample_forward(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                   seed: torch.Tensor, target: Target | None = None) -> torch.Tensor:
    """[B] int64 ids drawn from logits [B, V] (temperature > 0; top_k 0 or >= V and top_p 1 mean off);
    seed is an int64 tensor of one element, the Philox seed of the draws' uniforms; target: the machine to
    configure the launch for (default: that of the logits' device)."""
    B, V = logits.shape
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    rows, block = tile_shape(B, V, target or Target.of(logits.device))
    _sample_kernel[(triton.cdiv(B, rows),)](
        x, seed, out, x.stride(0), B, V, temperature, top_k, top_p,
        HAS_TOP_K=0 < top_k < V, HAS_TOP_P=top_p < 1.0, ROWS=rows, BLOCK=block, num_warps=8)
    return out
