// LayerNorm over the last dim with the residual add fused in (kernels/layer_norm.py's contract):
// h = x + residual rounded to the element type, y = (h - mean) * rstd * weight + bias, statistics in fp32.
// Backward, per row: dh = rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat)) + (the gradient reaching h
// directly), and dweight = sum(dy xhat), dbias = sum(dy) over the rows.
//
// A row lives in registers, 8 to 32 values a thread. Rows up to 1024 wide take one warp each (a block runs
// several): shuffles alone reduce them, with no barrier. Wider rows take a block each, so that no thread
// holds more than 16 values. Thread t of a row holds the vectors t, t + threads, t + 2 threads, ... of
// VEC elements: 16 bytes where every row is 16-byte aligned, else one element.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "gpt2fast.h"
#include "rows.cuh"

namespace gpt2fast {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpMaxWidth = 1024;  // 32 lanes of at most 32 values
constexpr int kBlockMaxThreads = 512;
// Warps (rows) a block where a row takes a warp: few, so that blocks of the backward's kernels, which
// hold 100 to 230 registers a thread at 24 and 32 values, still fit two or three to an SM.
constexpr int kWarpRowsPerBlock = 4;
// The backward's blocks an SM (in the grid that layer_norm_backward_workspace sizes): rows enough in
// flight to keep memory busy, and few partial rows to add up after.
constexpr int kBackwardBlocksPerSM = 4;

// Sums each of `values` over the threads of one row (its warp, or its block when the row spans several
// warps); every thread gets the same bits, as the butterfly adds the same pairs on every lane and the
// warps' sums are added in warp order. scratch: kWarp * COUNT floats.
template <int COUNT>
__device__ __forceinline__ void row_sum(float (&values)[COUNT], float* scratch) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask /= 2) {
#pragma unroll
    for (int i = 0; i < COUNT; ++i) values[i] += __shfl_xor_sync(0xffffffffu, values[i], mask);
  }
  if (blockDim.x == kWarp) return;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
#pragma unroll
    for (int i = 0; i < COUNT; ++i) scratch[i * kWarp + warp] = values[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < COUNT; ++i) {
    values[i] = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) values[i] += scratch[i * kWarp + w];
  }
  __syncthreads();  // the next call overwrites scratch
}

