// Weight-only quantized matmul on the CPU: y = x @ (w * scale[:, None]).T + bias, x and y fp32, w [N, K]
// int8, bf16 or fp32, one output channel per row.
//
// Two forms, by the rows of x (the tiles' xt_stride picks):
// - dot (few rows: a decode step at small batch, bound by reading the weights): each weight row is streamed
//   once, converted to fp32 in registers, and used for MR rows of x at a time against NR weight rows (MR x NR
//   accumulators of one vector each, dot products along K, reduced across lanes once per tile).
// - broadcast (from 16 rows, where the multiplies bind): x is transposed once per call, a few weight rows are
//   converted a chunk of K at a time into an L1 buffer, and each weight is broadcast against vectors of rows
//   of x, so each weight is converted once for all the rows and nothing is reduced across lanes.
// The scale and the bias come after the sum over K in both, so the weights are never dequantized in memory.
//
// The tiles (quantized_linear_tiles.h) are compiled three times, for AVX-512, for AVX2 + FMA and portably;
// the caller picks one the CPU runs (quantized_linear_cpu_best_isa: the widest, by __builtin_cpu_supports).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "gpt2fast.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define GPT2FAST_X86 1
#include <immintrin.h>
// GCC 12's AVX-512 intrinsics trip its own uninitialized-use warning (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace gpt2fast {
namespace {

// How far ahead along a weight row to ask for the memory: a decode step's weights come from DRAM, and a core's
// own prefetchers fetch too little ahead for the slow pace of one int8 row (a 154 MB int8 weight at one row
// of x: 6.7 GB/s without, 15.9 GB/s with 4 KiB ahead, the rate of torch's sum on the same 2-core Xeon).
constexpr int64_t kPrefetch = 4096;

inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return v; }
inline float to_float(uint16_t v) {  // bf16: the high half of an fp32
  const uint32_t bits = uint32_t{v} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace portable {
using Vec = float;
constexpr int kLanes = 1, MR = 2, NR = 4;
inline Vec zero() { return 0.f; }
inline Vec fma(Vec a, Vec b, Vec acc) { return acc + a * b; }
template <typename T>
inline Vec load(const T* p) { return to_float(*p); }
inline void store(float* p, Vec v) { *p = v; }
inline Vec broadcast(const float* p) { return *p; }
inline float sum_lanes(Vec v) { return v; }
// The dot-product form only: one lane gains nothing from the other.
constexpr int64_t kBroadcastMinRows = std::numeric_limits<int64_t>::max();
constexpr int kBroadcastMaxVectors = 1;
constexpr int kBroadcastChannels[] = {0, 0};
#include "quantized_linear_tiles.h"
}  // namespace portable

#ifdef GPT2FAST_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using Vec = __m256;
// 2 x 4 accumulators, 4 weight vectors and one of x: 13 of AVX2's 16 registers.
constexpr int kLanes = 8, MR = 2, NR = 4;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec fma(Vec a, Vec b, Vec acc) { return _mm256_fmadd_ps(a, b, acc); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const uint16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
// Many rows: 16 at a time (2 vectors) against 6 weight rows: 12 accumulators (one vector, 8 rows, is below
// the 16 rows the form starts at).
constexpr int64_t kBroadcastMinRows = 16;
constexpr int kBroadcastMaxVectors = 2;
constexpr int kBroadcastChannels[] = {0, 0, 6};
inline float sum_lanes(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#include "quantized_linear_tiles.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
using Vec = __m512;
// 6 x 4 accumulators, 4 weight vectors and one of x: 29 of AVX-512's 32 registers.
constexpr int kLanes = 16, MR = 6, NR = 4;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec fma(Vec a, Vec b, Vec acc) { return _mm512_fmadd_ps(a, b, acc); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const uint16_t* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
// Many rows: up to 64 at a time (4 vectors), against 24 / V weight rows: 24 accumulators.
constexpr int64_t kBroadcastMinRows = 16;
constexpr int kBroadcastMaxVectors = 4;
constexpr int kBroadcastChannels[] = {0, 24, 12, 8, 6};
inline float sum_lanes(Vec v) { return _mm512_reduce_add_ps(v); }
#include "quantized_linear_tiles.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

}  // namespace

CpuIsa quantized_linear_cpu_best_isa() {
#ifdef GPT2FAST_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return CpuIsa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::Avx2;
#endif
  return CpuIsa::Portable;
}

void quantized_linear_cpu_transpose(const float* x, int64_t M, int64_t K, float* xt, int64_t ldx, int64_t k_begin,
                                    int64_t k_end) {
  constexpr int64_t kBlock = 64;  // 64 columns of x at a time: the block of xt written is at most 16 KiB
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlock) {
    const int64_t k1 = std::min(k0 + kBlock, k_end);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = k0; k < k1; ++k) xt[k * ldx + m] = x[m * K + k];
    for (int64_t k = k0; k < k1; ++k) std::fill(xt + k * ldx + M, xt + (k + 1) * ldx, 0.f);
  }
}

int64_t quantized_linear_cpu_xt_stride(int64_t M, CpuIsa isa) {
#ifdef GPT2FAST_X86
  if (isa == CpuIsa::Avx512) return avx512::xt_stride(M);
  if (isa == CpuIsa::Avx2) return avx2::xt_stride(M);
#endif
  return portable::xt_stride(M);
}

void quantized_linear_cpu(const float* x, const float* xt, int64_t ldx, int64_t M, int64_t K, const void* w,
                          WeightType type, const float* scale, const float* bias, float* y, int64_t N,
                          int64_t n_begin, int64_t n_end, CpuIsa isa) {
#ifdef GPT2FAST_X86
  if (isa == CpuIsa::Avx512) return avx512::run(x, xt, ldx, M, K, w, type, scale, bias, y, N, n_begin, n_end);
  if (isa == CpuIsa::Avx2) return avx2::run(x, xt, ldx, M, K, w, type, scale, bias, y, N, n_begin, n_end);
#endif
  portable::run(x, xt, ldx, M, K, w, type, scale, bias, y, N, n_begin, n_end);
}

}  // namespace gpt2fast
