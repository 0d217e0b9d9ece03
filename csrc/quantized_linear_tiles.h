// The tiles of quantized_linear_cpu.cpp, written once over a vector type: included once per instruction set,
// inside a namespace that defines Vec, kLanes, MR, NR, zero(), fma(a, b, acc), load(p) for float, int8 and bf16
// (uint16_t) pointers, store(float*, v), broadcast(const float*), sum_lanes(v), and the many-rows form's
// kBroadcastMinRows, kBroadcastMaxVectors and kBroadcastChannels[V] (weight rows per tile of V vectors of rows).
// No include guard: each inclusion is another instruction set.

// sums[m][n] = x[m] . w[n] over K, for m < R rows of x and n < C rows of w: R x C accumulators, one vector
// each; each weight vector is converted once for the R rows, each vector of x loaded once for the C rows.
template <int R, int C, typename W>
inline __attribute__((always_inline)) void tile(const float* x, const W* w, int64_t K, float sums[MR][NR]) {
  Vec acc[R][C];
  for (int m = 0; m < R; ++m)
    for (int n = 0; n < C; ++n) acc[m][n] = zero();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vec wv[C];
    for (int n = 0; n < C; ++n) {
      __builtin_prefetch(reinterpret_cast<const char*>(w + n * K + k) + kPrefetch);
      wv[n] = load(w + n * K + k);
    }
    for (int m = 0; m < R; ++m) {
      const Vec xv = load(x + m * K + k);
      for (int n = 0; n < C; ++n) acc[m][n] = fma(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < R; ++m) {
    for (int n = 0; n < C; ++n) {
      float s = sum_lanes(acc[m][n]);
      for (int64_t j = k; j < K; ++j) s += x[m * K + j] * to_float(w[n * K + j]);
      sums[m][n] = s;
    }
  }
}

// Every row of x, MR at a time (the last tile shorter), against the C weight rows from n0.
template <int C, typename W>
inline __attribute__((always_inline)) void column_block(const float* x, int64_t M, int64_t K, const W* w,
                                                        const float* scale, const float* bias, float* y,
                                                        int64_t N, int64_t n0) {
  float sums[MR][NR];
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const float* xm = x + m0 * K;
    const W* wn = w + n0 * K;
    const int64_t rows = std::min<int64_t>(MR, M - m0);
    if constexpr (MR >= 6) if (rows == 6) tile<6, C>(xm, wn, K, sums);
    if constexpr (MR >= 5) if (rows == 5) tile<5, C>(xm, wn, K, sums);
    if constexpr (MR >= 4) if (rows == 4) tile<4, C>(xm, wn, K, sums);
    if constexpr (MR >= 3) if (rows == 3) tile<3, C>(xm, wn, K, sums);
    if (rows == 2) tile<2, C>(xm, wn, K, sums);
    if (rows == 1) tile<1, C>(xm, wn, K, sums);
    for (int64_t m = 0; m < rows; ++m) {
      for (int n = 0; n < C; ++n) {
        const float s = scale ? sums[m][n] * scale[n0 + n] : sums[m][n];
        y[(m0 + m) * N + n0 + n] = bias ? s + bias[n0 + n] : s;
      }
    }
  }
}

template <typename W>
void columns(const float* x, int64_t M, int64_t K, const W* w, const float* scale, const float* bias, float* y,
             int64_t N, int64_t n_begin, int64_t n_end) {
  int64_t n0 = n_begin;
  for (; n0 + NR <= n_end; n0 += NR) column_block<NR>(x, M, K, w, scale, bias, y, N, n0);
  for (; n0 < n_end; ++n0) column_block<1>(x, M, K, w, scale, bias, y, N, n0);
}

