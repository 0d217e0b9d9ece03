// The bias + tanh-GELU kernels (csrc/bias_gelu.cu) against a host reference in double, for each element
// type: GPT-2's widths and others (including 1 and 17), one row, 77 and many (more than the grid's rows of
// blocks, so that each walks several), with a bias and without, rows padded apart (16-byte vectors) and
// rows an odd number of elements apart (one element at a time). Every output starts as NaN with NaN past
// its end, which must stay NaN; the backward runs twice and must give the same bits.
#include <algorithm>
#include <string>

#include "check.h"

namespace {

constexpr size_t kGuard = 64;  // NaN elements past each output's end, which no kernel may write

template <typename T>
bool guard_intact(const std::string& what, const T* device, size_t n) {
  for (float v : check::to_host(device + n, kGuard)) {
    if (!std::isnan(v)) {
      std::fprintf(stderr, "FAIL %s: written past its end\n", what.c_str());
      return false;
    }
  }
  return true;
}

// GPT-2's GELU, 0.5 z (1 + tanh(u)) with u = sqrt(2/pi) (z + 0.044715 z^3), and its derivative.
double gelu_tanh(double z) {
  return 0.5 * z * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (z + 0.044715 * z * z * z)));
}

double gelu_tanh_slope(double z) {
  const double t = std::tanh(std::sqrt(2.0 / M_PI) * (z + 0.044715 * z * z * z));
  return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * std::sqrt(2.0 / M_PI) * (1.0 + 3.0 * 0.044715 * z * z);
}

struct Case {
  int64_t rows, width, x_stride;
  bool bias;
};

template <typename T>
bool run_case(const Case& c, uint64_t seed) {
  const int64_t n = c.width, dense = c.rows * n;
  const std::string name = std::string(check::dtype_name<T>) + " " + std::to_string(c.rows) + "x" + std::to_string(n) +
                           (c.bias ? "" : " no bias") +
                           (c.x_stride != n ? " stride " + std::to_string(c.x_stride) : "");
  // Spread over [-7, 7] or so: GELU's negative tail, its minimum near -0.75 and its linear part.
  std::vector<float> x, bias, grad_y;
  T* d_x = check::to_device<T>(check::randn(std::max<int64_t>(c.rows * c.x_stride, 1), seed, 2.5f), &x);
  T* d_bias = c.bias ? check::to_device<T>(check::randn(n, seed + 1), &bias) : nullptr;
  T* d_grad_y = check::to_device<T>(check::randn(std::max<int64_t>(dense, 1), seed + 2), &grad_y);  // none empty
  T* d_y = check::poisoned<T>(dense + kGuard);

  std::vector<double> want_y(dense), want_dx(dense), want_dbias(n, 0.0);
  for (int64_t row = 0; row < c.rows; ++row) {
    for (int64_t i = 0; i < n; ++i) {
      const double z = double(x[row * c.x_stride + i]) + (c.bias ? bias[i] : 0.0);
      want_y[row * n + i] = gelu_tanh(z);
      want_dx[row * n + i] = grad_y[row * n + i] * gelu_tanh_slope(z);
      want_dbias[i] += want_dx[row * n + i];
    }
  }

  CHECK_CUDA(gpt2fast::bias_gelu_forward_cuda(check::dtype_of<T>, d_x, c.x_stride, d_bias, d_y, c.rows, n, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const double rtol = check::rtol<T>();
  bool ok = check::close((name + " y").c_str(), check::to_host(d_y, dense), want_y, rtol, rtol) &&
            guard_intact(name + " y", d_y, dense);

  int64_t workspace_elements = 0;
  CHECK_CUDA(gpt2fast::bias_gelu_backward_workspace(c.rows, n, &workspace_elements));
  std::vector<float> first_dx, first_dbias;
  for (int run = 0; run < 2 && ok; ++run) {
    T* d_dx = check::poisoned<T>(dense + kGuard);
    T* d_dbias = check::poisoned<T>(n + kGuard);
    float* d_workspace = check::poisoned<float>(workspace_elements);  // every element read must be written first
    CHECK_CUDA(gpt2fast::bias_gelu_backward_cuda(check::dtype_of<T>, d_grad_y, n, d_x, c.x_stride, d_bias, d_dx, d_dbias,
                                                 d_workspace, workspace_elements, c.rows, n, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<float> dx = check::to_host(d_dx, dense), dbias = check::to_host(d_dbias, n);
    if (run == 0) {
      // dbias sums over the rows: its rounding error grows with the row count.
      ok = check::close((name + " dx").c_str(), dx, want_dx, rtol, rtol) && guard_intact(name + " dx", d_dx, dense) &&
           check::close((name + " dbias").c_str(), dbias, want_dbias, rtol, rtol * 2.0 * std::sqrt(double(c.rows))) &&
           guard_intact(name + " dbias", d_dbias, n);
      first_dx = dx;
      first_dbias = dbias;
    } else if (dx != first_dx || dbias != first_dbias) {  // bitwise: no atomics, a fixed order of adds
      std::fprintf(stderr, "FAIL %s: the backward gave different bits on a second run\n", name.c_str());
      ok = false;
    }
    for (void* p : {static_cast<void*>(d_dx), static_cast<void*>(d_dbias), static_cast<void*>(d_workspace)}) {
      CHECK_CUDA(cudaFree(p));
    }
  }
  for (void* p : {static_cast<void*>(d_x), static_cast<void*>(d_bias), static_cast<void*>(d_grad_y),
                  static_cast<void*>(d_y)}) {
    CHECK_CUDA(cudaFree(p));
  }
  return ok;
}

template <typename T>
int failures(uint64_t& seed) {
  int failed = 0;
  for (int64_t width : {768, 1000, 1536, 1600, 3072, 8192, 1, 17}) {
    for (int64_t rows : {1, 77, 2053}) {
      for (bool bias : {true, false}) failed += !run_case<T>({rows, width, width, bias}, seed += 10);
    }
    failed += !run_case<T>({77, width, width + 8, true}, seed += 10);  // padded rows: still 16-byte vectors
    failed += !run_case<T>({77, width, width + 1, true}, seed += 10);  // odd row stride: element by element
  }
  failed += !run_case<T>({0, 768, 768, true}, seed += 10);  // no rows: dbias is zeros
  return failed;
}

}  // namespace

int main() {
  uint64_t seed = 1;
  const int failed = failures<float>(seed) + failures<__half>(seed) + failures<__nv_bfloat16>(seed);
  if (failed) std::fprintf(stderr, "%d bias_gelu case(s) failed\n", failed);
  else std::printf("all bias_gelu cases passed\n");
  return failed ? 1 : 0;
}
