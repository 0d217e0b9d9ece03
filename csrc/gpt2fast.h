// The launchers of gpt2fast's C++ and CUDA kernels: raw pointers, sizes and strides in, nothing from
// PyTorch, so that the same kernels build into the Python extension (bindings.cpp checks the tensors and
// calls these) and into the standalone tests and benchmarks (CMakeLists.txt). Strides count elements.
#pragma once

#include <cstdint>

namespace gpt2fast {

// ---- the CUDA kernels' limits, in every build: gpt2fast._C.limits() hands them to Python, whose checks refuse
// (to the reference) what the kernels do not take, so that this is the one place they are written ----

// The widest row the LayerNorm kernels take: a row lives in registers, at most 16 values a thread.
inline constexpr int64_t layer_norm_max_width = 8192;
// The head dims each attention kernel is compiled for (one instantiation each).
inline constexpr int64_t causal_attention_head_dims[] = {32, 64, 128};
inline constexpr int64_t decode_attention_head_dims[] = {16, 32, 64, 128};
// The most queries per sequence decode_attention_cuda takes in one call (decoding appends a few tokens).
inline constexpr int64_t decode_attention_max_queries = 16;

// ---- sample (CPU): temperature, then top-k, then top-p (transformers' logits warpers), then one draw ----

// One id for one row of `vocab` logits, drawn from exactly the distribution of the reference
// (gpt2fast/ops/reference.py): scores (x - max x) / temperature in fp32; top-k keeps the scores >= the
// k-th largest (top_k 0 or >= vocab: off); top-p keeps a token iff the mass ranked above it (by score,
// then by id) is < top_p times the mass top-k kept (top_p >= 1: off). A row holding +inf puts all its
// mass, evenly, on its +inf entries. The row must hold no NaN and some logit above -inf. temperature > 0.
// Draws use a counter-based generator keyed by (seed, stream): the same key, the same id.
int64_t sample_row_cpu(const float* logits, int64_t vocab, float temperature, int64_t top_k, float top_p,
                       uint64_t seed, uint64_t stream);

// ---- greedy (CPU) ----

// The id of the largest of logits[0 .. vocab) (1 <= vocab < 2^31), the first of equal maxima, as argmax; a NaN
// is never the largest (callers check that rows hold none). Its AVX-512 build where the CPU runs it
// (greedy_cpu_vectorized), else a plain loop.
int64_t greedy_row_cpu(const float* logits, int64_t vocab);
bool greedy_cpu_vectorized();

// ---- bias_gelu (CPU): fp32, forward ----

// y = gelu_tanh(x + bias) for rows [row_begin, row_end): x rows x_row_stride elements apart, unit-stride
// columns; y dense [rows, width]; bias [width], or null for none. Threads take disjoint ranges of rows. Its
// AVX-512 build where the CPU runs it (bias_gelu_cpu_vectorized), else a portable one.
void bias_gelu_cpu(const float* x, int64_t x_row_stride, const float* bias, float* y, int64_t width,
                   int64_t row_begin, int64_t row_end);
bool bias_gelu_cpu_vectorized();

// ---- quantized_linear (CPU): weight-only quantized matmul ----

enum class WeightType : int32_t { Float32 = 0, Int8 = 1, BFloat16 = 2 };
// The builds of the kernel, by instructions: quantized_linear_cpu_best_isa() is the widest this CPU runs. Amx is
// the AVX-512 build with Intel's AMX tile unit (int8 and bf16 tiles) for int8 and bf16 weights at many rows.
enum class CpuIsa : int32_t { Portable = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };
// How the kernel runs, by the rows of x (see quantized_linear_cpu.cpp): dot products along the weight rows (few
// rows), weights broadcast against x transposed (many rows), AMX int8 tiles against x packed in four 8-bit parts
// (int8 weights), or AMX bf16 tiles against x packed in three bf16 parts (bf16 weights).
enum class QuantizedForm : int32_t { Dot = 0, Broadcast = 1, AmxInt8 = 2, AmxBf16 = 3 };

QuantizedForm quantized_linear_cpu_form(int64_t M, WeightType type, CpuIsa isa);
// The bytes of the copy of x that the form reads (0: the dot form reads x itself), written by
// quantized_linear_cpu_pack a block of 32 of x's columns at a time, blocks [block_begin, block_end) of
// (K + 31) / 32 (threads may pack disjoint ranges). x fp32 [M, K] dense.
int64_t quantized_linear_cpu_packed_bytes(int64_t M, int64_t K, QuantizedForm form, CpuIsa isa);
void quantized_linear_cpu_pack(const float* x, int64_t M, int64_t K, void* packed, int64_t block_begin,
                               int64_t block_end, QuantizedForm form, CpuIsa isa);
// What the form needs of whole rows of x before its blocks are packed, rows [row_begin, row_end) of M
// (threads may take disjoint ranges): the amx-int8 form's power of two per row; nothing for the others.
void quantized_linear_cpu_pack_rows(const float* x, int64_t M, int64_t K, void* packed, int64_t row_begin,
                                    int64_t row_end, QuantizedForm form, CpuIsa isa);
// y[m, n] = (x[m] . w[n]) * scale[n] + bias[n] for m < M and n_begin <= n < n_end, summed in fp32: x fp32
// [M, K] dense; w [N, K] dense, one output channel per row, of `type`; scale and bias fp32 [N], or null
// (1 and 0); y fp32 [M, N] dense. form = quantized_linear_cpu_form(M, type, isa), and packed the copy of x it
// reads (null for the dot form). Threads take disjoint ranges of n. isa must be one this CPU runs.
void quantized_linear_cpu(const float* x, const void* packed, int64_t M, int64_t K, const void* w, WeightType type,
                          const float* scale, const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end,
                          QuantizedForm form, CpuIsa isa);

CpuIsa quantized_linear_cpu_best_isa();

// ---- decode_attention (CPU): fp32 ----

// Element strides of a [B, H, T, D] tensor whose rows (D) are dense.
struct DecodeStrides {
  int64_t batch, head, token;
};
// For tasks [task_begin, task_end) of B * H (sequence b = task / heads, head task % heads): with k_new and
// v_new (else null), their Tq rows are copied into the caches at positions lengths[b] - Tq .. lengths[b] - 1;
// then query i (at position lengths[b] - Tq + i) attends, scale 1/sqrt(D), to the cache's keys and values
// 0 .. its position, into out [B, H, Tq, D] dense. Every length must be in [Tq, cache_len]. Threads take
// disjoint ranges of tasks.
void decode_attention_cpu(const float* q, DecodeStrides q_strides, float* k_cache, DecodeStrides k_strides,
                          float* v_cache, DecodeStrides v_strides, const float* k_new, DecodeStrides k_new_strides,
                          const float* v_new, DecodeStrides v_new_strides, const int64_t* lengths, float* out,
                          int64_t heads, int64_t queries, int64_t cache_len, int64_t head_dim, int64_t task_begin,
                          int64_t task_end);
// Whether the CPU runs the kernel's AVX-512 build (else its portable one).
bool decode_attention_cpu_vectorized();

}  // namespace gpt2fast