// ---- Many rows: x transposed, weights broadcast ----
// With many rows of x, converting each weight once per MR-row tile and reducing every accumulator across lanes
// costs as much as the multiplies. This form converts each weight row once into a staging buffer, then runs
// every row of x against it: the lanes are rows of x, read from its transpose xt [K, ldx] (zero past the last
// row), and each weight is broadcast to all lanes (C weight rows x V vectors of rows: C*V accumulators).
// out[c * ldo + m] (+)= sum over k < K of w[c * ldw + k] * xt[k * ldx + m], for c < C and m < V * kLanes:
// added to out's values with accumulate.
template <int C, int V>
inline __attribute__((always_inline)) void broadcast_tile(const float* w, int64_t ldw, const float* xt,
                                                          int64_t ldx, int64_t K, float* out, int64_t ldo,
                                                          bool accumulate) {
  Vec acc[C][V];
  _Pragma("GCC unroll 32") for (int c = 0; c < C; ++c)
    for (int v = 0; v < V; ++v) acc[c][v] = accumulate ? load(out + c * ldo + v * kLanes) : zero();
  for (int64_t k = 0; k < K; ++k) {
    Vec xv[V];
    for (int v = 0; v < V; ++v) xv[v] = load(xt + k * ldx + v * kLanes);
    _Pragma("GCC unroll 32") for (int c = 0; c < C; ++c) {
      const Vec wc = broadcast(w + c * ldw + k);
      for (int v = 0; v < V; ++v) acc[c][v] = fma(wc, xv[v], acc[c][v]);
    }
  }
  _Pragma("GCC unroll 32") for (int c = 0; c < C; ++c)
    for (int v = 0; v < V; ++v) store(out + c * ldo + v * kLanes, acc[c][v]);
}

// dst[k] = src[k] as fp32, for k < K.
template <typename W>
inline void stage_row(const W* src, int64_t K, float* dst) {
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    __builtin_prefetch(reinterpret_cast<const char*>(src + k) + kPrefetch);
    store(dst + k, load(src + k));
  }
  for (; k < K; ++k) dst[k] = to_float(src[k]);
}

// Every row of x (from xt) against weight rows [n_begin, n_end), C at a time. The sums of a block of
// kOutBlock weight rows go to yt [kOutBlock, ldx] first, as the tiles hold them (a weight row's sums over the
// rows of x), then to y a row of x at a time: y's rows are N floats apart, too far to write a lane at a time.
constexpr int64_t kOutBlock = 96;  // a multiple of every tile's weight rows
// The weights are staged kChunk columns at a time (24 rows: 24 KiB), so that the tile reads them from L1.
constexpr int64_t kChunk = 256;

template <int C, int V, typename W>
void broadcast_columns(const float* xt, int64_t ldx, int64_t M, int64_t K, const W* w, const float* scale,
                       const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  static_assert(kOutBlock % C == 0, "a block of outputs holds whole tiles");
  std::unique_ptr<float[]> staged(new float[C * kChunk]), yt(new float[kOutBlock * ldx]);
  for (int64_t nb = n_begin; nb < n_end; nb += kOutBlock) {
    const int64_t nb_end = std::min(nb + kOutBlock, n_end);
    for (int64_t n0 = nb; n0 < nb_end; n0 += C) {
      const int64_t cols = std::min<int64_t>(C, nb_end - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t kl = std::min(kChunk, K - k0);
        const float* wc = staged.get();
        int64_t ldw = kChunk;
        if constexpr (std::is_same_v<W, float>) {
          if (cols == C) wc = w + n0 * K + k0, ldw = K;  // already fp32: read in place
        }
        if (wc == staged.get()) {
          for (int64_t c = 0; c < cols; ++c) stage_row(w + (n0 + c) * K + k0, kl, staged.get() + c * kChunk);
          std::fill(staged.get() + cols * kChunk, staged.get() + C * kChunk, 0.f);
        }
        for (int64_t m0 = 0; m0 < M; m0 += V * kLanes)
          broadcast_tile<C, V>(wc, ldw, xt + k0 * ldx + m0, ldx, kl, yt.get() + (n0 - nb) * ldx + m0, ldx, k0 > 0);
      }
    }
    const int64_t width = nb_end - nb;
    for (int64_t m = 0; m < M; ++m) {
      float* row = y + m * N + nb;
      for (int64_t c = 0; c < width; ++c) {
        const float t = scale ? yt[c * ldx + m] * scale[nb + c] : yt[c * ldx + m];
        row[c] = bias ? t + bias[nb + c] : t;
      }
    }
  }
}

