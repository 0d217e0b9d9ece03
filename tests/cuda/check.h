// Helpers for the standalone CUDA tests and benchmarks (tests/cuda/test_<op>.cu, benchmarks/cuda/bench_<op>.cu,
// built by CMakeLists.txt, no Python):
// seeded random host data, device buffers, bf16/fp16 conversions and a comparison with a tolerance.
// Each test computes its reference on the host in double and returns nonzero on the first mismatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "gpt2fast.h"

#define CHECK_CUDA(call)                                                                      \
  do {                                                                                        \
    cudaError_t err_ = (call);                                                                \
    if (err_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

namespace check {

inline std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f, float shift = 0.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(shift, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// Element types by gpt2fast::DType, and their conversions from and to float.
template <typename T> T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline __half from_float<__half>(float x) { return __float2half(x); }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The launchers' element type, and its name, for each T.
template <typename T> constexpr gpt2fast::DType dtype_of = gpt2fast::DType::Float32;
template <> constexpr gpt2fast::DType dtype_of<__half> = gpt2fast::DType::Float16;
template <> constexpr gpt2fast::DType dtype_of<__nv_bfloat16> = gpt2fast::DType::BFloat16;
template <typename T> constexpr const char* dtype_name = "float32";
template <> constexpr const char* dtype_name<__half> = "float16";
template <> constexpr const char* dtype_name<__nv_bfloat16> = "bfloat16";

// Host values rounded to T and copied to a new device buffer; `rounded` gets them back as floats, so that
// the host reference sees exactly what the kernel reads.
template <typename T>
T* to_device(const std::vector<float>& host, std::vector<float>* rounded = nullptr) {
  std::vector<T> converted(host.size());
  for (size_t i = 0; i < host.size(); ++i) converted[i] = from_float<T>(host[i]);
  if (rounded) {
    rounded->resize(host.size());
    for (size_t i = 0; i < host.size(); ++i) (*rounded)[i] = to_float(converted[i]);
  }
  T* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(device, converted.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

// A device buffer of n elements filled with NaN, so that an element a kernel fails to write shows.
template <typename T>
T* poisoned(size_t n) {
  return to_device<T>(std::vector<float>(n, NAN));
}

template <typename T>
std::vector<float> to_host(const T* device, size_t n) {
  std::vector<T> host(n);
  CHECK_CUDA(cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = to_float(host[i]);
  return out;
}

// (rtol, atol) against a double reference for outputs of O(1), per element type.
template <typename T> constexpr double rtol() { return 1e-5; }
template <> constexpr double rtol<__half>() { return 2e-3; }
template <> constexpr double rtol<__nv_bfloat16>() { return 1.6e-2; }

// True when every |got - want| <= atol + rtol |want| (NaN fails); prints the worst element otherwise.
inline bool close(const char* what, const std::vector<float>& got, const std::vector<double>& want, double rtol,
                  double atol) {
  size_t worst = 0;
  double worst_excess = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]), bound = atol + rtol * std::fabs(want[i]);
    const double excess = std::isnan(got[i]) ? INFINITY : err - bound;
    if (excess > worst_excess) worst_excess = excess, worst = i;
  }
  if (worst_excess > 0) {
    std::fprintf(stderr, "FAIL %s: element %zu is %g, expected %g (rtol %g, atol %g)\n", what, worst, got[worst],
                 want[worst], rtol, atol);
    return false;
  }
  std::printf("ok   %s\n", what);
  return true;
}

}  // namespace check
