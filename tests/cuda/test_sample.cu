// The CUDA sampler (csrc/sample.cu) against the distribution computed on the host in double: every drawn id
// lies in the kept set (top-k by value with ties kept, then the nucleus: the tokens whose mass ranked above
// them, by score then by id, is < top_p * Z, with a small margin on that boundary), and on a small
// vocabulary with many rows the counts pass a chi-square test against the renormalised probabilities.
// Rows of V = 50257 (held in shared memory on an H100) and of V = 70001 (read from L2 on every pass).
#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>

#include "check.h"

namespace {

struct Params {
  float temperature;
  int64_t top_k;  // 0: off
  float top_p;    // 1: off
};

std::string describe(const char* what, int64_t V, Params params) {
  char text[160];
  std::snprintf(text, sizeof(text), "%s V=%lld T=%g top_k=%lld top_p=%g", what, static_cast<long long>(V),
                params.temperature, static_cast<long long>(params.top_k), params.top_p);
  return text;
}

// One row's distribution as the reference defines it: p[i] the probability of token i (renormalised over
// the nucleus), allowed[i] whether token i may be drawn (the nucleus widened by `margin` * Z, for where fp32
// and double may rightly disagree).
struct Distribution {
  std::vector<double> p;
  std::vector<bool> allowed;
};

Distribution distribution(const float* x, int64_t V, Params params, double margin) {
  const float x_max = *std::max_element(x, x + V);
  std::vector<float> s(V);
  for (int64_t i = 0; i < V; ++i) {
    s[i] = x_max == INFINITY ? (x[i] == INFINITY ? 0.0f : -INFINITY) : (x[i] - x_max) / params.temperature;
  }
  float min_score = -INFINITY;
  if (params.top_k > 0 && params.top_k < V) {
    std::vector<float> sorted = s;
    std::nth_element(sorted.begin(), sorted.begin() + (params.top_k - 1), sorted.end(), std::greater<float>());
    min_score = sorted[params.top_k - 1];
  }
  std::vector<double> p(V);
  double z = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    p[i] = s[i] >= min_score ? std::exp(static_cast<double>(s[i])) : 0.0;
    z += p[i];
  }
  std::vector<int64_t> order(V);  // highest rank first: by score, then by id
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a > b); });
  Distribution d{std::vector<double>(V, 0.0), std::vector<bool>(V, false)};
  double above = 0.0, nucleus = 0.0;
  for (int64_t i : order) {
    const bool in_nucleus = params.top_p >= 1.0f || above < params.top_p * z;
    if (p[i] > 0.0 && in_nucleus) d.p[i] = p[i], nucleus += p[i];
    d.allowed[i] = p[i] > 0.0 && (params.top_p >= 1.0f || above < (params.top_p + margin) * z);
    above += p[i];
  }
  for (double& q : d.p) q /= nucleus;
  return d;
}

