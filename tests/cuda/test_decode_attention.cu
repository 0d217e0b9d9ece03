// decode_attention_cuda against a host reference in double that reads only each sequence's valid prefix:
// the cache holds NaN past every length, so a kernel that reads (or weighs) one entry there fails. Lengths
// from 1 to S ending mid-chunk, on chunk edges and with whole chunks past them; 1, 3 and 16 queries; head
// dims 16 to 128; fp32 / fp16 / bf16; int32 and int64 lengths; dense caches and [B, S, H, D] views; the
// cache cut into 1, 2 and 5 chunks and into as many as decode_attention_splits asks for; each case also
// appending its newest keys and values from separate buffers (NaN in the cache where they go). Outputs and
// partials are poisoned with NaN first. Exits nonzero on any mismatch.
#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"

namespace {

template <typename T> constexpr double kAtol = 1e-5;
template <> constexpr double kAtol<__half> = 1e-3;
template <> constexpr double kAtol<__nv_bfloat16> = 1e-2;

struct Case {
  int64_t batch, heads, cache_len, head_dim, queries;
  std::vector<int64_t> lengths;
};

// Strides of [B, H, rows, D] data held dense, or as [B, rows, H, D] (token-major, as a model's cache may be).
gpt2fast::HeadStrides strides(const Case& c, int64_t rows, bool token_major) {
  const int64_t H = c.heads, D = c.head_dim;
  return token_major ? gpt2fast::HeadStrides{rows * H * D, D, H * D} : gpt2fast::HeadStrides{H * rows * D, rows * D, D};
}

int64_t at(const gpt2fast::HeadStrides& s, int64_t b, int64_t h, int64_t t, int64_t d) {
  return b * s.batch + h * s.head + t * s.token + d;
}

// out [B, H, queries, D], dense.
std::vector<double> reference(const Case& c, const std::vector<float>& q, const gpt2fast::HeadStrides& qs,
                              const std::vector<float>& k, const std::vector<float>& v,
                              const gpt2fast::HeadStrides& cs) {
  const int64_t H = c.heads, Tq = c.queries, D = c.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> out(c.batch * H * Tq * D), scores(c.cache_len);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < Tq; ++i) {
        const int64_t position = c.lengths[b] - Tq + i;  // sees keys 0 .. position
        double max = -INFINITY;
        for (int64_t j = 0; j <= position; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(q[at(qs, b, h, i, d)]) * k[at(cs, b, h, j, d)];
          scores[j] = dot * scale;
          max = std::fmax(max, scores[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= position; ++j) sum += (scores[j] = std::exp(scores[j] - max));
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int64_t j = 0; j <= position; ++j) acc += scores[j] * v[at(cs, b, h, j, d)];
          out[((b * H + h) * Tq + i) * D + d] = acc / sum;
        }
      }
    }
  }
  return out;
}

template <typename L>
void* lengths_on_device(const std::vector<int64_t>& lengths) {
  std::vector<L> host(lengths.begin(), lengths.end());
  void* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(L)));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(L), cudaMemcpyHostToDevice));
  return device;
}