// The first column of this thread's j-th vector in its row.
template <int VEC>
__device__ __forceinline__ int column(int j) {
  return (j * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
}

// Where a thread holds more than 16 values, which only warp rows do, blocks have kWarpRowsPerBlock warps and
// a thread may use up to 255 registers; else up to 512 threads (the widest block a row gets).
template <int VALUES>
constexpr int kMaxThreads = VALUES > 16 ? kWarpRowsPerBlock * kWarp : kBlockMaxThreads;

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads<VEC * ITEMS>, 1)
    layer_norm_forward_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual,
                              int64_t residual_stride, const T* __restrict__ weight, const T* __restrict__ bias,
                              T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean_out,
                              float* __restrict__ rstd_out, int64_t rows, int width, float eps) {
  __shared__ float scratch[kWarp];
  const float inv_width = 1.0f / static_cast<float>(width);
  // Rows per block is 1 where a row spans warps, so the loop's bound is the same for the whole block
  // there, as row_sum's barriers need.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    float v[ITEMS][VEC];
    float sum[1] = {0.0f};
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int col = column<VEC>(j);
      if (col < width) {
        load<VEC>(x + row * x_stride + col, v[j]);
        if (residual != nullptr) {
          float r[VEC];
          load<VEC>(residual + row * residual_stride + col, r);
          // Rounded to T before normalising, so that y is exactly LN of the h returned.
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[j][k] = to_float(from_float<T>(v[j][k] + r[k]));
          store<VEC>(h + row * width + col, v[j]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[0] += v[j][k];
      }
    }
    row_sum(sum, scratch);
    const float mean = sum[0] * inv_width;
    float squares[1] = {0.0f};
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      if (column<VEC>(j) < width) {  // only real columns: a missing one would add mean^2
#pragma unroll
        for (int k = 0; k < VEC; ++k) squares[0] += (v[j][k] - mean) * (v[j][k] - mean);
      }
    }
    row_sum(squares, scratch);
    const float rstd = rsqrtf(squares[0] * inv_width + eps);
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int col = column<VEC>(j);
      if (col < width) {
        float w[VEC], b[VEC], out[VEC];
        load<VEC>(weight + col, w);
        load<VEC>(bias + col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = (v[j][k] - mean) * rstd * w[k] + b[k];
        store<VEC>(y + row * width + col, out);
      }
    }
    if (threadIdx.x == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// Each block runs a share of the rows (grid-stride), keeping its threads' dweight and dbias sums in
// registers (every row puts the same columns on the same thread), then writes them as one partial row
// of dweight_partial and dbias_partial; sum_partial_rows adds the blocks' rows after.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads<VEC * ITEMS>, 1)
    layer_norm_backward_kernel(const T* __restrict__ grad_y, int64_t grad_y_stride, const T* __restrict__ grad_h,
                               int64_t grad_h_stride, const T* __restrict__ h, int64_t h_stride,
                               const T* __restrict__ weight, const float* __restrict__ mean,
                               const float* __restrict__ rstd, T* __restrict__ dh, float* __restrict__ dweight_partial,
                               float* __restrict__ dbias_partial, int64_t rows, int width) {
  __shared__ float scratch[2 * kWarp];
  extern __shared__ float block_sums[];  // [2][width] where a block runs several rows at once
  const float inv_width = 1.0f / static_cast<float>(width);
  float dw[ITEMS][VEC] = {}, db[ITEMS][VEC] = {};
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const float row_mean = mean[row], row_rstd = rstd[row];
    float xhat[ITEMS][VEC], wdy[ITEMS][VEC];
    float sums[2] = {0.0f, 0.0f};  // sum(w dy), sum(w dy xhat)
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int col = column<VEC>(j);
      if (col < width) {
        float hv[VEC], dy[VEC], w[VEC];
        load<VEC>(h + row * h_stride + col, hv);
        load<VEC>(grad_y + row * grad_y_stride + col, dy);
        load<VEC>(weight + col, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xhat[j][k] = (hv[k] - row_mean) * row_rstd;
          wdy[j][k] = w[k] * dy[k];
          sums[0] += wdy[j][k];
          sums[1] += wdy[j][k] * xhat[j][k];
          dw[j][k] += dy[k] * xhat[j][k];
          db[j][k] += dy[k];
        }
      }
    }
    row_sum(sums, scratch);
    const float mean_wdy = sums[0] * inv_width, mean_wdy_xhat = sums[1] * inv_width;
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int col = column<VEC>(j);
      if (col < width) {
        // dh overwrites w dy in place: a separate array costs the 16-values-a-thread kernels a spill.
        float(&d)[VEC] = wdy[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) d[k] = (wdy[j][k] - (mean_wdy + xhat[j][k] * mean_wdy_xhat)) * row_rstd;
        if (grad_h != nullptr) {
          float direct[VEC];
          load<VEC>(grad_h + row * grad_h_stride + col, direct);
#pragma unroll
          for (int k = 0; k < VEC; ++k) d[k] += direct[k];
        }
        store<VEC>(dh + row * width + col, d);
      }
    }
  }

  dweight_partial += static_cast<int64_t>(blockIdx.x) * width;
  dbias_partial += static_cast<int64_t>(blockIdx.x) * width;
  if (blockDim.y > 1) {
    // The block's warps add their sums into shared memory one after another, in warp order.
    float* block_dw = block_sums;
    float* block_db = block_sums + width;
    for (int warp = 0; warp < static_cast<int>(blockDim.y); ++warp) {
      if (threadIdx.y == warp) {
#pragma unroll
        for (int j = 0; j < ITEMS; ++j) {
          const int col = column<VEC>(j);
          if (col < width) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              block_dw[col + k] = (warp == 0 ? 0.0f : block_dw[col + k]) + dw[j][k];
              block_db[col + k] = (warp == 0 ? 0.0f : block_db[col + k]) + db[j][k];
            }
          }
        }
      }
      __syncthreads();
    }
    if (threadIdx.y != 0) return;
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int col = column<VEC>(j);
      if (col < width) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dw[j][k] = block_dw[col + k];
          db[j][k] = block_db[col + k];
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int col = column<VEC>(j);
    if (col < width) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        dweight_partial[col + k] = dw[j][k];
        dbias_partial[col + k] = db[j][k];
      }
    }
  }
}

