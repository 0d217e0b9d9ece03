// Times the bias + tanh-GELU kernels (csrc/bias_gelu.cu) at the GPT-2 shape of gpt2fast/bench/op_suites.py:
// 8192 rows of 3072 (the MLP's hidden width at 768), forward and backward. GB/s counts each tensor read or
// written once (the backward's partial sums left out).
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

// n elements of N(0, 2) on the device (their values only keep the arithmetic away from zeros and NaN).
template <typename T>
T* random_device(int64_t n, uint64_t seed) {
  return check::to_device<T>(check::randn(n, seed, 2.0f));
}

template <typename T>
void bench_shape(int64_t rows, int64_t width) {
  const int64_t n = rows * width;
  T* x = random_device<T>(n, 1);
  T* bias = random_device<T>(width, 2);
  T* grad_y = random_device<T>(n, 3);
  T *y, *dx, *dbias;
  float* workspace;
  CHECK_CUDA(cudaMalloc(&y, n * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dx, n * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dbias, width * sizeof(T)));
  int64_t workspace_elements = 0;
  CHECK_CUDA(gpt2fast::bias_gelu_backward_workspace(rows, width, &workspace_elements));
  CHECK_CUDA(cudaMalloc(&workspace, workspace_elements * sizeof(float)));

  const std::string shape = std::string(check::dtype_name<T>) + " " + std::to_string(rows) + "x" + std::to_string(width);
  const double tensor = double(n) * sizeof(T), vector = double(width) * sizeof(T);
  const double forward = bench::median_seconds([&] {
    CHECK_CUDA(gpt2fast::bias_gelu_forward_cuda(check::dtype_of<T>, x, width, bias, y, rows, width, nullptr));
  });
  bench::report(("bias_gelu forward  " + shape).c_str(), forward, 2 * tensor + vector, 0);  // x in, y out, bias in
  const double backward = bench::median_seconds([&] {
    CHECK_CUDA(gpt2fast::bias_gelu_backward_cuda(check::dtype_of<T>, grad_y, width, x, width, bias, dx, dbias, workspace,
                                                 workspace_elements, rows, width, nullptr));
  });
  // grad_y and x in, dx out; bias in, dbias out.
  bench::report(("bias_gelu backward " + shape).c_str(), backward, 3 * tensor + 2 * vector, 0);
  for (void* p : {static_cast<void*>(x), static_cast<void*>(bias), static_cast<void*>(grad_y), static_cast<void*>(y),
                  static_cast<void*>(dx), static_cast<void*>(dbias), static_cast<void*>(workspace)}) {
    CHECK_CUDA(cudaFree(p));
  }
}

}  // namespace

int main() {
  bench_shape<__nv_bfloat16>(8192, 3072);
  bench_shape<__half>(8192, 3072);
  bench_shape<float>(8192, 3072);
  return 0;
}
