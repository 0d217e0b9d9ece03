// Decode attention on the CPU: the Tq newest queries of each sequence against its KV cache, fp32, each
// (sequence, head) a task: its new keys and values appended to the cache, then for each query the scores
// against every key up to its position, their softmax, and the weighted sum of the values. The cache is read
// only up to each sequence's length, once per query, row by row (a decode step at batch 64 reads a few MB
// of cache per layer: the bound is reading it).
//
// Two builds: AVX-512 (head dims that are whole vectors of 16 lanes, up to 8; exp by a polynomial) and portable
// (std::exp), picked at run time by __builtin_cpu_supports.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gpt2fast.h"

#include "cpu_x86.h"

namespace gpt2fast {
namespace {

struct Args {
  const float* q;
  DecodeStrides qs;
  float* k;
  DecodeStrides ks;
  float* v;
  DecodeStrides vs;
  const float* k_new;
  DecodeStrides kns;
  const float* v_new;
  DecodeStrides vns;
  const int64_t* lengths;
  float* out;  // [B, H, Tq, D] dense
  int64_t heads, queries, head_dim;
};

inline const float* row(const float* base, const DecodeStrides& s, int64_t b, int64_t h, int64_t t) {
  return base + b * s.batch + h * s.head + t * s.token;
}
inline float* row(float* base, const DecodeStrides& s, int64_t b, int64_t h, int64_t t) {
  return base + b * s.batch + h * s.head + t * s.token;
}

// The new tokens' keys and values into the cache, at positions length - Tq .. length - 1.
void append(const Args& a, int64_t b, int64_t h, int64_t length) {
  if (a.k_new == nullptr) return;
  for (int64_t i = 0; i < a.queries; ++i) {
    const int64_t t = length - a.queries + i;
    std::memcpy(row(a.k, a.ks, b, h, t), row(a.k_new, a.kns, b, h, i), a.head_dim * sizeof(float));
    std::memcpy(row(a.v, a.vs, b, h, t), row(a.v_new, a.vns, b, h, i), a.head_dim * sizeof(float));
  }
}

namespace portable {
void attend(const Args& a, int64_t b, int64_t h, int64_t length, float* scores) {
  const int64_t D = a.head_dim;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::vector<float> acc(D);
  for (int64_t i = 0; i < a.queries; ++i) {
    const int64_t n = length - a.queries + i + 1;  // the keys query i sees
    const float* q = row(a.q, a.qs, b, h, i);
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const float* k = row(a.k, a.ks, b, h, j);
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
      scores[j] = s * scale;
      max = std::max(max, scores[j]);
    }
    float sum = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float p = std::exp(scores[j] - max);
      sum += p;
      const float* v = row(a.v, a.vs, b, h, j);
      for (int64_t d = 0; d < D; ++d) acc[d] += p * v[d];
    }
    float* out = a.out + ((b * a.heads + h) * a.queries + i) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = acc[d] / sum;
  }
}
}  // namespace portable

#ifdef GPT2FAST_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
namespace avx512 {
#include "cpu_exp.h"  // e^x

// A head dim of V vectors of 16 lanes (the portable build takes the others).
template <int V>
void attend(const Args& a, int64_t b, int64_t h, int64_t length, float* scores) {
  const float scale = 1.f / std::sqrt(static_cast<float>(V * 16));
  for (int64_t i = 0; i < a.queries; ++i) {
    const int64_t n = length - a.queries + i + 1;
    const float* qp = row(a.q, a.qs, b, h, i);
    __m512 q[V];
    for (int c = 0; c < V; ++c) q[c] = _mm512_mul_ps(_mm512_loadu_ps(qp + 16 * c), _mm512_set1_ps(scale));
    __m512 max16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; ++j) {
      const float* k = row(a.k, a.ks, b, h, j);
      __m512 s = _mm512_mul_ps(q[0], _mm512_loadu_ps(k));
      for (int c = 1; c < V; ++c) s = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(k + 16 * c), s);
      scores[j] = _mm512_reduce_add_ps(s);
    }
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) max16 = _mm512_max_ps(max16, _mm512_loadu_ps(scores + j));
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
    max16 = _mm512_mask_max_ps(max16, tail, max16, _mm512_maskz_loadu_ps(tail, scores + j));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(max16));
    __m512 sum16 = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
      const __m512 p = exp(_mm512_sub_ps(_mm512_loadu_ps(scores + j), max));
      _mm512_storeu_ps(scores + j, p);
      sum16 = _mm512_add_ps(sum16, p);
    }
    if (j < n) {
      const __m512 p = _mm512_maskz_mov_ps(tail, exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + j), max)));
      _mm512_mask_storeu_ps(scores + j, tail, p);
      sum16 = _mm512_add_ps(sum16, p);
    }
    __m512 acc[V];
    for (int c = 0; c < V; ++c) acc[c] = _mm512_setzero_ps();
    for (j = 0; j < n; ++j) {
      const float* v = row(a.v, a.vs, b, h, j);
      const __m512 p = _mm512_set1_ps(scores[j]);
      for (int c = 0; c < V; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16 * c), acc[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum16));
    float* out = a.out + ((b * a.heads + h) * a.queries + i) * (V * 16);
    for (int c = 0; c < V; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
  }
}
}  // namespace avx512
#pragma GCC pop_options
#endif

}  // namespace

bool decode_attention_cpu_vectorized() {
#ifdef GPT2FAST_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

void decode_attention_cpu(const float* q, DecodeStrides q_strides, float* k_cache, DecodeStrides k_strides,
                          float* v_cache, DecodeStrides v_strides, const float* k_new, DecodeStrides k_new_strides,
                          const float* v_new, DecodeStrides v_new_strides, const int64_t* lengths, float* out,
                          int64_t heads, int64_t queries, int64_t cache_len, int64_t head_dim, int64_t task_begin,
                          int64_t task_end) {
  const Args a{q, q_strides, k_cache, k_strides, v_cache, v_strides, k_new, k_new_strides, v_new, v_new_strides,
               lengths, out, heads, queries, head_dim};
  std::vector<float> scores(cache_len + 16);
  const bool vectorized = decode_attention_cpu_vectorized();
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / heads, h = task % heads, length = lengths[b];
    append(a, b, h, length);
#ifdef GPT2FAST_X86
    if (vectorized && head_dim % 16 == 0) {
      switch (head_dim / 16) {  // vectors of 16 lanes
        case 1: avx512::attend<1>(a, b, h, length, scores.data()); continue;
        case 2: avx512::attend<2>(a, b, h, length, scores.data()); continue;
        case 3: avx512::attend<3>(a, b, h, length, scores.data()); continue;
        case 4: avx512::attend<4>(a, b, h, length, scores.data()); continue;
        case 5: avx512::attend<5>(a, b, h, length, scores.data()); continue;
        case 6: avx512::attend<6>(a, b, h, length, scores.data()); continue;
        case 7: avx512::attend<7>(a, b, h, length, scores.data()); continue;
        case 8: avx512::attend<8>(a, b, h, length, scores.data()); continue;
        default: break;
      }
    }
#endif
    (void)vectorized;
    portable::attend(a, b, h, length, scores.data());
  }
}

}  // namespace gpt2fast
