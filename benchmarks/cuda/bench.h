// Helpers for the standalone CUDA benchmarks (benchmarks/cuda/bench_<op>.cu, built by CMakeLists.txt, no
// Python): the median of CUDA-event timings after warm-up, with L2 flushed between calls, as the Python
// suite times (gpt2fast/bench/timing.py), and the achieved GB/s or TFLOP/s.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

namespace bench {

// Median seconds of one call of `launch`, over `reps` calls after `warmup` calls; a 256 MB buffer is
// written between calls so that no call finds its inputs in L2.
inline double median_seconds(const std::function<void()>& launch, int warmup = 10, int reps = 100) {
  const size_t flush_bytes = 256u << 20;
  void* flush = nullptr;
  cudaMalloc(&flush, flush_bytes);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int i = 0; i < warmup; ++i) launch();
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    cudaMemsetAsync(flush, i, flush_bytes);
    cudaEventRecord(start);
    launch();
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    cudaEventElapsedTime(&ms[i], start, stop);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(flush);
  std::nth_element(ms.begin(), ms.begin() + reps / 2, ms.end());
  return ms[reps / 2] * 1e-3;
}

inline void report(const char* what, double seconds, double bytes, double flops) {
  std::printf("%-48s %10.2f us", what, seconds * 1e6);
  if (bytes > 0) std::printf("  %8.1f GB/s", bytes / seconds * 1e-9);
  if (flops > 0) std::printf("  %8.1f TFLOP/s", flops / seconds * 1e-12);
  std::printf("\n");
}

}  // namespace bench
