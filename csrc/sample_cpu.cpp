// Sampling on the CPU without sorting (the algorithm of kernels/sample.py, for one row at a time):
// - the scores s = (x - max x) / T, exactly as the reference computes them (IEEE fp32 division);
// - top-k's threshold, the k-th largest score, by std::nth_element: linear time, exact;
// - p = exp(s) once, kept tokens only; the draws sum p in double;
// - top-p by rejection with pivots (FlashInfer's method): draw j in proportion to p among the tokens ranked
//   above a pivot (by score, then by id), accept j if the mass ranked above it is < top_p * Z, else make j
//   the pivot and draw again above it. An accepted token is distributed exactly as p restricted to the
//   nucleus; each round accepts with probability >= top_p.
// - the top-ranked token has no mass above it and is always accepted, whatever top_p (even one that rounds
//   to 0 in fp32: the nucleus keeps at least one token), and each rejection moves the pivot up the ranking,
//   so a row takes at most `vocab` rounds: the loop ends for every valid input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "gpt2fast.h"

#include "cpu_x86.h"

namespace gpt2fast {
namespace {

// SplitMix64 (Steele, Lea and Flood, 2014): a counter-based generator, so each (seed, stream, draw) is
// independent of how rows are spread over threads.
uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

double uniform(uint64_t seed, uint64_t stream, uint64_t draw) {
  const uint64_t key = mix(seed + 0x9e3779b97f4a7c15ULL * (stream + 1)) + 0x9e3779b97f4a7c15ULL * (draw + 1);
  return static_cast<double>(mix(key) >> 11) * 0x1.0p-53;  // 53 random bits: [0, 1)
}

struct Row {
  std::vector<float> score;  // the reference's scores
  std::vector<double> p;     // exp(score) for the tokens top-k keeps, else 0
};

Row scores(const float* x, int64_t vocab, float temperature) {
  const float inf = std::numeric_limits<float>::infinity();
  const float x_max = *std::max_element(x, x + vocab);
  Row row{std::vector<float>(vocab), std::vector<double>(vocab)};
  for (int64_t i = 0; i < vocab; ++i) {
    // A row holding +inf: 0 on its +inf entries, -inf elsewhere, as the reference resolves it.
    row.score[i] = x_max == inf ? (x[i] == inf ? 0.0f : -inf) : (x[i] - x_max) / temperature;
  }
  return row;
}

float kth_largest(std::vector<float> s, int64_t k) {
  std::nth_element(s.begin(), s.begin() + (k - 1), s.end(), std::greater<float>());
  return s[k - 1];
}

// Token i ranks above token j: a higher score, or the same score and a higher id (HF's stable ascending sort).
bool above(const Row& row, int64_t i, int64_t j) {
  return row.score[i] > row.score[j] || (row.score[i] == row.score[j] && i > j);
}

double mass_above(const Row& row, int64_t j) {
  double mass = 0.0;
  for (int64_t i = 0; i < static_cast<int64_t>(row.p.size()); ++i) {
    if (row.p[i] > 0.0 && above(row, i, j)) mass += row.p[i];
  }
  return mass;
}

// The first token, in id order, at which the running sum of p over the tokens ranked above `pivot` (all of
// them for pivot -1) passes `target`; the last such token with p > 0 where rounding leaves the sum short.
int64_t draw(const Row& row, int64_t pivot, double target) {
  double running = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(row.p.size()); ++i) {
    if (row.p[i] == 0.0 || (pivot >= 0 && !above(row, i, pivot))) continue;
    running += row.p[i];
    last = i;
    if (running > target) return i;
  }
  return last;
}

}  // namespace

int64_t sample_row_cpu(const float* logits, int64_t vocab, float temperature, int64_t top_k, float top_p,
                       uint64_t seed, uint64_t stream) {
  Row row = scores(logits, vocab, temperature);
  const float min_score = (top_k > 0 && top_k < vocab) ? kth_largest(row.score, top_k)
                                                      : -std::numeric_limits<float>::infinity();
  double kept = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    row.p[i] = row.score[i] >= min_score ? std::exp(static_cast<double>(row.score[i])) : 0.0;
    kept += row.p[i];
  }
  int64_t pivot = -1;
  double region = kept;
  for (uint64_t attempt = 0;; ++attempt) {
    const int64_t j = draw(row, pivot, uniform(seed, stream, attempt) * region);
    if (top_p >= 1.0f) return j;
    const double above_j = mass_above(row, j);
    if (above_j == 0.0 || above_j < static_cast<double>(top_p) * kept) return j;
    pivot = j;  // above_j > 0: the next round draws from a non-empty region above j
    region = above_j;
  }
}

// ---- greedy ----

namespace {

int64_t greedy_row_portable(const float* x, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i) {
    if (x[i] > x[best]) best = i;
  }
  return best;
}

#ifdef GPT2FAST_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
// Each lane keeps its largest value and the first index it was seen at (a strict > never moves a lane to a
// later equal value); then the largest of the lanes, and the lowest index among the lanes holding it. Two
// sets of lanes, over alternate vectors, so that consecutive compares do not wait on each other.
int64_t greedy_row_avx512(const float* x, int64_t vocab) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 best[2] = {lowest, lowest};
  __m512i at[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t i = 0;
  for (; i + 32 <= vocab; i += 32) {
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_loadu_ps(x + i + 16 * h);
      const __mmask16 more = _mm512_cmp_ps_mask(v, best[h], _CMP_GT_OQ);
      best[h] = _mm512_mask_mov_ps(best[h], more, v);
      at[h] = _mm512_mask_mov_epi32(at[h], more, index);
      index = _mm512_add_epi32(index, step);
    }
  }
  for (; i < vocab; i += 16) {  // the last 0 to 31, past vocab read as -inf (never more)
    const __mmask16 live = static_cast<__mmask16>(vocab - i >= 16 ? 0xffff : (1u << (vocab - i)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(lowest, live, x + i);
    const __mmask16 more = _mm512_cmp_ps_mask(v, best[0], _CMP_GT_OQ);
    best[0] = _mm512_mask_mov_ps(best[0], more, v);
    at[0] = _mm512_mask_mov_epi32(at[0], more, index);
    index = _mm512_add_epi32(index, step);
  }
  // Merge the second set into the first: per lane, the larger value, or on a tie the lower index.
  const __mmask16 more = _mm512_cmp_ps_mask(best[1], best[0], _CMP_GT_OQ);
  const __mmask16 tie = _mm512_cmp_ps_mask(best[1], best[0], _CMP_EQ_OQ) &
                        _mm512_cmp_epi32_mask(at[1], at[0], _MM_CMPINT_LT);
  best[0] = _mm512_mask_mov_ps(best[0], more, best[1]);
  at[0] = _mm512_mask_mov_epi32(at[0], more | tie, at[1]);
  const float top = _mm512_reduce_max_ps(best[0]);
  const __mmask16 holders = _mm512_cmp_ps_mask(best[0], _mm512_set1_ps(top), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(holders, at[0]);
}
#pragma GCC pop_options
#endif

}  // namespace

bool greedy_cpu_vectorized() {
#ifdef GPT2FAST_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

int64_t greedy_row_cpu(const float* logits, int64_t vocab) {
#ifdef GPT2FAST_X86
  if (greedy_cpu_vectorized()) return greedy_row_avx512(logits, vocab);
#endif
  return greedy_row_portable(logits, vocab);
}

}  // namespace gpt2fast