#ifdef GPT2FAST_CUDA
#include <cuda_runtime_api.h>

namespace gpt2fast {

// The element types of the CUDA kernels (float, __half, __nv_bfloat16); one call's tensors share one.
// Every CUDA launcher takes the stream to launch on and returns the launch's error (cudaGetLastError).
enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// ---- linear_cross_entropy's row kernel (CUDA) ----

// Each of `rows` rows of logits (row_stride elements apart, unit-stride columns, `vocab` wide) becomes its
// cross-entropy against targets[row] (int64; a row whose target is ignore_index gets loss 0), written to
// loss (fp32 [rows]): lse(row) - row[target], in fp32. With write_grad, the row is then overwritten with
// its gradient, (softmax(row) - onehot(target)) * *scale (0 for an ignored row). Targets must lie in
// [0, vocab) or equal ignore_index; scale is one fp32 on the device.
cudaError_t cross_entropy_rows_cuda(DType dtype, void* logits, int64_t row_stride, const int64_t* targets,
                                    float* loss, const float* scale, int64_t rows, int64_t vocab,
                                    int64_t ignore_index, bool write_grad, cudaStream_t stream);

// ---- layer_norm (CUDA) ----

// LayerNorm over `rows` rows of `width` (1 to layer_norm_max_width) elements, with the residual add fused:
// h = x + residual, rounded to dtype and written to h; y = (h - mean) * rstd * weight + bias, with
// rstd = 1 / sqrt(var + eps) and the statistics in fp32. x and residual: rows `*_row_stride` elements apart,
// unit-stride columns; y and h: dense [rows, width]; weight, bias: [width]; mean, rstd: fp32 [rows], saved
// for the backward. residual and h are both null (h is then x) or both set. eps > 0.
cudaError_t layer_norm_forward_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* residual,
                                    int64_t residual_row_stride, const void* weight, const void* bias, void* y,
                                    void* h, float* mean, float* rstd, int64_t rows, int64_t width, float eps,
                                    cudaStream_t stream);

