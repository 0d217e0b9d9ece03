// Weight-only quantized matmul on the CPU: y = x @ (w * scale[:, None]).T + bias, x and y fp32, w [N, K]
// int8, bf16 or fp32, one output channel per row.
//
// A decode step has few rows, so it is bound by reading the weights: each weight row is streamed once,
// converted to fp32 in registers, and used for MR rows of x at a time against NR weight rows (MR x NR
// accumulators of one vector each, dot products along K, reduced across lanes once per tile). The scale and
// the bias come after the sum over K, so the weights are never dequantized in memory.
//
// The tiles (quantized_linear_tiles.h) are compiled three times, for AVX-512, for AVX2 + FMA and portably;
// the caller picks one the CPU runs (quantized_linear_cpu_best_isa: the widest, by __builtin_cpu_supports).
#include <algorithm>
#include <cstring>

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
inline float sum_lanes(Vec v) { return v; }
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

void quantized_linear_cpu(const float* x, int64_t M, int64_t K, const void* w, WeightType type,
                          const float* scale, const float* bias, float* y, int64_t N, int64_t n_begin,
                          int64_t n_end, CpuIsa isa) {
#ifdef GPT2FAST_X86
  if (isa == CpuIsa::Avx512) return avx512::run(x, M, K, w, type, scale, bias, y, N, n_begin, n_end);
  if (isa == CpuIsa::Avx2) return avx2::run(x, M, K, w, type, scale, bias, y, N, n_begin, n_end);
#endif
  portable::run(x, M, K, w, type, scale, bias, y, N, n_begin, n_end);
}

}  // namespace gpt2fast