// splits 0: as many as decode_attention_splits asks for. append: the cache holds NaN at the new tokens'
// positions too, and the call appends their keys and values from separate [B, H, queries, D] buffers.
template <typename T>
bool run(const Case& c, int splits, bool token_major, bool int64_lengths, bool append, uint64_t seed) {
  const int64_t B = c.batch, H = c.heads, S = c.cache_len, D = c.head_dim, Tq = c.queries;
  if (splits == 0) CHECK_CUDA(gpt2fast::decode_attention_splits(B * H, S, &splits));
  const gpt2fast::HeadStrides qs = strides(c, Tq, token_major), cs = strides(c, S, token_major);
  std::vector<float> k_values = check::randn(B * H * S * D, seed + 1), v_values = check::randn(B * H * S * D, seed + 2);
  for (int64_t b = 0; b < B; ++b) {  // what a cache holds past a length is never to be read: NaN there
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = c.lengths[b]; t < S; ++t) {
        for (int64_t d = 0; d < D; ++d) k_values[at(cs, b, h, t, d)] = v_values[at(cs, b, h, t, d)] = NAN;
      }
    }
  }
  // The new tokens' rows, [B, H, queries, D] dense; with append the cache gets NaN where they go.
  const gpt2fast::HeadStrides ns = strides(c, Tq, false);
  std::vector<float> k_rows(B * H * Tq * D), v_rows(B * H * Tq * D);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < Tq; ++i) {
        for (int64_t d = 0; d < D; ++d) {
          float& k_at = k_values[at(cs, b, h, c.lengths[b] - Tq + i, d)];
          float& v_at = v_values[at(cs, b, h, c.lengths[b] - Tq + i, d)];
          k_rows[at(ns, b, h, i, d)] = k_at, v_rows[at(ns, b, h, i, d)] = v_at;
          if (append) k_at = v_at = NAN;
        }
      }
    }
  }
  std::vector<float> q_host, k_host, v_host, k_new_host, v_new_host;
  T* q = check::to_device<T>(check::randn(B * H * Tq * D, seed, 2.0f), &q_host);
  T* k = check::to_device<T>(k_values, &k_host);
  T* v = check::to_device<T>(v_values, &v_host);
  T* k_new = append ? check::to_device<T>(k_rows, &k_new_host) : nullptr;
  T* v_new = append ? check::to_device<T>(v_rows, &v_new_host) : nullptr;
  std::vector<float> k_want = k_host, v_want = v_host;  // the caches as they must be after the call
  for (int64_t b = 0; append && b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < Tq; ++i) {
        for (int64_t d = 0; d < D; ++d) {
          k_want[at(cs, b, h, c.lengths[b] - Tq + i, d)] = k_new_host[at(ns, b, h, i, d)];
          v_want[at(cs, b, h, c.lengths[b] - Tq + i, d)] = v_new_host[at(ns, b, h, i, d)];
        }
      }
    }
  }
  void* lengths = int64_lengths ? lengths_on_device<int64_t>(c.lengths) : lengths_on_device<int32_t>(c.lengths);
  T* out = check::poisoned<T>(B * H * Tq * D);
  float* partial_acc = check::poisoned<float>(B * H * splits * Tq * D);
  float* partial_max = check::poisoned<float>(B * H * splits * Tq);
  float* partial_sum = check::poisoned<float>(B * H * splits * Tq);
  CHECK_CUDA(gpt2fast::decode_attention_cuda(check::dtype_of<T>, q, qs, k, cs, v, cs, k_new, ns, v_new, ns, lengths,
                                             int64_lengths, out, partial_acc, partial_max, partial_sum, B, H, Tq, S, D,
                                             splits, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const char* dtype = sizeof(T) == 4 ? "fp32" : std::is_same_v<T, __half> ? "fp16" : "bf16";
  std::string what = std::string("decode_attention ") + dtype + " B" + std::to_string(B) + " H" + std::to_string(H) +
                     " S" + std::to_string(S) + " D" + std::to_string(D) + " Tq" + std::to_string(Tq) + " splits " +
                     std::to_string(splits) +
                     (token_major ? " BSHD" : " BHSD") + (append ? " append" : "") +
                     (int64_lengths ? " int64" : " int32") + " lengths";
  for (int64_t length : c.lengths) what += " " + std::to_string(length);
  bool ok = check::close(what.c_str(), check::to_host(out, B * H * Tq * D),
                         reference(c, q_host, qs, k_want, v_want, cs), check::rtol<T>(), kAtol<T>);
  if (append) {  // exactly the new rows written, nothing else touched (NaN past the lengths stays NaN)
    const std::vector<float> k_got = check::to_host(k, k_want.size()), v_got = check::to_host(v, v_want.size());
    for (size_t i = 0; i < k_want.size() && ok; ++i) {
      const auto same = [](float x, float y) { return x == y || (std::isnan(x) && std::isnan(y)); };
      if (!same(k_got[i], k_want[i]) || !same(v_got[i], v_want[i])) {
        std::fprintf(stderr, "FAIL %s: cache element %zu is %g / %g, expected %g / %g\n", what.c_str(), i, k_got[i],
                     v_got[i], k_want[i], v_want[i]);
        ok = false;
      }
    }
  }
  for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(k_new),
                  static_cast<void*>(v_new), lengths,
                  static_cast<void*>(out), static_cast<void*>(partial_acc), static_cast<void*>(partial_max),
                  static_cast<void*>(partial_sum)}) {
    CHECK_CUDA(cudaFree(p));
  }
  return ok;
}

