// Weight-only quantized matmul on the CPU: y = x @ (w * scale[:, None]).T + bias, x and y fp32, w [N, K]
// int8, bf16 or fp32, one output channel per row.
//
// Four forms, by the rows of x and the weights' type (quantized_linear_cpu_form picks):
// - dot (few rows: a decode step at small batch, bound by reading the weights): each weight row is streamed
//   once, converted to fp32 in registers, and used for MR rows of x at a time against NR weight rows (MR x NR
//   accumulators of one vector each, dot products along K, reduced across lanes once per tile).
// - broadcast (from 16 rows, where the multiplies bind): x is transposed once per call, a few weight rows are
//   converted a chunk of K at a time into an L1 buffer, and each weight is broadcast against vectors of rows
//   of x, so each weight is converted once for all the rows and nothing is reduced across lanes.
// - amx-int8 (from 8 rows, int8 weights, on CPUs with Intel's AMX tile unit): the weights read as they are by
//   the int8 tiles, each row of x cut into four 8-bit parts under a power of two (what they leave out is below
//   2^-30 of the row's largest value), the parts' integer products summed exactly and then in fp32.
// - amx-bf16 (from 8 rows, bf16 weights, AMX): x split into three bf16 parts whose sum is x exactly, and the
//   products summed in fp32 by the tile unit.
// The scale and the bias come after the sum over K in all of them, so the weights are never dequantized in memory.
//
// The tiles of the first two (quantized_linear_tiles.h) are compiled three times, for AVX-512, for AVX2 + FMA
// and portably; the caller picks a build the CPU runs (quantized_linear_cpu_best_isa: the widest, by
// __builtin_cpu_supports; "amx" is the AVX-512 build with the two AMX forms).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "gpt2fast.h"

#include "cpu_x86.h"

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

#if defined(GPT2FAST_X86) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define GPT2FAST_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8,avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace amx_bf16 {
// Many rows of x against bf16 weights on Intel's AMX unit: tdpbf16ps multiplies a 16 x 32 tile of bf16 by a
// 32 x 16 one and adds the products to a 16 x 16 tile of fp32 sums (each product of two bf16 is exact in fp32).
// The weights are the left tile (A: 16 weight rows by 32 of K, their own layout), copied into a buffer laid out
// as the tiles read it. x is the right tile (B: pairs of K for 16 rows of x), split into three bf16 parts,
// x = hi + mid + lo exactly (8 bits of its 24-bit mantissa each): three products per tile, summed in fp32,
// give what fp32 multiplies would, in another order, at a fraction of their cost. (Tiny parts below bf16's
// normal range are flushed to zero, as the tile unit does.)
constexpr int kParts = 3;
constexpr int64_t kTile = 16;                  // weight rows per tile (A's, C's rows); rows of x per group
constexpr int64_t kDepth = 32;                 // K per tile: 32 bf16, 64 bytes a row
constexpr int64_t kBlockBytes = kTile * kDepth * 2;  // one tile: 1 KiB

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows of 64 bytes, the one shape both AMX forms use, for this thread.
inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

inline int64_t groups(int64_t M) { return (M + kTile - 1) / kTile; }
inline int64_t chunks(int64_t K) { return (K + kDepth - 1) / kDepth; }
// x packed: for each chunk kc of 32 columns, group g of 16 rows and part p, one tile, at block
// (kc * groups + g) * kParts + p, whose row i holds, for each row m of the group, x[16 g + m][32 kc + 2 i + j]
// for j = 0, 1 (zero past M and K).
inline int64_t packed_bytes(int64_t M, int64_t K) { return chunks(K) * groups(M) * kParts * kBlockBytes; }

// r[i] (16 lanes of 32 bits) becomes column i: a 16 x 16 transpose of 32-bit elements.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// The 16 bf16 of the lower (upper) half of v as fp32.
inline __m512 low_as_float(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
}
inline __m512 high_as_float(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}
// a - b where that is a number, else 0 (what is left of an inf or NaN after its hi part: nothing).
inline __m512 residual(__m512 a, __m512 b) {
  const __m512 r = _mm512_sub_ps(a, b);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);
}

