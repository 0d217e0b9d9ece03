// decode_attention_cuda at gpt2fast/bench/op_suites.py's GPU shape, GPT-2 small decoding B = 16 sequences
// (H = 12, a cache of S = 1024, D = 64) whose lengths are drawn in [S / 2, S], as the suite draws them:
// median time with L2 flushed, and GB/s over the bytes a call must move, the valid K and V entries, q,
// the output and the lengths (the suite's count). bf16 and fp32, 1 and 3 new tokens per sequence.
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_bf16.h>

#include "bench.h"
#include "gpt2fast.h"

namespace {

template <typename T>
void bench_decode(gpt2fast::DType dtype, const char* dtype_name, int64_t queries) {
  const int64_t B = 16, H = 12, S = 1024, D = 64;
  std::mt19937_64 rng(0);
  std::uniform_int_distribution<int64_t> draw(S / 2, S);
  std::vector<int64_t> lengths(B);
  int64_t valid = 0;
  for (int64_t& length : lengths) valid += (length = draw(rng));
  int splits = 1;
  if (gpt2fast::decode_attention_splits(B * H, S, &splits) != cudaSuccess) {
    std::printf("decode_attention_splits failed\n");
    return;
  }
  T *q, *k, *v, *out;
  int64_t* lengths_device;
  float *partial_acc, *partial_max, *partial_sum;
  cudaMalloc(&q, B * H * queries * D * sizeof(T));
  cudaMalloc(&k, B * H * S * D * sizeof(T));
  cudaMalloc(&v, B * H * S * D * sizeof(T));
  cudaMalloc(&out, B * H * queries * D * sizeof(T));
  cudaMalloc(&lengths_device, B * sizeof(int64_t));
  cudaMalloc(&partial_acc, B * H * splits * queries * D * sizeof(float));
  cudaMalloc(&partial_max, B * H * splits * queries * sizeof(float));
  cudaMalloc(&partial_sum, B * H * splits * queries * sizeof(float));
  cudaMemset(q, 0, B * H * queries * D * sizeof(T));
  cudaMemset(k, 0, B * H * S * D * sizeof(T));
  cudaMemset(v, 0, B * H * S * D * sizeof(T));
  cudaMemcpy(lengths_device, lengths.data(), B * sizeof(int64_t), cudaMemcpyHostToDevice);
  const gpt2fast::HeadStrides q_strides{H * queries * D, queries * D, D}, cache_strides{H * S * D, S * D, D};
  cudaError_t err = cudaSuccess;
  const double seconds = bench::median_seconds([&] {
    err = gpt2fast::decode_attention_cuda(dtype, q, q_strides, k, cache_strides, v, cache_strides, nullptr, {}, nullptr,
                                          {}, lengths_device, true, out, partial_acc, partial_max, partial_sum, B, H, queries, S, D,
                                          splits, nullptr);
  });
  const cudaError_t sync = cudaDeviceSynchronize();
  char what[96];
  std::snprintf(what, sizeof what, "decode_attention %s B%lld H%lld S%lld D%lld Tq%lld (%d splits)", dtype_name,
                static_cast<long long>(B), static_cast<long long>(H), static_cast<long long>(S),
                static_cast<long long>(D), static_cast<long long>(queries), splits);
  const double bytes = 2.0 * H * D * sizeof(T) * valid + 2.0 * B * H * queries * D * sizeof(T) + B * sizeof(int64_t);
  if (err != cudaSuccess || sync != cudaSuccess) {
    std::printf("%-48s failed: %s\n", what, cudaGetErrorString(err != cudaSuccess ? err : sync));
  } else {
    bench::report(what, seconds, bytes, 0);
  }
  for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(out),
                  static_cast<void*>(lengths_device), static_cast<void*>(partial_acc),
                  static_cast<void*>(partial_max), static_cast<void*>(partial_sum)}) {
    cudaFree(p);
  }
}

}  // namespace

int main() {
  for (const int64_t queries : {1, 3}) {
    bench_decode<__nv_bfloat16>(gpt2fast::DType::BFloat16, "bf16", queries);
    bench_decode<float>(gpt2fast::DType::Float32, "fp32", queries);
  }
  return 0;
}