template <typename T>
bool run_all() {
  // Chunks hold whole blocks of 32 or 64 keys: lengths end inside blocks, on their edges, one past them,
  // and whole chunks lie past the shorter lengths.
  const std::vector<Case> cases = {
      {2, 2, 100, 64, 1, {1, 100}},
      {3, 1, 200, 32, 3, {17, 64, 65}},
      {1, 2, 130, 128, 16, {130}},
      {5, 2, 257, 16, 3, {3, 64, 128, 200, 257}},
      {4, 3, 1024, 64, 1, {1, 511, 777, 1024}},
      {2, 2, 70, 128, 3, {5, 70}},
      {2, 1, 96, 16, 16, {16, 95}},
  };
  bool ok = true;
  uint64_t seed = 0;
  for (const Case& c : cases) {
    for (const int splits : {1, 2, 5, 0}) {
      const bool token_major = splits % 2 == 1, int64_lengths = splits != 2;
      ok &= run<T>(c, splits, token_major, int64_lengths, false, seed += 10);
      ok &= run<T>(c, splits, token_major, int64_lengths, true, seed += 10);
    }
  }
  return ok;
}

// The launcher refuses what it cannot take, without launching.
bool refuses_bad_arguments() {
  float* x = check::poisoned<float>(4096);
  const gpt2fast::HeadStrides dense{1024, 1024, 64};
  const auto call = [&](int64_t queries, int64_t head_dim, int splits, float* partials) {
    return gpt2fast::decode_attention_cuda(gpt2fast::DType::Float32, x, dense, x, dense, x, dense, nullptr, {}, nullptr,
                                           {}, x, true, x, partials, partials, partials, 1, 1, queries, 16, head_dim,
                                           splits, nullptr);
  };
  const bool ok = call(17, 64, 1, nullptr) == cudaErrorInvalidValue &&  // 17 queries
                  call(1, 48, 1, nullptr) == cudaErrorInvalidValue &&   // head dim 48
                  call(1, 64, 2, nullptr) == cudaErrorInvalidValue &&   // two splits, no partials
                  call(1, 64, 0, x) == cudaErrorInvalidValue &&         // no split
                  gpt2fast::decode_attention_cuda(gpt2fast::DType::Float32, x, dense, x, dense, x, dense, x, dense,
                                                  nullptr, {}, x, true, x, nullptr, nullptr, nullptr, 1, 1, 1, 16, 64,
                                                  1, nullptr) == cudaErrorInvalidValue &&  // k_new without v_new
                  cudaGetLastError() == cudaSuccess;
  CHECK_CUDA(cudaFree(x));
  std::printf("%s decode_attention refuses 17 queries, head dim 48, missing partials, 0 splits, k_new alone\n",
              ok ? "ok  " : "FAIL");
  return ok;
}

}  // namespace

int main() {
  bool ok = refuses_bad_arguments();
  ok &= run_all<float>();
  ok &= run_all<__half>();
  ok &= run_all<__nv_bfloat16>();
  std::printf(ok ? "all decode_attention checks passed\n" : "decode_attention checks FAILED\n");
  return ok ? 0 : 1;
}
