// The tiles of quantized_linear_cpu.cpp, written once over a vector type: included once per instruction set,
// inside a namespace that defines Vec, kLanes, MR, NR, zero(), fma(a, b, acc), load(p) for float, int8 and bf16
// (uint16_t) pointers, and sum_lanes(v). No include guard: each inclusion is another instruction set.

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

inline void run(const float* x, int64_t M, int64_t K, const void* w, WeightType type, const float* scale,
                const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  switch (type) {
    case WeightType::Int8:
      return columns(x, M, K, static_cast<const int8_t*>(w), scale, bias, y, N, n_begin, n_end);
    case WeightType::BFloat16:
      return columns(x, M, K, static_cast<const uint16_t*>(w), scale, bias, y, N, n_begin, n_end);
    case WeightType::Float32:
      return columns(x, M, K, static_cast<const float*>(w), scale, bias, y, N, n_begin, n_end);
  }
}
