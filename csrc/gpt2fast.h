// The launchers of gpt2fast's C++ and CUDA kernels: raw pointers, sizes and strides in, nothing from
// PyTorch, so that the same kernels build into the Python extension (bindings.cpp checks the tensors and
// calls these) and into the standalone tests and benchmarks (CMakeLists.txt). Strides count elements.
#pragma once

#include <cstdint>

namespace gpt2fast {

// ---- sample (CPU): temperature, then top-k, then top-p (transformers' logits warpers), then one draw ----

// One id for one row of `vocab` logits, drawn from exactly the distribution of the reference
// (gpt2fast/ops/reference.py): scores (x - max x) / temperature in fp32; top-k keeps the scores >= the
// k-th largest (top_k 0 or >= vocab: off); top-p keeps a token iff the mass ranked above it (by score,
// then by id) is < top_p times the mass top-k kept (top_p >= 1: off). A row holding +inf puts all its
// mass, evenly, on its +inf entries. The row must hold no NaN and some logit above -inf. temperature > 0.
// Draws use a counter-based generator keyed by (seed, stream): the same key, the same id.
int64_t sample_row_cpu(const float* logits, int64_t vocab, float temperature, int64_t top_k, float top_p,
                       uint64_t seed, uint64_t stream);

}  // namespace gpt2fast

#ifdef GPT2FAST_CUDA
#include <cuda_runtime_api.h>

namespace gpt2fast {

// The element types of the CUDA kernels (float, __half, __nv_bfloat16); one call's tensors share one.
// Every CUDA launcher takes the stream to launch on and returns the launch's error (cudaGetLastError).
enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// ---- layer_norm (CUDA) ----

// ---- bias_gelu (CUDA) ----

// ---- causal_attention (CUDA) ----

// ---- decode_attention (CUDA) ----

// ---- sample (CUDA) ----

}  // namespace gpt2fast
#endif  // GPT2FAST_CUDA