// Chunks [kc_begin, kc_end) of x, packed.
void pack(const float* x, int64_t M, int64_t K, uint8_t* packed, int64_t kc_begin, int64_t kc_end) {
  const int64_t G = groups(M);
  for (int64_t kc = kc_begin; kc < kc_end; ++kc) {
    const int64_t k0 = kc * kDepth, cols = std::min(kDepth, K - k0);
    const __mmask16 lo_mask = static_cast<__mmask16>((1u << std::min<int64_t>(cols, 16)) - 1);
    const __mmask16 hi_mask = static_cast<__mmask16>(cols > 16 ? (1u << (cols - 16)) - 1 : 0);
    for (int64_t g = 0; g < G; ++g) {
      __m512i part[kParts][16];
      for (int64_t m = 0; m < kTile; ++m) {
        const int64_t row = g * kTile + m;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        if (row < M) {
          a = _mm512_maskz_loadu_ps(lo_mask, x + row * K + k0);
          b = _mm512_maskz_loadu_ps(hi_mask, x + row * K + k0 + 16);
        }
        for (int p = 0; p < kParts; ++p) {
          const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a in the lower half
          part[p][m] = v;
          a = residual(a, low_as_float(v));
          b = residual(b, high_as_float(v));
        }
      }
      for (int p = 0; p < kParts; ++p) {
        transpose16(part[p]);  // row i: the pairs (2i, 2i + 1) of every row
        uint8_t* block = packed + ((kc * G + g) * kParts + p) * kBlockBytes;
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(block + i * 64, part[p][i]);
      }
    }
  }
}

// The bf16 weights of one chunk of K for two tiles of weight rows, as the tiles read them: dst[r][k] =
// w[r][32 kc + k] for r_begin <= r < r_end (rows past `rows` zero), k < 32 (columns past K zero).
inline void stage_chunk(const uint16_t* w, int64_t K, int64_t rows, int64_t kc, uint16_t* dst, int64_t r_begin = 0,
                        int64_t r_end = 2 * kTile) {
  const int64_t k0 = kc * kDepth, n = std::min(K - k0, kDepth);
  const __mmask32 mask = n == kDepth ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1);
  for (int64_t r = r_begin; r < r_end; ++r) {
    __m512i v = _mm512_setzero_si512();
    if (r < rows) {
      const uint16_t* src = w + r * K + k0;
      __builtin_prefetch(reinterpret_cast<const char*>(src) + kPrefetch);
      v = _mm512_maskz_loadu_epi16(mask, src);
    }
    _mm512_store_si512(dst + r * kDepth, v);
  }
}

// One group's sums, the tile c [16 weight rows][16 rows of x], to y.
inline void write(const float* c, int64_t m0, int64_t rows, int64_t n0, int64_t cols, const float* scale,
                  const float* bias, float* y, int64_t N) {
  if (rows <= 0 || cols <= 0) return;
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + i * 16);
  transpose16(r);  // r[m]: row m of x's sums over the 16 weight rows
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  const __m512 s = scale ? _mm512_maskz_loadu_ps(mask, scale + n0) : _mm512_set1_ps(1.f);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m)
    _mm512_mask_storeu_ps(y + (m0 + m) * N + n0, mask, _mm512_fmadd_ps(_mm512_castsi512_ps(r[m]), s, b));
}