struct Device {
  int64_t* seed = nullptr;
  int64_t* ids = nullptr;
  int64_t capacity = 0;
  Device() { CHECK_CUDA(cudaMalloc(&seed, sizeof(int64_t))); }
  ~Device() {
    cudaFree(seed);
    cudaFree(ids);
  }
  // One id per row of device logits [rows, V], rows `stride` elements apart.
  std::vector<int64_t> sample(gpt2fast::DType dtype, const void* logits, int64_t stride, int64_t rows, int64_t V,
                              Params params, int64_t seed_value) {
    if (rows > capacity) {
      cudaFree(ids);
      CHECK_CUDA(cudaMalloc(&ids, rows * sizeof(int64_t)));
      capacity = rows;
    }
    CHECK_CUDA(cudaMemcpy(seed, &seed_value, sizeof(int64_t), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(ids, 0x7f, rows * sizeof(int64_t)));  // an id >= V: shows a row left unwritten
    CHECK_CUDA(gpt2fast::sample_cuda(dtype, logits, stride, rows, V, params.temperature, params.top_k, params.top_p,
                                     seed, ids, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<int64_t> out(rows);
    CHECK_CUDA(cudaMemcpy(out.data(), ids, rows * sizeof(int64_t), cudaMemcpyDeviceToHost));
    return out;
  }
};

// Draws from `rows` rows of V logits, stored `stride` apart, with several seeds: every id in its row's
// allowed set.
template <typename T>
bool support(Device& device, const char* what, const std::vector<float>& host, int64_t rows, int64_t V,
             int64_t stride, Params params) {
  std::vector<float> seen;  // the values as the kernel reads them
  T* logits = check::to_device<T>(host, &seen);
  std::vector<Distribution> kept;
  for (int64_t r = 0; r < rows; ++r) kept.push_back(distribution(seen.data() + r * stride, V, params, 1e-5));
  bool ok = true;
  for (int64_t seed = 0; seed < 4 && ok; ++seed) {
    const std::vector<int64_t> ids = device.sample(check::dtype_of<T>, logits, stride, rows, V, params, seed);
    for (int64_t r = 0; r < rows && ok; ++r) {
      if (ids[r] < 0 || ids[r] >= V || !kept[r].allowed[ids[r]]) {
        std::fprintf(stderr, "FAIL %s: row %lld drew %lld, outside the kept set\n", describe(what, V, params).c_str(),
                     static_cast<long long>(r), static_cast<long long>(ids[r]));
        ok = false;
      }
    }
  }
  CHECK_CUDA(cudaFree(logits));
  if (ok) std::printf("ok   %s (%lld rows)\n", describe(what, V, params).c_str(), static_cast<long long>(rows));
  return ok;
}

// The chi-square quantile at upper tail probability ~1e-6 (Wilson-Hilferty), so that a correct kernel fails
// about once in a million runs.
double chi_square_limit(int df) {
  const double z = 4.75, a = 2.0 / (9.0 * df);
  return df * std::pow(1.0 - a + z * std::sqrt(a), 3.0);
}

// One row, repeated over `rows` rows (stride 0), drawn once per row: the counts match p, cells expected
// fewer than 5 times pooled, and nothing outside p's support is drawn.
bool frequencies(Device& device, const char* what, const std::vector<float>& row, int64_t rows, Params params) {
  const int64_t V = static_cast<int64_t>(row.size());
  const Distribution d = distribution(row.data(), V, params, 0.0);
  float* logits = check::to_device<float>(row);
  const std::vector<int64_t> ids = device.sample(gpt2fast::DType::Float32, logits, 0, rows, V, params, 17);
  CHECK_CUDA(cudaFree(logits));
  std::vector<double> counts(V, 0.0);
  for (int64_t id : ids) {
    if (id < 0 || id >= V || d.p[id] == 0.0) {
      std::fprintf(stderr, "FAIL %s: drew %lld, of probability 0\n", describe(what, V, params).c_str(),
                   static_cast<long long>(id));
      return false;
    }
    counts[id] += 1.0;
  }
  double statistic = 0.0, pooled_observed = 0.0, pooled_expected = 0.0;
  int cells = 0;
  for (int64_t i = 0; i < V; ++i) {
    const double expected = d.p[i] * rows;
    if (expected == 0.0) continue;
    if (expected < 5.0) {
      pooled_observed += counts[i], pooled_expected += expected;
      continue;
    }
    statistic += (counts[i] - expected) * (counts[i] - expected) / expected;
    ++cells;
  }
  if (pooled_expected > 0.0) {
    statistic += (pooled_observed - pooled_expected) * (pooled_observed - pooled_expected) / pooled_expected;
    ++cells;
  }
  if (cells >= 2 && statistic > chi_square_limit(cells - 1)) {
    std::fprintf(stderr, "FAIL %s: chi-square %g over %d cells (limit %g)\n", describe(what, V, params).c_str(),
                 statistic, cells, chi_square_limit(cells - 1));
    return false;
  }
  std::printf("ok   %s (chi-square %.1f, %d cells)\n", describe(what, V, params).c_str(), statistic, cells);
  return true;
}

// Equal logits and top_p 0.5: among ties the higher id ranks above, so only ids >= V / 2 are in the nucleus
// (id j has V - 1 - j tokens above it, each of mass 1), and each of them is equally likely.
bool ties_at_the_nucleus_boundary(Device& device, int64_t V, int64_t rows) {
  const Params params{1.0f, 0, 0.5f};
  float* logits = check::to_device<float>(std::vector<float>(V, 2.5f));
  const std::vector<int64_t> ids = device.sample(gpt2fast::DType::Float32, logits, 0, rows, V, params, 5);
  CHECK_CUDA(cudaFree(logits));
  const int64_t lowest = V / 2;  // V - 1 - j < V / 2  <=>  j >= floor(V / 2) for both parities
  std::vector<double> counts(V - lowest, 0.0);
  for (int64_t id : ids) {
    if (id < lowest || id >= V) {
      std::fprintf(stderr, "FAIL ties V=%lld top_p=0.5: drew %lld, below %lld\n", static_cast<long long>(V),
                   static_cast<long long>(id), static_cast<long long>(lowest));
      return false;
    }
    counts[id - lowest] += 1.0;
  }
  if (counts.size() > 1 && static_cast<double>(rows) / counts.size() >= 5.0) {
    const double expected = static_cast<double>(rows) / counts.size();
    double statistic = 0.0;
    for (double c : counts) statistic += (c - expected) * (c - expected) / expected;
    const int df = static_cast<int>(counts.size()) - 1;
    if (statistic > chi_square_limit(df)) {
      std::fprintf(stderr, "FAIL ties V=%lld top_p=0.5: chi-square %g (limit %g)\n", static_cast<long long>(V),
                   statistic, chi_square_limit(df));
      return false;
    }
  }
  std::printf("ok   ties at the nucleus boundary V=%lld top_p=0.5 (%lld rows)\n", static_cast<long long>(V),
              static_cast<long long>(rows));
  return true;
}

bool same_seed_same_ids(Device& device) {
  const int64_t rows = 64, V = 50257;
  float* logits = check::to_device<float>(check::randn(rows * V, 31, 4.0f));
  const Params params{0.9f, 100, 0.9f};
  const auto a = device.sample(gpt2fast::DType::Float32, logits, V, rows, V, params, 7);
  const auto b = device.sample(gpt2fast::DType::Float32, logits, V, rows, V, params, 7);
  const auto c = device.sample(gpt2fast::DType::Float32, logits, V, rows, V, params, 8);
  CHECK_CUDA(cudaFree(logits));
  if (a != b || a == c) {
    std::fprintf(stderr, "FAIL determinism: the same seed must give the same ids, another seed others\n");
    return false;
  }
  std::printf("ok   the same seed gives the same ids\n");
  return true;
}

// Random logits scaled by 4, with a few -inf entries per row.
std::vector<float> gpt2_like(int64_t rows, int64_t stride, uint64_t seed) {
  std::vector<float> x = check::randn(rows * stride, seed, 4.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < 8; ++j) x[r * stride + (r * 131 + j * 977) % stride] = -INFINITY;
  }
  return x;
}

}  // namespace

int main() {
  Device device;
  bool ok = true;
  const Params cases[] = {{1.0f, 0, 1.0f}, {1.0f, 50, 1.0f}, {1.0f, 0, 0.9f}, {1.0f, 50, 0.9f},
                          {0.7f, 200, 0.8f}, {1.3f, 0, 0.5f}, {0.5f, 1, 1.0f}};
  // GPT-2's vocabulary, rows padded to a stride of V + 3, in each element type.
  const int64_t V = 50257, stride = V + 3;
  for (const Params& params : cases) {
    ok &= support<float>(device, "fp32", gpt2_like(16, stride, 1), 16, V, stride, params);
    ok &= support<__nv_bfloat16>(device, "bf16", gpt2_like(16, stride, 2), 16, V, stride, params);
    ok &= support<__half>(device, "fp16", gpt2_like(16, stride, 3), 16, V, stride, params);
  }
  ok &= support<float>(device, "fp32 B=256", gpt2_like(256, V, 4), 256, V, V, {1.0f, 50, 0.9f});
  ok &= support<float>(device, "fp32 B=1", gpt2_like(1, V, 5), 1, V, V, {1.0f, 0, 0.9f});
  // Rows too long for shared memory: every pass reads the logits again.
  ok &= support<float>(device, "fp32 streamed", gpt2_like(8, 70001, 6), 8, 70001, 70001, {0.8f, 0, 0.9f});
  ok &= support<__nv_bfloat16>(device, "bf16 streamed", gpt2_like(8, 70001, 7), 8, 70001, 70001, {1.0f, 40, 0.7f});

  // Rows holding +inf: all their mass, evenly, on the +inf entries (ties ranked by id under top-p).
  std::vector<float> posinf = check::randn(4 * V, 8, 4.0f);
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t j : {17, 20000, 50256}) posinf[r * V + j] = INFINITY;
    posinf[r * V + 3] = -INFINITY;
  }
  for (const Params& params : {Params{1.0f, 0, 1.0f}, Params{1.0f, 2, 1.0f}, Params{1.0f, 0, 0.5f}}) {
    ok &= support<float>(device, "+inf rows", posinf, 4, V, V, params);
  }
  const std::vector<float> small_posinf = {0.0f, INFINITY, -1.0f, INFINITY, INFINITY, -INFINITY, 2.0f, 3.0f};
  ok &= frequencies(device, "+inf row", small_posinf, 30000, {1.0f, 0, 1.0f});
  ok &= frequencies(device, "+inf row", small_posinf, 30000, {0.5f, 4, 0.7f});

  // Frequencies on small vocabularies, one row repeated over many rows.
  std::vector<float> row12 = check::randn(12, 9, 1.5f), row16 = check::randn(16, 10, 1.5f);
  row16[5] = row16[9] = row16[2];  // ties
  const Params small_cases[] = {{1.0f, 0, 1.0f}, {0.7f, 5, 1.0f}, {1.3f, 0, 0.8f}, {1.0f, 6, 0.9f},
                                {2.0f, 3, 0.5f}, {1.0f, 20, 0.95f}};
  for (const Params& params : small_cases) {
    ok &= frequencies(device, "small", row12, 100000, params);
    ok &= frequencies(device, "small with ties", row16, 100000, params);
  }
  ok &= frequencies(device, "one token", {0.3f}, 1000, {1.0f, 0, 0.5f});

  ok &= ties_at_the_nucleus_boundary(device, 10, 100000);
  ok &= ties_at_the_nucleus_boundary(device, 11, 100000);
  ok &= ties_at_the_nucleus_boundary(device, V, 256);
  ok &= same_seed_same_ids(device);
  std::printf(ok ? "all passed\n" : "FAILED\n");
  return ok ? 0 : 1;
}
