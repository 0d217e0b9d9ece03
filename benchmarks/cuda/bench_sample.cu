// Times the CUDA sampler (csrc/sample.cu) at GPT-2's vocabulary: B = 1, 16, 256 rows of logits scaled by 4
// (about the spread of GPT-2's), with top-p 0.9, and with top-k 50 then top-p 0.9; fp32 and bf16 logits.
// GB/s counts one read of the logits, the least any sampler reads.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench.h"
#include "check.h"
#include "gpt2fast.h"

namespace {

// randn * 4 by Box-Muller from a fixed LCG: the same logits on every run.
std::vector<float> logits(size_t n) {
  std::vector<float> x(n);
  uint64_t state = 12345;
  auto next = [&] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return ((state >> 11) + 0.5) * 0x1.0p-53;
  };
  for (size_t i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2.0 * std::log(next())), a = 6.283185307179586 * next();
    x[i] = static_cast<float>(4.0 * r * std::cos(a));
    if (i + 1 < n) x[i + 1] = static_cast<float>(4.0 * r * std::sin(a));
  }
  return x;
}

}  // namespace

int main() {
  const int64_t V = 50257, max_rows = 256;
  const std::vector<float> host = logits(max_rows * V);
  std::vector<__nv_bfloat16> host_bf16(host.size());
  for (size_t i = 0; i < host.size(); ++i) host_bf16[i] = __float2bfloat16(host[i]);
  float* x32 = nullptr;
  __nv_bfloat16* x16 = nullptr;
  int64_t *seed = nullptr, *ids = nullptr;
  CHECK_CUDA(cudaMalloc(&x32, host.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&x16, host.size() * sizeof(__nv_bfloat16)));
  CHECK_CUDA(cudaMalloc(&seed, sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&ids, max_rows * sizeof(int64_t)));
  CHECK_CUDA(cudaMemcpy(x32, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(x16, host_bf16.data(), host_bf16.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(seed, 0, sizeof(int64_t)));

  struct Input {
    const char* name;
    gpt2fast::DType dtype;
    const void* data;
    int bytes;  // per logit
  };
  struct Filter {
    const char* name;
    int64_t top_k;
    float top_p;
  };
  const Input inputs[] = {{"fp32", gpt2fast::DType::Float32, x32, 4}, {"bf16", gpt2fast::DType::BFloat16, x16, 2}};
  const Filter filters[] = {{"top_p=0.9", 0, 0.9f}, {"top_k=50 top_p=0.9", 50, 0.9f}};
  std::printf("sample, V = %lld, logits ~ N(0, 4^2)\n", static_cast<long long>(V));
  for (const Input& input : inputs) {
    for (const Filter& filter : filters) {
      for (int64_t rows : {1, 16, 256}) {
        auto launch = [&] {
          CHECK_CUDA(gpt2fast::sample_cuda(input.dtype, input.data, V, rows, V, 1.0f, filter.top_k, filter.top_p,
                                           seed, ids, nullptr));
        };
        char what[96];
        std::snprintf(what, sizeof(what), "%s B=%lld %s", input.name, static_cast<long long>(rows), filter.name);
        bench::report(what, bench::median_seconds(launch), static_cast<double>(rows) * V * input.bytes, 0.0);
      }
    }
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaFree(x32);
  cudaFree(x16);
  cudaFree(seed);
  cudaFree(ids);
  return 0;
}