// Two tiles of weight rows (n0 and n0 + 16, in tmm4 and tmm5) against two groups of rows of x (g0 and g0 + 1,
// their parts in tmm6 and tmm7; the second group only with TwoGroups): sums in tmm0 (n0, g0), tmm1 (n0 + 16, g0),
// tmm2 (n0, g0 + 1) and tmm3 (n0 + 16, g0 + 1). Consecutive products go to different sums, so none waits for
// the one before (a product's latency is several times its issue rate).
// a: the staged weights (2 KiB a chunk of K), x: x's packed blocks of chunk 0, group g0. With a next pair of
// weight tiles to stage (next_w not null), each chunk of theirs is staged between the products, which run on
// the tile unit meanwhile.
template <bool TwoGroups>
inline void tile_pair(const uint16_t* a, const uint8_t* x, int64_t x_stride, int64_t chunks, const uint16_t* next_w,
                      int64_t K, int64_t next_rows, uint16_t* next_a) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (TwoGroups) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kc = 0; kc < chunks; ++kc) {
    _tile_loadd(4, a + kc * 2 * kTile * kDepth, 64);
    _tile_loadd(5, a + (kc * 2 + 1) * kTile * kDepth, 64);
    const uint8_t* b = x + kc * x_stride;
    for (int p = 0; p < kParts; ++p) {
      _tile_loadd(6, b + p * kBlockBytes, 64);
      if constexpr (TwoGroups) _tile_loadd(7, b + (kParts + p) * kBlockBytes, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      if constexpr (TwoGroups) {
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
      // A third of the next pair's chunk after each part's products, so that the conversions are spread
      // among the tile instructions.
      if (next_w)
        stage_chunk(next_w, K, next_rows, kc, next_a + kc * 2 * kTile * kDepth, p * 2 * kTile / kParts,
                    (p + 1) * 2 * kTile / kParts);
    }
  }
}

void run(const uint8_t* packed, int64_t M, int64_t K, const uint16_t* w, const float* scale, const float* bias,
         float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  if (n_begin >= n_end) return;
  configure_tiles();
  const int64_t G = groups(M), KC = chunks(K), x_stride = G * kParts * kBlockBytes;
  // Two buffers of staged weights, 32 rows each (K = 3072: 192 KiB each): the tiles read one while the next
  // pair's weights are staged into the other.
  const int64_t pair_elems = KC * 2 * kTile * kDepth;
  std::unique_ptr<uint16_t[]> storage(new uint16_t[2 * pair_elems + 32]);
  uint16_t* buffers[2];
  buffers[0] = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(storage.get()) + 63) & ~uintptr_t{63});
  buffers[1] = buffers[0] + pair_elems;
  for (int64_t kc = 0; kc < KC; ++kc)
    stage_chunk(w + n_begin * K, K, std::min(2 * kTile, n_end - n_begin), kc, buffers[0] + kc * 2 * kTile * kDepth);
  alignas(64) float sums[4][kTile * kTile];
  int current = 0;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 2 * kTile, current ^= 1) {
    const int64_t rows = std::min(2 * kTile, n_end - n0);
    const int64_t next_n0 = n0 + 2 * kTile, next_rows = std::min(2 * kTile, n_end - next_n0);
    for (int64_t g0 = 0; g0 < G; g0 += 2) {
      const bool two = g0 + 1 < G;
      // The next pair is staged during the first pass over the rows of x.
      const uint16_t* next_w = g0 == 0 && next_n0 < n_end ? w + next_n0 * K : nullptr;
      const uint8_t* x = packed + g0 * kParts * kBlockBytes;
      if (two) {
        tile_pair<true>(buffers[current], x, x_stride, KC, next_w, K, next_rows, buffers[current ^ 1]);
        _tile_stored(2, sums[2], 64);
        _tile_stored(3, sums[3], 64);
      } else {
        tile_pair<false>(buffers[current], x, x_stride, KC, next_w, K, next_rows, buffers[current ^ 1]);
      }
      _tile_stored(0, sums[0], 64);
      _tile_stored(1, sums[1], 64);
      for (int g = 0; g < (two ? 2 : 1); ++g) {
        const int64_t m0 = (g0 + g) * kTile, m_rows = std::min(kTile, M - m0);
        write(sums[2 * g], m0, m_rows, n0, std::min(kTile, rows), scale, bias, y, N);
        write(sums[2 * g + 1], m0, m_rows, n0 + kTile, rows - kTile, scale, bias, y, N);
      }
    }
  }
  _tile_release();
}

