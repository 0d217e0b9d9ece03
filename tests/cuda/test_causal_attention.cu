// causal_attention_forward_cuda against a host reference in double: every output and log-sum-exp element
// (both poisoned with NaN first), T from 1 to 1024 (query and key tiles ending mid-way), head dims 32, 64
// and 128, fp32 / fp16 / bf16, batch 1 and several, dense [B, H, T, D] inputs, [B, T, H, D] views and
// q, k, v sliced out of one fused [B, T, 3, H, D] projection. Exits nonzero on any mismatch.
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
constexpr double kLseTol = 2e-5;  // lse is fp32 whatever the inputs: their products are exact in fp32

enum class Layout { Dense, TokenMajor, FusedQKV };  // [B, H, T, D]; [B, T, H, D]; [B, T, 3, H, D]
const char* name(Layout layout) {
  return layout == Layout::Dense ? "BHTD" : layout == Layout::TokenMajor ? "BTHD" : "BT3HD";
}

struct Case {
  int64_t batch, heads, seq_len, head_dim;
  Layout layout;
};

// Where q, k and v start in their buffer (elements), and the strides all three share.
struct Placement {
  int64_t buffer_size, q_offset, k_offset, v_offset;
  gpt2fast::HeadStrides strides;
};

Placement place(const Case& c) {
  const int64_t B = c.batch, H = c.heads, T = c.seq_len, D = c.head_dim, n = B * H * T * D;
  switch (c.layout) {
    case Layout::Dense: return {n, 0, 0, 0, {H * T * D, T * D, D}};
    case Layout::TokenMajor: return {n, 0, 0, 0, {T * H * D, D, H * D}};
    case Layout::FusedQKV: return {3 * n, 0, H * D, 2 * H * D, {T * 3 * H * D, D, 3 * H * D}};
  }
  return {};
}

// out [B, H, T, D] and lse [B, H, T], dense, from the rounded inputs.
void reference(const Case& c, const Placement& at, const std::vector<float>& q, const std::vector<float>& k,
               const std::vector<float>& v, std::vector<double>& out, std::vector<double>& lse) {
  const int64_t H = c.heads, T = c.seq_len, D = c.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> scores(T);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t head = b * at.strides.batch + h * at.strides.head;
      for (int64_t i = 0; i < T; ++i) {
        double max = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            dot += static_cast<double>(q[at.q_offset + head + i * at.strides.token + d]) *
                   k[at.k_offset + head + j * at.strides.token + d];
          }
          scores[j] = dot * scale;
          max = std::fmax(max, scores[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += (scores[j] = std::exp(scores[j] - max));
        const int64_t row = (b * H + h) * T + i;
        lse[row] = max + std::log(sum);
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int64_t j = 0; j <= i; ++j) acc += scores[j] * v[at.v_offset + head + j * at.strides.token + d];
          out[row * D + d] = acc / sum;
        }
      }
    }
  }
}

template <typename T>
bool run(const Case& c, uint64_t seed) {
  const Placement at = place(c);
  const int64_t rows = c.batch * c.heads * c.seq_len, n = rows * c.head_dim;
  // q at twice the scale of k, so that the softmax is far from uniform. With a fused buffer q, k and v
  // interleave in it: three draws, each read only where its tensor lies.
  std::vector<float> q_host, k_host, v_host;
  T* q = check::to_device<T>(check::randn(at.buffer_size, seed, 2.0f), &q_host);
  T* k = check::to_device<T>(check::randn(at.buffer_size, seed + 1), &k_host);
  T* v = check::to_device<T>(check::randn(at.buffer_size, seed + 2), &v_host);
  T* out = check::poisoned<T>(n);
  float* lse = check::poisoned<float>(rows);
  CHECK_CUDA(gpt2fast::causal_attention_forward_cuda(check::dtype_of<T>, q + at.q_offset, at.strides, k + at.k_offset,
                                                     at.strides, v + at.v_offset, at.strides, out, lse, c.batch,
                                                     c.heads, c.seq_len, c.head_dim, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<double> want_out(n), want_lse(rows);
  reference(c, at, q_host, k_host, v_host, want_out, want_lse);
  char what[160];
  std::snprintf(what, sizeof what, "causal_attention %s B%lld H%lld T%lld D%lld %s", sizeof(T) == 4 ? "fp32"
                : std::is_same_v<T, __half> ? "fp16" : "bf16", static_cast<long long>(c.batch),
                static_cast<long long>(c.heads), static_cast<long long>(c.seq_len),
                static_cast<long long>(c.head_dim), name(c.layout));
  const bool ok = check::close((std::string(what) + " out").c_str(), check::to_host(out, n), want_out,
                               check::rtol<T>(), kAtol<T>) &&
                  check::close((std::string(what) + " lse").c_str(), check::to_host(lse, rows), want_lse, kLseTol,
                               kLseTol);
  for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(out),
                  static_cast<void*>(lse)}) {
    CHECK_CUDA(cudaFree(p));
  }
  return ok;
}

template <typename T>
bool run_all() {
  bool ok = true;
  uint64_t seed = 0;
  for (const int64_t head_dim : {32, 64, 128}) {
    for (const Layout layout : {Layout::Dense, Layout::TokenMajor, Layout::FusedQKV}) {
      for (const int64_t seq_len : {1, 17, 77, 130}) ok &= run<T>({3, 2, seq_len, head_dim, layout}, seed += 10);
      ok &= run<T>({1, 2, 1024, head_dim, layout}, seed += 10);
    }
  }
  return ok;
}

// The launcher refuses what it cannot take, without launching.
bool refuses_bad_arguments() {
  float* x = check::poisoned<float>(4096);
  const gpt2fast::HeadStrides dense{1024, 1024, 64}, unaligned{1024, 1024, 66};
  const auto call = [&](const float* q, gpt2fast::HeadStrides strides, int64_t head_dim) {
    return gpt2fast::causal_attention_forward_cuda(gpt2fast::DType::Float32, q, strides, x, dense, x, dense, x,
                                                   x, 1, 1, 8, head_dim, nullptr);
  };
  const bool ok = call(x, dense, 48) == cudaErrorInvalidValue && call(x, unaligned, 64) == cudaErrorInvalidValue &&
                  call(x + 1, dense, 64) == cudaErrorInvalidValue && cudaGetLastError() == cudaSuccess;
  CHECK_CUDA(cudaFree(x));
  std::printf("%s causal_attention refuses head dim 48 and unaligned rows\n", ok ? "ok  " : "FAIL");
  return ok;
}

}  // namespace

int main() {
  bool ok = refuses_bad_arguments();
  ok &= run_all<float>();
  ok &= run_all<__half>();
  ok &= run_all<__nv_bfloat16>();
  std::printf(ok ? "all causal_attention checks passed\n" : "causal_attention checks FAILED\n");
  return ok ? 0 : 1;
}
