// Times the LayerNorm kernels (csrc/layer_norm.cu) at the GPT-2 shapes of gpt2fast/bench/op_suites.py:
// 8192 and 65536 rows of 768 (small), 8192 rows of 1600 (xl), with and without the residual, forward and
// backward. GB/s counts each tensor read or written once (the backward's partial sums left out).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bench.h"
#include "check.h"
#include "gpt2fast.h"

namespace {

// n elements of N(shift, 1) on the device (their values only keep the arithmetic away from zeros and NaN).
template <typename T>
T* random_device(int64_t n, uint64_t seed, float shift = 0.0f) {
  return check::to_device<T>(check::randn(n, seed, 1.0f, shift));
}

template <typename T>
void bench_shape(int64_t rows, int64_t width, bool residual) {
  const int64_t n = rows * width;
  T* x = random_device<T>(n, 1, 1.0f);
  T* r = residual ? random_device<T>(n, 2) : nullptr;
  T* weight = random_device<T>(width, 3, 1.0f);
  T* bias = random_device<T>(width, 4);
  T* grad_y = random_device<T>(n, 5);
  T* grad_h = residual ? random_device<T>(n, 6) : nullptr;
  T *y, *h = nullptr, *dh, *dweight, *dbias;
  float *mean, *rstd, *workspace;
  CHECK_CUDA(cudaMalloc(&y, n * sizeof(T)));
  if (residual) CHECK_CUDA(cudaMalloc(&h, n * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dh, n * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dweight, width * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dbias, width * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&mean, rows * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&rstd, rows * sizeof(float)));
  int64_t workspace_elements = 0;
  CHECK_CUDA(gpt2fast::layer_norm_backward_workspace(rows, width, &workspace_elements));
  CHECK_CUDA(cudaMalloc(&workspace, workspace_elements * sizeof(float)));

  const std::string shape = std::string(check::dtype_name<T>) + " " + std::to_string(rows) + "x" + std::to_string(width) +
                            (residual ? " +residual" : "");
  const double tensor = double(n) * sizeof(T), vector = double(width) * sizeof(T), stats = 2.0 * rows * sizeof(float);
  const double forward = bench::median_seconds([&] {
    CHECK_CUDA(gpt2fast::layer_norm_forward_cuda(check::dtype_of<T>, x, width, r, width, weight, bias, y, h, mean, rstd, rows,
                                                 width, 1e-5f, nullptr));
  });
  // x (+ residual) in, y (+ h) out, weight and bias in, mean and rstd out.
  bench::report(("layer_norm forward  " + shape).c_str(), forward, (residual ? 4 : 2) * tensor + 2 * vector + stats, 0);
  const T* saved = residual ? h : x;
  const double backward = bench::median_seconds([&] {
    CHECK_CUDA(gpt2fast::layer_norm_backward_cuda(check::dtype_of<T>, grad_y, width, grad_h, width, saved, width, weight, mean,
                                                  rstd, dh, dweight, dbias, workspace, workspace_elements, rows, width,
                                                  nullptr));
  });
  // grad_y, h (+ grad_h) in, dh out; weight in, dweight and dbias out; mean and rstd in.
  bench::report(("layer_norm backward " + shape).c_str(), backward, (residual ? 4 : 3) * tensor + 3 * vector + stats,
                0);
  for (void* p : {static_cast<void*>(x), static_cast<void*>(r), static_cast<void*>(weight), static_cast<void*>(bias),
                  static_cast<void*>(grad_y), static_cast<void*>(grad_h), static_cast<void*>(y), static_cast<void*>(h),
                  static_cast<void*>(dh), static_cast<void*>(dweight), static_cast<void*>(dbias),
                  static_cast<void*>(mean), static_cast<void*>(rstd), static_cast<void*>(workspace)}) {
    CHECK_CUDA(cudaFree(p));
  }
}

template <typename T>
void bench_all() {
  for (auto [rows, width] : {std::pair<int64_t, int64_t>{8192, 768}, {65536, 768}, {8192, 1600}}) {
    for (bool residual : {false, true}) bench_shape<T>(rows, width, residual);
  }
}

}  // namespace

int main() {
  bench_all<__nv_bfloat16>();
  bench_all<__half>();
  bench_all<float>();
  return 0;
}