// From how many rows the bf16 tiles pay: against the AVX-512 forms on all of a gpt2 decode step's matmuls with
// bf16 weights from DRAM (a 2-core Xeon with AMX, interleaved rounds), 1.10x at 8 rows, 1.24x at 12, 1.53x at
// 16. (With int8 weights, before they had their own tiles: 0.31x at 1 row, 0.79x at 6, 1.08x at 8.)
constexpr int64_t kMinRows = 8;
}  // namespace amx_bf16

namespace amx_int8 {
using amx_bf16::configure_tiles;
using amx_bf16::transpose16;
// Many rows of x against int8 weights on AMX's int8 unit: tdpbssd / tdpbsud multiply a 16 x 64 tile of int8
// by a 64 x 16 one and add the products, exactly, to a 16 x 16 tile of int32 sums. The weights are the left
// tile (A), read straight from w (16 rows of 64 bytes, K apart): nothing to widen or stage. x is the right
// tile (B): each row of x, divided by a power of two 2^e (max |x| / 2^e in [64, 128)), is cut into four
// parts of 8 bits, x / 2^e = p0 + p1 / 2^8 + p2 / 2^16 + p3 / 2^24 with p0 = floor(x / 2^e) signed in
// [-128, 127] and p1..p3 unsigned in [0, 255], each step exact in fp32. What the parts leave out is below
// max |x| 2^-30, far under fp32's own rounding of the row's largest value, so the four exact integer
// products, each converted to fp32 and summed, give fp32's result. A row holding inf or NaN cannot be cut
// so: it is left to the dot form (quantized_linear_cpu), which gives fp32's inf and NaN.
constexpr int kParts = 4;
constexpr int64_t kTile = 16;   // weight rows per tile (A's, C's rows); rows of x per group
constexpr int64_t kDepth = 64;  // K per tile: 64 int8, one cache line a row
constexpr int64_t kBlockBytes = kTile * kDepth;  // one tile: 1 KiB
constexpr int32_t kNotFinite = std::numeric_limits<int32_t>::min();  // a row's exponent: it holds inf or NaN

inline int64_t groups(int64_t M) { return (M + kTile - 1) / kTile; }
inline int64_t chunks(int64_t K) { return (K + kDepth - 1) / kDepth; }
// x packed: first each row's exponent e (int32, groups(M) * 16 of them, kNotFinite for a row with inf or NaN),
// then for each chunk kc of 64 columns, group g of 16 rows and part p, one tile, at block
// (kc * groups + g) * kParts + p, whose row i holds, for each row m of the group, part p of
// x[16 g + m][64 kc + 4 i + j] for j = 0..3 (zero past M and K).
inline int64_t header_bytes(int64_t M) { return groups(M) * kTile * 4; }
inline int64_t packed_bytes(int64_t M, int64_t K) {
  return header_bytes(M) + chunks(K) * groups(M) * kParts * kBlockBytes;
}

// Rows [m_begin, m_end) of x: their exponents.
void pack_rows(const float* x, int64_t K, uint8_t* packed, int64_t m_begin, int64_t m_end) {
  int32_t* exponents = reinterpret_cast<int32_t*>(packed);
  for (int64_t m = m_begin; m < m_end; ++m) {
    __m512 amax = _mm512_setzero_ps();
    bool finite = true;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = static_cast<__mmask16>(K - k >= 16 ? 0xffff : (1u << (K - k)) - 1);
      const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, x + m * K + k));
      // Not below inf: inf, or NaN (unordered).
      finite &= _mm512_cmp_ps_mask(v, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_NLT_UQ) == 0;
      amax = _mm512_max_ps(amax, v);
    }
    int e = 0;
    const float top = _mm512_reduce_max_ps(amax);
    if (top > 0.f) std::frexp(top, &e);  // top = f 2^e, f in [0.5, 1)
    exponents[m] = finite ? e - 7 : kNotFinite;
  }
}