// The fp32 workspace, in elements, that layer_norm_backward_cuda wants for these rows on the current device:
// one partial row of dweight and of dbias per block of a grid that fills the device.
cudaError_t layer_norm_backward_workspace(int64_t rows, int64_t width, int64_t* elements);

// The LayerNorm backward from the forward's h (x where there was no residual), mean and rstd:
// dh = rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat)) + grad_h, xhat = (h - mean) * rstd, where grad_h,
// the gradient reaching h directly, may be null; dweight = sum over rows of dy * xhat, dbias = sum of dy,
// in fp32 and in the same order on every run (per-block partial rows in `workspace`, added after; no
// atomics). grad_y, grad_h, h: rows `*_row_stride` elements apart, unit-stride columns; dh: dense
// [rows, width]; dweight, dbias: [width]. workspace: workspace_elements floats, at least 2 * width; fewer
// than layer_norm_backward_workspace says runs fewer blocks.
cudaError_t layer_norm_backward_cuda(DType dtype, const void* grad_y, int64_t grad_y_row_stride, const void* grad_h,
                                     int64_t grad_h_row_stride, const void* h, int64_t h_row_stride,
                                     const void* weight, const float* mean, const float* rstd, void* dh,
                                     void* dweight, void* dbias, float* workspace, int64_t workspace_elements,
                                     int64_t rows, int64_t width, cudaStream_t stream);

// ---- bias_gelu (CUDA) ----

// y = gelu_tanh(x + bias), GPT-2's tanh approximation 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), in
// fp32 math. x: `rows` rows of `width` elements, x_row_stride elements apart, unit-stride columns; y: dense
// [rows, width]; bias: [width], broadcast over the rows, or null for none.
cudaError_t bias_gelu_forward_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* bias, void* y,
                                   int64_t rows, int64_t width, cudaStream_t stream);

// The fp32 workspace, in elements, that bias_gelu_backward_cuda wants for these rows on the current device:
// one partial row of dbias per row of blocks of a grid that fills the device.
cudaError_t bias_gelu_backward_workspace(int64_t rows, int64_t width, int64_t* elements);

// The backward of bias_gelu_forward_cuda: dx = grad_y * gelu_tanh'(x + bias), and dbias = the sum of dx over
// the rows, in fp32 and in the same order on every run (partial rows in `workspace`, added after; no
// atomics). grad_y and x: rows `*_row_stride` elements apart, unit-stride columns; dx: dense [rows, width];
// bias (null for none) and dbias: [width]. workspace: workspace_elements floats, at least width; fewer than
// bias_gelu_backward_workspace says runs fewer blocks.
cudaError_t bias_gelu_backward_cuda(DType dtype, const void* grad_y, int64_t grad_y_row_stride, const void* x,
                                    int64_t x_row_stride, const void* bias, void* dx, void* dbias, float* workspace,
                                    int64_t workspace_elements, int64_t rows, int64_t width, cudaStream_t stream);

// ---- causal_attention (CUDA) ----

// Strides, in elements, of the first three dims of a [B, H, rows, D] tensor whose last dim has unit stride
// (a [B, T, H, D] tensor viewed as [B, H, T, D] has {T * H * D, D, H * D}).
struct HeadStrides {
  int64_t batch, head, token;
};

