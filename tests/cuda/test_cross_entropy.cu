// The cross-entropy row kernel (csrc/cross_entropy.cu) against a host reference in double, for each element
// type: GPT-2's vocabulary and others (1, 17, widths that are not whole 16-byte vectors), one row, 77 and
// 300, rows padded apart and an odd number of elements apart, targets at both ends of the row and
// ignored ones. The loss starts as NaN; the rows carry NaN guards between them (in their padding), which
// must stay NaN; without write_grad the logits must come back untouched.
#include <algorithm>
#include <string>

#include "check.h"

namespace {

constexpr int64_t kIgnore = -100;

struct Case {
  int64_t rows, vocab, stride;
};

template <typename T>
bool run_case(const Case& c, bool write_grad, uint64_t seed) {
  const std::string name = std::string(check::dtype_name<T>) + " " + std::to_string(c.rows) + "x" +
                           std::to_string(c.vocab) + (c.stride != c.vocab ? " stride " + std::to_string(c.stride) : "") +
                           (write_grad ? " grad" : " loss only");
  const int64_t n = std::max<int64_t>(c.rows * c.stride, 1);
  std::vector<float> host = check::randn(n, seed, 3.0f), logits;
  for (int64_t row = 0; row < c.rows; ++row) {
    for (int64_t i = c.vocab; i < c.stride; ++i) host[row * c.stride + i] = NAN;  // the padding is a guard
  }
  T* d_logits = check::to_device<T>(host, &logits);
  std::vector<int64_t> targets(std::max<int64_t>(c.rows, 1));
  for (int64_t row = 0; row < c.rows; ++row) {
    targets[row] = row % 5 == 4 ? kIgnore : row % 3 == 0 ? 0 : row % 3 == 1 ? c.vocab - 1 : (row * 7919) % c.vocab;
  }
  int64_t* d_targets = nullptr;
  CHECK_CUDA(cudaMalloc(&d_targets, targets.size() * sizeof(int64_t)));
  CHECK_CUDA(cudaMemcpy(d_targets, targets.data(), targets.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  const float scale = 0.37f;
  float* d_scale = check::to_device<float>({scale});
  float* d_loss = check::poisoned<float>(std::max<int64_t>(c.rows, 1));

  std::vector<double> want_loss(c.rows), want_logits(n);
  for (int64_t i = 0; i < n; ++i) want_logits[i] = logits[i];
  for (int64_t row = 0; row < c.rows; ++row) {
    const float* z = logits.data() + row * c.stride;
    double m = -INFINITY, s = 0.0;
    for (int64_t i = 0; i < c.vocab; ++i) m = std::max(m, double(z[i]));
    for (int64_t i = 0; i < c.vocab; ++i) s += std::exp(z[i] - m);
    const double lse = m + std::log(s);
    const bool valid = targets[row] != kIgnore;
    want_loss[row] = valid ? lse - z[targets[row]] : 0.0;
    if (!write_grad) continue;
    for (int64_t i = 0; i < c.vocab; ++i) {
      want_logits[row * c.stride + i] = valid ? (std::exp(z[i] - lse) - (i == targets[row])) * scale : 0.0;
    }
  }

  CHECK_CUDA(gpt2fast::cross_entropy_rows_cuda(check::dtype_of<T>, d_logits, c.stride, d_targets, d_loss, d_scale,
                                               c.rows, c.vocab, kIgnore, write_grad, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const double rtol = check::rtol<T>();
  // The loss is a difference of O(10) terms computed in fp32 from the rounded logits.
  bool ok = check::close((name + " loss").c_str(), check::to_host(d_loss, c.rows), want_loss, 1e-5, 1e-4);
  // NaN padding must come back NaN: compare it as NaN == NaN by replacing both sides.
  std::vector<float> got = check::to_host(d_logits, n);
  for (int64_t i = 0; i < n && ok; ++i) {
    if (std::isnan(want_logits[i])) {
      if (!std::isnan(got[i])) {
        std::fprintf(stderr, "FAIL %s: padding element %lld was written\n", name.c_str(), static_cast<long long>(i));
        ok = false;
      }
      got[i] = 0.0f, want_logits[i] = 0.0;
    }
  }
  // Gradients are probabilities times scale, at most 1: an absolute tolerance at the element type's precision.
  ok = ok && check::close((name + " logits").c_str(), got, want_logits, rtol, write_grad ? rtol * scale : 0.0);
  for (void* p : {static_cast<void*>(d_logits), static_cast<void*>(d_targets), static_cast<void*>(d_scale),
                  static_cast<void*>(d_loss)}) {
    CHECK_CUDA(cudaFree(p));
  }
  return ok;
}

template <typename T>
int failures(uint64_t& seed) {
  int failed = 0;
  for (int64_t vocab : {50257, 50304, 65, 17, 1}) {
    for (int64_t rows : {1, 77, 300}) {
      for (bool grad : {true, false}) failed += !run_case<T>({rows, vocab, vocab}, grad, seed += 10);
    }
    failed += !run_case<T>({77, vocab, vocab + 16}, true, seed += 10);  // padded rows: still 16-byte vectors
    failed += !run_case<T>({77, vocab, vocab + 1}, true, seed += 10);   // odd row stride: element by element
  }
  failed += !run_case<T>({0, 50257, 50257}, true, seed += 10);  // no rows: nothing to do
  return failed;
}

}  // namespace

int main() {
  uint64_t seed = 1;
  const int failed = failures<float>(seed) + failures<__half>(seed) + failures<__nv_bfloat16>(seed);
  if (failed) std::fprintf(stderr, "%d cross_entropy case(s) failed\n", failed);
  else std::printf("all cross_entropy cases passed\n");
  return failed ? 1 : 0;
}