// Chunks [kc_begin, kc_end) of x, packed (after pack_rows for all its rows).
void pack(const float* x, int64_t M, int64_t K, uint8_t* packed, int64_t kc_begin, int64_t kc_end) {
  const int64_t G = groups(M);
  const int32_t* exponents = reinterpret_cast<const int32_t*>(packed);
  uint8_t* blocks = packed + header_bytes(M);
  for (int64_t kc = kc_begin; kc < kc_end; ++kc) {
    const int64_t k0 = kc * kDepth, cols = std::min(kDepth, K - k0);
    __mmask16 masks[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t n = std::clamp<int64_t>(cols - 16 * v, 0, 16);
      masks[v] = static_cast<__mmask16>((1u << n) - 1);
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512i part[kParts][16];
      for (int64_t m = 0; m < kTile; ++m) {
        const int64_t row = g * kTile + m;
        __m512 v[4];
        const bool live = row < M && exponents[row] != kNotFinite;
        const __m512 down = _mm512_set1_ps(live ? -static_cast<float>(exponents[row]) : 0.f);
        for (int i = 0; i < 4; ++i)
          v[i] = live ? _mm512_scalef_ps(_mm512_maskz_loadu_ps(masks[i], x + row * K + k0 + 16 * i), down)
                      : _mm512_setzero_ps();
        for (int p = 0; p < kParts; ++p) {
          __m512i bytes = _mm512_setzero_si512();
          for (int i = 0; i < 4; ++i) {
            const __m512 whole = _mm512_roundscale_ps(v[i], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            bytes = _mm512_inserti32x4(bytes, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(whole)), i);
            v[i] = _mm512_mul_ps(_mm512_sub_ps(v[i], whole), _mm512_set1_ps(256.f));  // in [0, 256): exact
          }
          part[p][m] = bytes;
        }
      }
      for (int p = 0; p < kParts; ++p) {
        transpose16(part[p]);  // row i: the 4 columns 4i..4i+3 of every row
        uint8_t* block = blocks + ((kc * G + g) * kParts + p) * kBlockBytes;
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(block + i * 64, part[p][i]);
      }
    }
  }
}

// Two tiles of weight rows (a[0], a[1], `stride` bytes a row; a[1] only with Two) against parts `first` and
// first + 1 of one group of x's rows (b: the packed blocks of chunk 0, group g, part `first`; part 0 signed, the
// others unsigned): sums in tmm0 (a[0], part first), tmm1 (a[1], first), tmm2 (a[0], first + 1), tmm3 (a[1],
// first + 1). (Asking for the next weights ahead, in any order or to any cache level, ran no faster: the
// weights come from DRAM while the tiles run.)
template <bool Signed, bool Two>
inline void tile_pass(const int8_t* const a[2], const int64_t stride[2], const uint8_t* b, int64_t x_stride,
                      int64_t chunks) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kc = 0; kc < chunks; ++kc) {
    _tile_loadd(4, a[0] + kc * kDepth, stride[0]);
    if constexpr (Two) _tile_loadd(5, a[1] + kc * kDepth, stride[1]);
    _tile_loadd(6, b + kc * x_stride, 64);
    _tile_loadd(7, b + kc * x_stride + kBlockBytes, 64);
    if constexpr (Signed) {
      _tile_dpbssd(0, 4, 6);
      if constexpr (Two) _tile_dpbssd(1, 5, 6);
    } else {
      _tile_dpbsud(0, 4, 6);
      if constexpr (Two) _tile_dpbsud(1, 5, 6);
    }
    _tile_dpbsud(2, 4, 7);
    if constexpr (Two) _tile_dpbsud(3, 5, 7);
  }
}