// The vectors of rows per tile for M rows, and the row stride of xt: M rounded up to whole tiles.
inline int broadcast_vectors(int64_t M) {
  return static_cast<int>(std::clamp<int64_t>((M + kLanes - 1) / kLanes, 1, kBroadcastMaxVectors));
}

inline int64_t padded_rows(int64_t M) {
  const int64_t rows = broadcast_vectors(M) * kLanes;
  return (M + rows - 1) / rows * rows;
}

// The row stride of xt for the many-rows form, or 0 for the dot-product form. The broadcast form costs the
// same for every lane of a tile, rows or padding, and took about 0.8 of the dot-product form's time per row at
// 32 and 64 rows, 0.9 at 16 (AVX-512 build on a 2-core Xeon, gpt2's matmuls; the AVX2 build 0.6-0.7 there): it
// pays from 16 rows when more than 3/4 of its lanes hold rows (24 rows in tiles of 32 lost by 9%; 28 gained 3%,
// 40 of 48 gained 6%).
inline int64_t xt_stride(int64_t M) {
  if (M < kBroadcastMinRows || 4 * M <= 3 * padded_rows(M)) return 0;
  return padded_rows(M);
}

template <typename W>
void broadcast_run(const float* xt, int64_t ldx, int64_t M, int64_t K, const W* w, const float* scale,
                   const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  switch (broadcast_vectors(M)) {
    case 1:  // a tile of one vector of rows: only where the form starts at that many rows or fewer
      if constexpr (kBroadcastMinRows <= kLanes)
        return broadcast_columns<kBroadcastChannels[1], 1>(xt, ldx, M, K, w, scale, bias, y, N, n_begin, n_end);
      break;
    case 2:
      if constexpr (kBroadcastMaxVectors >= 2)
        return broadcast_columns<kBroadcastChannels[2], 2>(xt, ldx, M, K, w, scale, bias, y, N, n_begin, n_end);
      break;
    case 3:
      if constexpr (kBroadcastMaxVectors >= 3)
        return broadcast_columns<kBroadcastChannels[3], 3>(xt, ldx, M, K, w, scale, bias, y, N, n_begin, n_end);
      break;
    case 4:
      if constexpr (kBroadcastMaxVectors >= 4)
        return broadcast_columns<kBroadcastChannels[4], 4>(xt, ldx, M, K, w, scale, bias, y, N, n_begin, n_end);
      break;
  }
}

// xt: null for the dot-product form, else x transposed with row stride ldx = xt_stride(M).
template <typename W>
void run_typed(const float* x, const float* xt, int64_t ldx, int64_t M, int64_t K, const W* w, const float* scale,
               const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  if (xt) return broadcast_run(xt, ldx, M, K, w, scale, bias, y, N, n_begin, n_end);
  columns(x, M, K, w, scale, bias, y, N, n_begin, n_end);
}

inline void run(const float* x, const float* xt, int64_t ldx, int64_t M, int64_t K, const void* w, WeightType type,
                const float* scale, const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  switch (type) {
    case WeightType::Int8:
      return run_typed(x, xt, ldx, M, K, static_cast<const int8_t*>(w), scale, bias, y, N, n_begin, n_end);
    case WeightType::BFloat16:
      return run_typed(x, xt, ldx, M, K, static_cast<const uint16_t*>(w), scale, bias, y, N, n_begin, n_end);
    case WeightType::Float32:
      return run_typed(x, xt, ldx, M, K, static_cast<const float*>(w), scale, bias, y, N, n_begin, n_end);
  }
}
