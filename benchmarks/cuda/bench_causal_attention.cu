// causal_attention_forward_cuda at gpt2fast/bench/op_suites.py's GPU shapes, GPT-2 small (8, 12, 1024, 64)
// and xl (4, 25, 1024, 64): median time with L2 flushed, and TFLOP/s counting the causal half of Q K^T and
// P V, 2 * B * H * T * T * D flops (the suite's count). bf16 and fp16 on the tensor cores, fp32 on the FMA
// units; dense [B, H, T, D] inputs (the suite's) and [B, T, H, D] views (the model's).
#include <cstdio>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bench.h"
#include "gpt2fast.h"

namespace {

template <typename Element>
void bench_shape(gpt2fast::DType dtype, const char* dtype_name, int64_t B, int64_t H, int64_t T, int64_t D,
                 bool token_major) {
  const int64_t n = B * H * T * D;
  Element *q, *k, *v, *out;
  float* lse;
  cudaMalloc(&q, n * sizeof(Element));
  cudaMalloc(&k, n * sizeof(Element));
  cudaMalloc(&v, n * sizeof(Element));
  cudaMalloc(&out, n * sizeof(Element));
  cudaMalloc(&lse, B * H * T * sizeof(float));
  cudaMemset(q, 0, n * sizeof(Element));  // zeros: the timing does not depend on the values
  cudaMemset(k, 0, n * sizeof(Element));
  cudaMemset(v, 0, n * sizeof(Element));
  const gpt2fast::HeadStrides strides =
      token_major ? gpt2fast::HeadStrides{T * H * D, D, H * D} : gpt2fast::HeadStrides{H * T * D, T * D, D};
  cudaError_t err = cudaSuccess;
  const double seconds = bench::median_seconds([&] {
    err = gpt2fast::causal_attention_forward_cuda(dtype, q, strides, k, strides, v, strides, out, lse, B, H, T, D,
                                                  nullptr);
  });
  const cudaError_t sync = cudaDeviceSynchronize();
  char what[96];
  std::snprintf(what, sizeof what, "causal_attention %s %lldx%lldx%lldx%lld %s", dtype_name,
                static_cast<long long>(B), static_cast<long long>(H), static_cast<long long>(T),
                static_cast<long long>(D), token_major ? "BTHD" : "BHTD");
  if (err != cudaSuccess || sync != cudaSuccess) {
    std::printf("%-48s failed: %s\n", what, cudaGetErrorString(err != cudaSuccess ? err : sync));
  } else {
    bench::report(what, seconds, 0, 2.0 * B * H * T * T * D);
  }
  cudaFree(q);
  cudaFree(k);
  cudaFree(v);
  cudaFree(out);
  cudaFree(lse);
}

}  // namespace

int main() {
  const std::vector<std::vector<int64_t>> shapes = {{8, 12, 1024, 64}, {4, 25, 1024, 64}};
  for (const auto& s : shapes) {
    for (const bool token_major : {false, true}) {
      bench_shape<__nv_bfloat16>(gpt2fast::DType::BFloat16, "bf16", s[0], s[1], s[2], s[3], token_major);
    }
    bench_shape<__half>(gpt2fast::DType::Float16, "fp16", s[0], s[1], s[2], s[3], false);
    bench_shape<float>(gpt2fast::DType::Float32, "fp32", s[0], s[1], s[2], s[3], false);
  }
  return 0;
}