// How a row spreads over threads: `values` per thread (8, 16, 24 or 32) and block (threads per row, rows
// per block).
struct Layout {
  int values;
  dim3 block;
};

Layout layout_for(int64_t width, int vec) {
  const int64_t vectors = width / vec;
  if (width <= kWarpMaxWidth) {
    const int64_t values = ceil_div(ceil_div(vectors, kWarp) * vec, 8) * 8;
    return {static_cast<int>(values), dim3(kWarp, kWarpRowsPerBlock)};
  }
  const int values = width <= 8 * kBlockMaxThreads ? 8 : 16;  // 16 * 512 threads = 8192 columns
  const int64_t threads = ceil_div(ceil_div(vectors, values / vec), kWarp) * kWarp;
  return {values, dim3(static_cast<unsigned>(threads), 1)};
}

// Calls fn(VEC, ITEMS), both std::integral_constant, with ITEMS * VEC = values.
template <int VEC, typename Fn>
cudaError_t with_items(int values, Fn& fn) {
  using Vec = std::integral_constant<int, VEC>;
  switch (values) {
    case 8: return fn(Vec{}, std::integral_constant<int, 8 / VEC>{});
    case 16: return fn(Vec{}, std::integral_constant<int, 16 / VEC>{});
    case 24: return fn(Vec{}, std::integral_constant<int, 24 / VEC>{});
    case 32: return fn(Vec{}, std::integral_constant<int, 32 / VEC>{});
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename Fn>
cudaError_t with_vectors(bool vectorised, int values, Fn&& fn) {
  return vectorised ? with_items<kVec16<T>>(values, fn) : with_items<1>(values, fn);
}

unsigned grid_for(int64_t rows, unsigned rows_per_block) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(rows, rows_per_block), 1), INT_MAX));
}

bool valid_shape(int64_t rows, int64_t width) { return rows >= 0 && width >= 1 && width <= layer_norm_max_width; }

template <typename T>
cudaError_t forward(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride, const T* weight,
                    const T* bias, T* y, T* h, float* mean, float* rstd, int64_t rows, int width, float eps,
                    cudaStream_t stream) {
  const bool vectorised = rows_take_16_byte_vectors<T>(width, {x, residual, weight, bias, y, h},
                                                       {x_stride, residual_stride});
  const Layout layout = layout_for(width, vectorised ? kVec16<T> : 1);
  auto launch = [&](auto vec, auto items) {
    layer_norm_forward_kernel<T, decltype(vec)::value, decltype(items)::value>
        <<<grid_for(rows, layout.block.y), layout.block, 0, stream>>>(
            x, x_stride, residual, residual_stride, weight, bias, y, h, mean, rstd, rows, width, eps);
    return cudaGetLastError();
  };
  return with_vectors<T>(vectorised, layout.values, launch);
}

