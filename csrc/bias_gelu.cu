// y = gelu_tanh(x + bias), the MLP's epilogue, and its backward (dx, dbias); math in fp32, as
// kernels/bias_gelu.py: gelu_tanh(z) = 0.5 z (1 + tanh(u)) with u = sqrt(2/pi) (z + 0.044715 z^3) equals
// z * sigmoid(2u), one exp; its derivative is s + z s (1 - s) 2u' with s = sigmoid(2u).
//
// A thread owns VEC columns (16 bytes where every row is 16-byte aligned, else one element) and walks
// down them, a grid-stride over the rows, loading kRowsInFlight rows before it uses any; so its bias
// loads once, and in the backward it adds up its columns' dbias in registers over all the rows it visits
// and writes them as one partial row per row of blocks.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "gpt2fast.h"
#include "rows.cuh"

namespace gpt2fast {
namespace {

constexpr int kThreads = 128;
constexpr int kRowsInFlight = 4;
// Row-slots (blocks down the rows) so that each SM walks about this many columns at once: with 16-byte
// vectors, 1024 threads each keeping kRowsInFlight loads in flight.
constexpr int64_t kColumnsPerSM = 8192;

constexpr float kTwoSqrtTwoOverPi = 1.5957691216057308f;  // 2 sqrt(2/pi), so that 2u = this * (z + 0.044715 z^3)

__device__ __forceinline__ float sigmoid(float t) {
  const float e = __expf(-fabsf(t));  // never overflows, unlike exp(-t) for large negative t
  return (t >= 0.0f ? 1.0f : e) / (1.0f + e);
}

__device__ __forceinline__ float gelu_tanh(float z) {
  return z * sigmoid(kTwoSqrtTwoOverPi * (z + 0.044715f * z * z * z));
}

__device__ __forceinline__ float gelu_tanh_slope(float z) {
  const float s = sigmoid(kTwoSqrtTwoOverPi * (z + 0.044715f * z * z * z));
  return s + z * s * (1.0f - s) * kTwoSqrtTwoOverPi * (1.0f + 0.134145f * z * z);  // 3 * 0.044715
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_forward_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ bias, T* __restrict__ y,
                             int64_t rows, int width) {
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (col >= width) return;
  float b[VEC] = {};
  if (bias != nullptr) load<VEC>(bias + col, b);
  const int64_t step = gridDim.y;
  for (int64_t first = blockIdx.y; first < rows; first += kRowsInFlight * step) {
    float z[kRowsInFlight][VEC];
#pragma unroll
    for (int i = 0; i < kRowsInFlight; ++i) {
      if (first + i * step < rows) load<VEC>(x + (first + i * step) * x_stride + col, z[i]);
    }
#pragma unroll
    for (int i = 0; i < kRowsInFlight; ++i) {
      if (first + i * step < rows) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[i][k] = gelu_tanh(z[i][k] + b[k]);
        store<VEC>(y + (first + i * step) * width + col, z[i]);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_backward_kernel(const T* __restrict__ grad_y, int64_t grad_y_stride, const T* __restrict__ x,
                              int64_t x_stride, const T* __restrict__ bias, T* __restrict__ dx,
                              float* __restrict__ dbias_partial, int64_t rows, int width) {
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (col >= width) return;
  float b[VEC] = {}, dbias[VEC] = {};
  if (bias != nullptr) load<VEC>(bias + col, b);
  const int64_t step = gridDim.y;
  for (int64_t first = blockIdx.y; first < rows; first += kRowsInFlight * step) {
    float z[kRowsInFlight][VEC], dy[kRowsInFlight][VEC];
#pragma unroll
    for (int i = 0; i < kRowsInFlight; ++i) {
      const int64_t row = first + i * step;
      if (row < rows) {
        load<VEC>(x + row * x_stride + col, z[i]);
        load<VEC>(grad_y + row * grad_y_stride + col, dy[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsInFlight; ++i) {
      if (first + i * step < rows) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dy[i][k] *= gelu_tanh_slope(z[i][k] + b[k]);
          dbias[k] += dy[i][k];
        }
        store<VEC>(dx + (first + i * step) * width + col, dy[i]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) dbias_partial[static_cast<int64_t>(blockIdx.y) * width + col + k] = dbias[k];
}

// Blocks down the rows: enough to fill the device (at least one, so that the backward writes its
// partial row even for zero rows), at most one a row, and within CUDA's grid.y limit.
int64_t row_slots(int64_t rows, int64_t width, int sms) {
  return std::clamp<int64_t>(ceil_div(sms * kColumnsPerSM, width), 1, std::clamp<int64_t>(rows, 1, 65535));
}

// Threads a block: kThreads, or fewer where the row has fewer vectors (whole warps).
dim3 block_for(int64_t vectors) {
  return dim3(static_cast<unsigned>(std::min<int64_t>(kThreads, ceil_div(vectors, 32) * 32)));
}

bool valid_shape(int64_t rows, int64_t width) { return rows >= 0 && width >= 1 && width <= INT_MAX / 2; }

template <typename T, typename Fn>
cudaError_t with_vectors(bool vectorised, Fn&& fn) {
  return vectorised ? fn(std::integral_constant<int, kVec16<T>>{}) : fn(std::integral_constant<int, 1>{});
}

template <typename T>
cudaError_t forward(const T* x, int64_t x_stride, const T* bias, T* y, int64_t rows, int width, cudaStream_t stream) {
  int sms = 0;
  const cudaError_t err = multiprocessors(&sms);
  if (err != cudaSuccess) return err;
  const bool vectorised = rows_take_16_byte_vectors<T>(width, {x, bias, y}, {x_stride});
  return with_vectors<T>(vectorised, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const dim3 block = block_for(width / VEC);
    const dim3 grid(static_cast<unsigned>(ceil_div(width / VEC, block.x)),
                    static_cast<unsigned>(row_slots(rows, width, sms)));
    bias_gelu_forward_kernel<T, VEC><<<grid, block, 0, stream>>>(x, x_stride, bias, y, rows, width);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t backward(const T* grad_y, int64_t grad_y_stride, const T* x, int64_t x_stride, const T* bias, T* dx,
                     T* dbias, float* workspace, int64_t workspace_elements, int64_t rows, int width,
                     cudaStream_t stream) {
  // Every row of blocks writes one partial row, so the workspace caps their number.
  const int64_t slots = std::min<int64_t>(workspace_elements / width, std::clamp<int64_t>(rows, 1, 65535));
  if (slots < 1) return cudaErrorInvalidValue;
  const bool vectorised = rows_take_16_byte_vectors<T>(width, {grad_y, x, bias, dx}, {grad_y_stride, x_stride});
  const cudaError_t err = with_vectors<T>(vectorised, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const dim3 block = block_for(width / VEC);
    const dim3 grid(static_cast<unsigned>(ceil_div(width / VEC, block.x)), static_cast<unsigned>(slots));
    bias_gelu_backward_kernel<T, VEC>
        <<<grid, block, 0, stream>>>(grad_y, grad_y_stride, x, x_stride, bias, dx, workspace, rows, width);
    return cudaGetLastError();
  });
  return err != cudaSuccess ? err : sum_partial_rows(workspace, slots, width, dbias, stream);
}

}  // namespace

cudaError_t bias_gelu_forward_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* bias, void* y,
                                   int64_t rows, int64_t width, cudaStream_t stream) {
  if (!valid_shape(rows, width)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    return forward(static_cast<const T*>(x), x_row_stride, static_cast<const T*>(bias), static_cast<T*>(y), rows,
                   static_cast<int>(width), stream);
  });
}

cudaError_t bias_gelu_backward_workspace(int64_t rows, int64_t width, int64_t* elements) {
  if (!valid_shape(rows, width)) return cudaErrorInvalidValue;
  int sms = 0;
  const cudaError_t err = multiprocessors(&sms);
  if (err != cudaSuccess) return err;
  *elements = row_slots(rows, width, sms) * width;
  return cudaSuccess;
}

cudaError_t bias_gelu_backward_cuda(DType dtype, const void* grad_y, int64_t grad_y_row_stride, const void* x,
                                    int64_t x_row_stride, const void* bias, void* dx, void* dbias, float* workspace,
                                    int64_t workspace_elements, int64_t rows, int64_t width, cudaStream_t stream) {
  if (!valid_shape(rows, width)) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    return backward(static_cast<const T*>(grad_y), grad_y_row_stride, static_cast<const T*>(x), x_row_stride,
                    static_cast<const T*>(bias), static_cast<T*>(dx), static_cast<T*>(dbias), workspace,
                    workspace_elements, rows, static_cast<int>(width), stream);
  });
}

}  // namespace gpt2fast