// One weight tile's sums (c[p]: [16 weight rows][16 rows of x], part p) for one group of x, to y.
inline void write(const int32_t* const c[kParts], const int32_t* exponents, int64_t m0, int64_t rows, int64_t n0,
                  int64_t cols, const float* scale, const float* bias, float* y, int64_t N) {
  if (rows <= 0 || cols <= 0) return;
  const __mmask16 m_mask = static_cast<__mmask16>(rows >= 16 ? 0xffff : (1u << rows) - 1);
  const __m512i e = _mm512_maskz_loadu_epi32(m_mask, exponents + m0);
  const __m512 up = _mm512_cvtepi32_ps(_mm512_mask_blend_epi32(
      _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(kNotFinite)), e, _mm512_setzero_si512()));
  const __m512 step = _mm512_set1_ps(1.f / 256.f);
  alignas(64) float sums[kTile * kTile];
  for (int i = 0; i < 16; ++i) {  // weight row i: its sums for the 16 rows of x
    __m512 t = _mm512_cvtepi32_ps(_mm512_load_si512(c[3] + i * 16));
    for (int p = kParts - 2; p >= 0; --p)
      t = _mm512_fmadd_ps(t, step, _mm512_cvtepi32_ps(_mm512_load_si512(c[p] + i * 16)));
    _mm512_store_ps(sums + i * 16, _mm512_scalef_ps(t, up));
  }
  amx_bf16::write(sums, m0, rows, n0, cols, scale, bias, y, N);  // as fp32 sums now: scale, bias, out
}

void run(const uint8_t* packed, int64_t M, int64_t K, const int8_t* w, const float* scale, const float* bias,
         float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  if (n_begin >= n_end) return;
  configure_tiles();
  const int64_t G = groups(M), KC = chunks(K), x_stride = G * kParts * kBlockBytes;
  const int32_t* exponents = reinterpret_cast<const int32_t*>(packed);
  const uint8_t* blocks = packed + header_bytes(M);
  // A tile with fewer than 16 weight rows, or any tile where K is not a multiple of 64, is copied (zero-padded)
  // into `edge` first, so that no tile reads past w.
  const bool direct = K % kDepth == 0;
  std::unique_ptr<int8_t[]> edge;
  alignas(64) int32_t sums[2][kParts][kTile * kTile];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 2 * kTile) {
    const int64_t rows = std::min(2 * kTile, n_end - n0);
    const int8_t* a[2];
    int64_t stride[2];
    for (int t = 0; t < 2; ++t) {
      const int64_t t_rows = std::clamp<int64_t>(rows - t * kTile, 0, kTile);
      if (direct && t_rows == kTile) {
        a[t] = w + (n0 + t * kTile) * K, stride[t] = K;
        continue;
      }
      if (t_rows == 0) {  // no second tile
        a[t] = a[0], stride[t] = stride[0];
        continue;
      }
      if (!edge) edge.reset(new int8_t[2 * kTile * KC * kDepth]);
      int8_t* dst = edge.get() + t * kTile * KC * kDepth;
      std::memset(dst, 0, kTile * KC * kDepth);
      for (int64_t r = 0; r < t_rows; ++r) std::memcpy(dst + r * KC * kDepth, w + (n0 + t * kTile + r) * K, K);
      a[t] = dst, stride[t] = KC * kDepth;
    }
    const bool two = rows > kTile;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = blocks + g * kParts * kBlockBytes;
      for (int first = 0; first < kParts; first += 2) {
        if (first == 0) {
          if (two) tile_pass<true, true>(a, stride, b, x_stride, KC);
          else tile_pass<true, false>(a, stride, b, x_stride, KC);
        } else {
          if (two) tile_pass<false, true>(a, stride, b + first * kBlockBytes, x_stride, KC);
          else tile_pass<false, false>(a, stride, b + first * kBlockBytes, x_stride, KC);
        }
        _tile_stored(0, sums[0][first], 64);
        _tile_stored(2, sums[0][first + 1], 64);
        if (two) {
          _tile_stored(1, sums[1][first], 64);
          _tile_stored(3, sums[1][first + 1], 64);
        }
      }
      const int64_t m0 = g * kTile, m_rows = std::min(kTile, M - m0);
      for (int t = 0; t < (two ? 2 : 1); ++t) {
        const int32_t* c[kParts] = {sums[t][0], sums[t][1], sums[t][2], sums[t][3]};
        write(c, exponents, m0, m_rows, n0 + t * kTile, std::min(kTile, rows - t * kTile), scale, bias, y, N);
      }
    }
  }
  _tile_release();
}