template <typename T>
cudaError_t backward(const T* grad_y, int64_t grad_y_stride, const T* grad_h, int64_t grad_h_stride, const T* h,
                     int64_t h_stride, const T* weight, const float* mean, const float* rstd, T* dh, T* dweight,
                     T* dbias, float* workspace, int64_t workspace_elements, int64_t rows, int width,
                     cudaStream_t stream) {
  const bool vectorised = rows_take_16_byte_vectors<T>(width, {grad_y, grad_h, h, weight, dh},
                                                       {grad_y_stride, grad_h_stride, h_stride});
  const Layout layout = layout_for(width, vectorised ? kVec16<T> : 1);
  // Every block writes one partial row of each sum, so the workspace caps the grid.
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>(grid_for(rows, layout.block.y), workspace_elements / (2 * int64_t{width})));
  if (blocks == 0) return cudaErrorInvalidValue;
  float* dweight_partial = workspace;
  float* dbias_partial = workspace + int64_t{blocks} * width;
  const size_t shared_bytes = layout.block.y > 1 ? 2 * sizeof(float) * width : 0;
  auto launch = [&](auto vec, auto items) {
    layer_norm_backward_kernel<T, decltype(vec)::value, decltype(items)::value>
        <<<blocks, layout.block, shared_bytes, stream>>>(grad_y, grad_y_stride, grad_h, grad_h_stride, h, h_stride,
                                                         weight, mean, rstd, dh, dweight_partial, dbias_partial,
                                                         rows, width);
    return cudaGetLastError();
  };
  cudaError_t err = with_vectors<T>(vectorised, layout.values, launch);
  if (err == cudaSuccess) err = sum_partial_rows(dweight_partial, blocks, width, dweight, stream);
  if (err == cudaSuccess) err = sum_partial_rows(dbias_partial, blocks, width, dbias, stream);
  return err;
}

}  // namespace

cudaError_t layer_norm_forward_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* residual,
                                    int64_t residual_row_stride, const void* weight, const void* bias, void* y,
                                    void* h, float* mean, float* rstd, int64_t rows, int64_t width, float eps,
                                    cudaStream_t stream) {
  if (!valid_shape(rows, width) || !(eps > 0.0f)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;  // before the pointer checks: an empty tensor's pointer may be null
  if ((residual == nullptr) != (h == nullptr)) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    return forward(static_cast<const T*>(x), x_row_stride, static_cast<const T*>(residual), residual_row_stride,
                   static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(y),
                   static_cast<T*>(h), mean, rstd, rows, static_cast<int>(width), eps, stream);
  });
}

cudaError_t layer_norm_backward_workspace(int64_t rows, int64_t width, int64_t* elements) {
  if (!valid_shape(rows, width)) return cudaErrorInvalidValue;
  int sms = 0;
  const cudaError_t err = multiprocessors(&sms);
  if (err != cudaSuccess) return err;
  const int64_t rows_per_block = width <= kWarpMaxWidth ? kWarpRowsPerBlock : 1;
  const int64_t blocks = std::min<int64_t>(grid_for(rows, rows_per_block), kBackwardBlocksPerSM * int64_t{sms});
  *elements = 2 * blocks * width;
  return cudaSuccess;
}

cudaError_t layer_norm_backward_cuda(DType dtype, const void* grad_y, int64_t grad_y_row_stride, const void* grad_h,
                                     int64_t grad_h_row_stride, const void* h, int64_t h_row_stride,
                                     const void* weight, const float* mean, const float* rstd, void* dh,
                                     void* dweight, void* dbias, float* workspace, int64_t workspace_elements,
                                     int64_t rows, int64_t width, cudaStream_t stream) {
  if (!valid_shape(rows, width)) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    return backward(static_cast<const T*>(grad_y), grad_y_row_stride, static_cast<const T*>(grad_h),
                    grad_h_row_stride, static_cast<const T*>(h), h_row_stride, static_cast<const T*>(weight), mean,
                    rstd, static_cast<T*>(dh), static_cast<T*>(dweight), static_cast<T*>(dbias), workspace,
                    workspace_elements, rows, static_cast<int>(width), stream);
  });
}

}  // namespace gpt2fast