// Causal attention forward, flash-attention style: out = softmax(q k^T / sqrt(D), causal) v, and lse, each
// query's natural log-sum-exp of its scaled, masked scores, which a backward uses to recompute the softmax.
// q, k, v: [B, H, T, D] of any strides that keep rows 16-byte aligned (aligned pointers, strides a multiple
// of 16 bytes); out: dense [B, H, T, D] of the same dtype; lse: dense fp32 [B, H, T]. D is one of
// causal_attention_head_dims; fp32 runs on the FMA units, fp16 and bf16 on the tensor cores with fp32
// accumulation. No scratch memory.
// cudaErrorInvalidValue for a head dim, a stride or an alignment it does not take.
cudaError_t causal_attention_forward_cuda(DType dtype, const void* q, HeadStrides q_strides, const void* k,
                                          HeadStrides k_strides, const void* v, HeadStrides v_strides, void* out,
                                          float* lse, int64_t batch, int64_t heads, int64_t seq_len,
                                          int64_t head_dim, cudaStream_t stream);


// ---- decode_attention (CUDA) ----

// How many chunks decode_attention_cuda should cut a cache of cache_len positions into, for batch * heads
// sequences on the current device: enough blocks to keep every SM streaming the cache.
cudaError_t decode_attention_splits(int64_t batch_heads, int64_t cache_len, int* splits);

// Flash-decoding: the `queries` (1 to decode_attention_max_queries) newest tokens of each sequence against
// its KV cache. Query i of sequence b sits at position lengths[b] - queries + i and attends, with scale
// 1/sqrt(D), to keys 0 .. that position; cache entries at or past lengths[b] are never read (they may hold
// NaN). q: [B, H, queries, D]; k_cache, v_cache: [B, H, S, D]; all three of any strides that keep rows
// 16-byte aligned. lengths: [B] int32 or int64 (lengths_int64) in device memory, read by the kernel (no host
// sync), each in [queries, S] (gpt2fast.ops checks them). out: dense [B, H, queries, D] of q's dtype. D is
// one of decode_attention_head_dims.
// The cache is cut into num_splits chunks (decode_attention_splits says how many), one block each; with
// more than one, each chunk writes its partial result (its running max in log2 units, sum of exponentials
// and unnormalised output, fp32) to the caller's scratch, dense partial_acc [B * H, num_splits, queries, D],
// partial_max and partial_sum [B * H, num_splits, queries], and a second kernel merges the chunks. With
// one split the scratch pointers may be null. With k_new and v_new ([B, H, queries, D], any strides with
// unit-stride rows; both or neither), the call appends first: their rows go into the caches at positions
// lengths[b] - queries .. lengths[b] - 1, which are then read as any other (the caches are written only there).
// cudaErrorInvalidValue for sizes, strides or alignments it does not take.
cudaError_t decode_attention_cuda(DType dtype, const void* q, HeadStrides q_strides, void* k_cache,
                                  HeadStrides k_strides, void* v_cache, HeadStrides v_strides, const void* k_new,
                                  HeadStrides k_new_strides, const void* v_new, HeadStrides v_new_strides,
                                  const void* lengths, bool lengths_int64, void* out, float* partial_acc,
                                  float* partial_max, float* partial_sum, int64_t batch, int64_t heads,
                                  int64_t queries, int64_t cache_len, int64_t head_dim, int num_splits,
                                  cudaStream_t stream);


// ---- sample (CUDA) ----

// One id per row of logits [rows, vocab] (rows `logits_row_stride` elements apart, unit-stride columns;
// 1 <= vocab <= 2^30) into ids [rows], each drawn as sample_row_cpu draws it: the same distribution, with
// uniforms keyed by (*seed, row, attempt). seed points to one int64 in device memory, read by the kernel,
// so that no host sync is needed and the launch can be captured in a CUDA graph. temperature > 0;
// top_k 0 or >= vocab, and top_p 1, turn those filters off. A row holding NaN or only -inf breaks the
// contract (gpt2fast.ops checks it on the device); its id is -1 or any id.
cudaError_t sample_cuda(DType dtype, const void* logits, int64_t logits_row_stride, int64_t rows, int64_t vocab,
                        float temperature, int64_t top_k, float top_p, const int64_t* seed, int64_t* ids,
                        cudaStream_t stream);

}  // namespace gpt2fast
#endif  // GPT2FAST_CUDA
