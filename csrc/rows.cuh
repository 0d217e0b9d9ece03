// What the CUDA kernels share: the element types as fp32, loads and stores of VEC elements as one access,
// the launchers' dispatch on DType and their grid sizing, and the deterministic sum of the per-block partial
// rows that the row kernels' backwards (layer_norm.cu, bias_gelu.cu) write for weight and bias gradients.
//
// Everything here has internal linkage: each .cu file that includes it gets its own copy of the kernel
// templates, as nvcc compiles each file's device code on its own (no relocatable device code).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "gpt2fast.h"

namespace gpt2fast {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements per 16-byte access, the widest a thread loads in one instruction.
template <typename T> constexpr int kVec16 = 16 / sizeof(T);

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC elements from p (aligned to VEC elements), as fp32.
template <int VEC, typename T>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// Whether rows of `width` elements of T, at these base pointers and row strides, all start on 16 bytes
// and split into whole 16-byte vectors (null pointers, which a kernel skips, do not count).
template <typename T>
bool rows_take_16_byte_vectors(int64_t width, std::initializer_list<const void*> pointers,
                               std::initializer_list<int64_t> row_strides) {
  if (width % kVec16<T> != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  for (int64_t stride : row_strides) {
    if (stride % kVec16<T> != 0) return false;
  }
  return true;
}

// Calls fn with a value of the element type `dtype` names (fn's template argument picks the kernels).
template <typename Fn>
cudaError_t with_element_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: return fn(float{});
    case DType::Float16: return fn(__half{});
    case DType::BFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The current device's SM count, which the launchers size their grids by.
cudaError_t multiprocessors(int* count) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  return err != cudaSuccess ? err : cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

constexpr int kSumColumns = 32;  // a warp reads 32 consecutive floats of a partial row: one 128-byte line
constexpr int kSumSlices = 16;

// out[c] = the sum over p of partial[p * width + c], rounded to T. Slice s sums parts s, s + 16, ... in
// order, then slice 0 adds the 16 slices in order: the same additions in the same order on every run,
// which atomics would not give.
template <typename T>
__global__ void __launch_bounds__(kSumColumns * kSumSlices)
    sum_partial_rows_kernel(const float* __restrict__ partial, int64_t parts, int width, T* __restrict__ out) {
  __shared__ float slices[kSumSlices][kSumColumns];
  const int col = blockIdx.x * kSumColumns + threadIdx.x;
  float sum = 0.0f;
  if (col < width) {
    for (int64_t p = threadIdx.y; p < parts; p += kSumSlices) sum += partial[p * width + col];
  }
  slices[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < width) {
    for (int s = 1; s < kSumSlices; ++s) sum += slices[s][threadIdx.x];
    out[col] = from_float<T>(sum);
  }
}

template <typename T>
cudaError_t sum_partial_rows(const float* partial, int64_t parts, int width, T* out, cudaStream_t stream) {
  const dim3 block(kSumColumns, kSumSlices);
  sum_partial_rows_kernel<T><<<(width + kSumColumns - 1) / kSumColumns, block, 0, stream>>>(partial, parts, width, out);
  return cudaGetLastError();
}

}  // namespace
}  // namespace gpt2fast
