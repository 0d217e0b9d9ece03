// The row kernel of the fused LM head + cross-entropy (kernels/cross_entropy.py's method, Liger-Kernel's):
// given a chunk of logits [rows, V] that cuBLAS made from x @ weight.T, each row becomes its loss,
// lse - logit[target], and, in place, its gradient (softmax - onehot) * scale, so that two more matmuls
// give the gradients of x and weight and the [N, V] logits never exist at once. Math in fp32.
//
// One block of 256 threads per row: pass 1 walks the row in 16-byte vectors keeping a per-thread online
// max and sum of exponentials, merged across the block; pass 2 rewrites the row with its gradient.
#include <climits>
#include <cmath>

#include "gpt2fast.h"
#include "rows.cuh"

namespace gpt2fast {
namespace {

constexpr int kThreads = 256;

// (m, s) pairs of an online log-sum-exp: sum exp(z - m) = s; merged with the larger max as the new shift.
__device__ __forceinline__ void merge(float& m, float& s, float m_other, float s_other) {
  const float m_new = fmaxf(m, m_other);
  if (m_new == -INFINITY) return;  // both empty
  s = s * __expf(m - m_new) + s_other * __expf(m_other - m_new);
  m = m_new;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_rows_kernel(T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ targets,
                              float* __restrict__ loss, const float* __restrict__ scale, int64_t vocab,
                              int64_t ignore_index, bool write_grad) {
  __shared__ float block_m[kThreads / 32], block_s[kThreads / 32];
  __shared__ float row_lse;
  T* row = logits + blockIdx.x * row_stride;
  const int64_t target = targets[blockIdx.x];
  const bool valid = target != ignore_index;

  float m = -INFINITY, s = 0.0f;
  for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < vocab; col += kThreads * VEC) {
    float z[VEC];
    load<VEC>(row + col, z);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {  // one exp per element: rescale the sum only when the max moves
      if (z[k] > m) {
        s = s * __expf(m - z[k]) + 1.0f;
        m = z[k];
      } else {
        s += __expf(z[k] - m);
      }
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
  }
  if (threadIdx.x % 32 == 0) block_m[threadIdx.x / 32] = m, block_s[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) merge(block_m[0], block_s[0], block_m[w], block_s[w]);
    row_lse = block_m[0] + __logf(block_s[0]);
    // The target's logit is read here, before pass 2 overwrites the row.
    loss[blockIdx.x] = valid ? row_lse - to_float(row[target]) : 0.0f;
  }
  __syncthreads();
  if (!write_grad) return;
  const float lse = row_lse, row_scale = valid ? *scale : 0.0f;
  for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < vocab; col += kThreads * VEC) {
    float z[VEC];
    load<VEC>(row + col, z);
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = (__expf(z[k] - lse) - (col + k == target ? 1.0f : 0.0f)) * row_scale;
    store<VEC>(row + col, z);
  }
}

template <typename T>
cudaError_t launch(void* logits, int64_t row_stride, const int64_t* targets, float* loss, const float* scale,
                   int64_t rows, int64_t vocab, int64_t ignore_index, bool write_grad, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  T* p = static_cast<T*>(logits);
  if (rows_take_16_byte_vectors<T>(vocab, {logits}, {row_stride})) {
    cross_entropy_rows_kernel<T, kVec16<T>><<<rows, kThreads, 0, stream>>>(p, row_stride, targets, loss, scale, vocab,
                                                                          ignore_index, write_grad);
  } else {
    cross_entropy_rows_kernel<T, 1><<<rows, kThreads, 0, stream>>>(p, row_stride, targets, loss, scale, vocab,
                                                                  ignore_index, write_grad);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_rows_cuda(DType dtype, void* logits, int64_t row_stride, const int64_t* targets,
                                    float* loss, const float* scale, int64_t rows, int64_t vocab,
                                    int64_t ignore_index, bool write_grad, cudaStream_t stream) {
  if (rows > INT32_MAX || vocab < 1) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    return launch<decltype(t)>(logits, row_stride, targets, loss, scale, rows, vocab, ignore_index, write_grad,
                               stream);
  });
}

}  // namespace gpt2fast
