// What the two attention kernels share (causal_attention.cu, decode_attention.cu): tiles of K, V and Q rows
// staged into shared memory with cp.async (sm_80 and up), which copies 16 bytes from global to shared memory
// without a trip through registers, so that a tile for the next step lands while the current one is used.
//
// Everything here has internal linkage, as in rows.cuh: each .cu file gets its own copy.
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the attention kernels need sm_80 or newer (cp.async, bf16 tensor cores): build for sm_80 and sm_90"
#endif

#include <cuda_runtime.h>

#include <cstdint>
#include <iterator>
#include <type_traits>
#include <utility>

#include "gpt2fast.h"
#include "rows.cuh"

namespace gpt2fast {
namespace {

// dst (shared) = the 16 bytes at src (global), asynchronously; when !valid, 16 zero bytes instead and
// nothing is read (src must still be a mapped address: pass one inside the tensor).
__device__ __forceinline__ void copy_16_bytes_async(void* dst, const void* src, bool valid) {
  const auto shared = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

// Closes the group of copies this thread issued since the last commit.
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most PENDING of this thread's committed groups are still in flight (the newest ones).
// Other threads' copies become visible only after a __syncthreads that follows every thread's wait.
template <int PENDING>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// Issues the copies of rows [first, first + ROWS) of a matrix of D-element rows (`stride` elements apart,
// unit-stride columns, 16-byte aligned) into `tile`, LD elements per row, spread over the block's THREADS
// threads. Rows at or past `end` are zero-filled and never read, so no tile ever holds uninitialised or
// out-of-range values (a cache past a sequence's length may hold NaN, and 0 * NaN is NaN).
template <int D, int ROWS, int LD, int THREADS, typename T>
__device__ __forceinline__ void load_rows_async(T* tile, const T* matrix, int64_t stride, int64_t first,
                                                int64_t end) {
  constexpr int kChunks = D / kVec16<T>;  // 16-byte chunks per row
  static_assert(D % kVec16<T> == 0 && LD % kVec16<T> == 0, "rows must split into 16-byte chunks");
  static_assert(ROWS * kChunks % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int j = 0; j < ROWS * kChunks / THREADS; ++j) {
    const int i = j * THREADS + static_cast<int>(threadIdx.x);
    const int r = i / kChunks, c = i % kChunks;
    const int64_t row = first + r;
    const bool valid = row < end;
    copy_16_bytes_async(tile + r * LD + c * kVec16<T>, matrix + (valid ? row * stride : 0) + c * kVec16<T>, valid);
  }
}

// Whether a [B, H, rows, head_dim] tensor at `data` with these strides can be read 16 bytes at a time.
template <typename T>
bool head_rows_take_16_byte_vectors(const void* data, const HeadStrides& strides, int64_t head_dim) {
  return rows_take_16_byte_vectors<T>(head_dim, {data}, {strides.batch, strides.head, strides.token});
}

template <const auto& HEAD_DIMS, typename Launch, std::size_t... I>
cudaError_t with_listed_head_dim(int64_t head_dim, Launch& launch, std::index_sequence<I...>) {
  cudaError_t err = cudaErrorInvalidValue;
  ((head_dim == HEAD_DIMS[I] && (err = launch(std::integral_constant<int, static_cast<int>(HEAD_DIMS[I])>{}), true)) ||
   ...);
  return err;
}

// launch(std::integral_constant<int, D>{}) with D = head_dim, where head_dim is one of HEAD_DIMS (a list of
// gpt2fast.h's): the kernels are instantiated for exactly the head dims the header states and Python reads.
// cudaErrorInvalidValue for any other.
template <const auto& HEAD_DIMS, typename Launch>
cudaError_t with_head_dim(int64_t head_dim, Launch&& launch) {
  return with_listed_head_dim<HEAD_DIMS>(head_dim, launch, std::make_index_sequence<std::size(HEAD_DIMS)>{});
}

}  // namespace
}  // namespace gpt2fast