// From how many rows the int8 tiles pay: against the AVX-512 dot form on all of a gpt2 decode step's matmuls
// (2-core Xeon with AMX, weights from DRAM, interleaved rounds), 1.07x at 8 rows, 1.03x at 7 and 0.81x at 6
// while the tile unit ran slow (a tile product about 17 ns); 1.33x at 8 and 1.04x at 4 while it ran fast
// (about 7 ns). The dot form is at the read bound below that.
constexpr int64_t kMinRows = 8;
}  // namespace amx_int8
#pragma GCC pop_options

// AMX needs the CPU's tile unit (with bf16, and AVX-512 BF16 to split x) and Linux's leave to use its state,
// asked once per process (Linux 5.16 and later; elsewhere the kernel keeps to its AVX-512 forms).
bool amx_usable() {
#ifdef __linux__
  static const bool usable = [] {
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
    if (a < 7) return false;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1, int8 = (d >> 25) & 1;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
    const bool avx512_bf16 = (a >> 5) & 1;
    if (!(tile && bf16 && int8 && avx512_bf16)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}
#endif

}  // namespace

CpuIsa quantized_linear_cpu_best_isa() {
#ifdef GPT2FAST_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
#ifdef GPT2FAST_AMX
    if (amx_usable()) return CpuIsa::Amx;
#endif
    return CpuIsa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::Avx2;
#endif
  return CpuIsa::Portable;
}

namespace {

// The row stride of x transposed, for the broadcast form (0: the dot form).
int64_t xt_stride(int64_t M, CpuIsa isa) {
#ifdef GPT2FAST_X86
  if (isa == CpuIsa::Avx512 || isa == CpuIsa::Amx) return avx512::xt_stride(M);
  if (isa == CpuIsa::Avx2) return avx2::xt_stride(M);
#endif
  return portable::xt_stride(M);
}

// xt[k, m] = x[m, k] for m < M and k_begin <= k < k_end, and 0 for M <= m < ldx.
void transpose(const float* x, int64_t M, int64_t K, float* xt, int64_t ldx, int64_t k_begin, int64_t k_end) {
  constexpr int64_t kBlock = 64;  // 64 columns of x at a time: the block of xt written is at most 16 KiB
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlock) {
    const int64_t k1 = std::min(k0 + kBlock, k_end);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = k0; k < k1; ++k) xt[k * ldx + m] = x[m * K + k];
    for (int64_t k = k0; k < k1; ++k) std::fill(xt + k * ldx + M, xt + (k + 1) * ldx, 0.f);
  }
}

}  // namespace

QuantizedForm quantized_linear_cpu_form(int64_t M, WeightType type, CpuIsa isa) {
#ifdef GPT2FAST_AMX
  if (isa == CpuIsa::Amx && type == WeightType::Int8 && M >= amx_int8::kMinRows) return QuantizedForm::AmxInt8;
  if (isa == CpuIsa::Amx && type == WeightType::BFloat16 && M >= amx_bf16::kMinRows) return QuantizedForm::AmxBf16;
#endif
  (void)type;
  return xt_stride(M, isa) > 0 ? QuantizedForm::Broadcast : QuantizedForm::Dot;
}

int64_t quantized_linear_cpu_packed_bytes(int64_t M, int64_t K, QuantizedForm form, CpuIsa isa) {
#ifdef GPT2FAST_AMX
  if (form == QuantizedForm::AmxBf16) return amx_bf16::packed_bytes(M, K);
  if (form == QuantizedForm::AmxInt8) return amx_int8::packed_bytes(M, K);
#endif
  if (form == QuantizedForm::Broadcast) return K * xt_stride(M, isa) * static_cast<int64_t>(sizeof(float));
  return 0;
}

void quantized_linear_cpu_pack(const float* x, int64_t M, int64_t K, void* packed, int64_t block_begin,
                               int64_t block_end, QuantizedForm form, CpuIsa isa) {
  constexpr int64_t kColumns = 32;  // a block: the tile form's chunk of K
#ifdef GPT2FAST_AMX
  static_assert(amx_bf16::kDepth == kColumns, "a block of columns is one chunk of the tiles' K");
  if (form == QuantizedForm::AmxBf16) return amx_bf16::pack(x, M, K, static_cast<uint8_t*>(packed), block_begin, block_end);
  if (form == QuantizedForm::AmxInt8)  // its chunks are two blocks: each range takes the chunks that start in it
    return amx_int8::pack(x, M, K, static_cast<uint8_t*>(packed), (block_begin + 1) / 2, (block_end + 1) / 2);
#endif
  if (form == QuantizedForm::Broadcast)
    transpose(x, M, K, static_cast<float*>(packed), xt_stride(M, isa), block_begin * kColumns,
              std::min(K, block_end * kColumns));
}

void quantized_linear_cpu_pack_rows(const float* x, int64_t M, int64_t K, void* packed, int64_t row_begin,
                                    int64_t row_end, QuantizedForm form, CpuIsa isa) {
  (void)M, (void)isa;
#ifdef GPT2FAST_AMX
  if (form == QuantizedForm::AmxInt8) amx_int8::pack_rows(x, K, static_cast<uint8_t*>(packed), row_begin, row_end);
#else
  (void)x, (void)K, (void)packed, (void)row_begin, (void)row_end, (void)form;
#endif
}

void quantized_linear_cpu(const float* x, const void* packed, int64_t M, int64_t K, const void* w, WeightType type,
                          const float* scale, const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end,
                          QuantizedForm form, CpuIsa isa) {
#ifdef GPT2FAST_AMX
  if (form == QuantizedForm::AmxBf16)
    return amx_bf16::run(static_cast<const uint8_t*>(packed), M, K, static_cast<const uint16_t*>(w), scale, bias, y, N,
                         n_begin, n_end);
  if (form == QuantizedForm::AmxInt8) {
    amx_int8::run(static_cast<const uint8_t*>(packed), M, K, static_cast<const int8_t*>(w), scale, bias, y, N, n_begin,
                  n_end);
    const int32_t* exponents = static_cast<const int32_t*>(packed);
    for (int64_t m = 0; m < M; ++m)  // rows with inf or NaN: fp32's result, from the dot form
      if (exponents[m] == amx_int8::kNotFinite)
        avx512::run(x + m * K, nullptr, 0, 1, K, w, type, scale, bias, y + m * N, N, n_begin, n_end);
    return;
  }
#endif
  const float* xt = form == QuantizedForm::Broadcast ? static_cast<const float*>(packed) : nullptr;
  const int64_t ldx = xt ? xt_stride(M, isa) : 0;
#ifdef GPT2FAST_X86
  if (isa == CpuIsa::Avx512 || isa == CpuIsa::Amx)
    return avx512::run(x, xt, ldx, M, K, w, type, scale, bias, y, N, n_begin, n_end);
  if (isa == CpuIsa::Avx2) return avx2::run(x, xt, ldx, M, K, w, type, scale, bias, y, N, n_begin, n_end);
#endif
  portable::run(x, xt, ldx, M, K, w, type, scale, bias, y, N, n_begin, n_end);
}

}  // namespace gpt2fast
