// The extension module gpt2fast._C: the `native` backend's ops as PyTorch operators, gpt2fast::<op>_native,
// with a CPU and (where built with CUDA) a CUDA kernel each. Every binding checks its tensors (device,
// dtype, layout, shapes) and its parameters with TORCH_CHECK, so that a kernel only ever sees what it
// takes, then calls a launcher from gpt2fast.h. gpt2fast/ops/native_backend.py adds the fake (meta)
// functions and the autograd formulas, and registers the ops with gpt2fast.ops.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <string>

#ifdef GPT2FAST_CUDA
// c10's stream and guard, not ATen/cuda/CUDAContext.h: that one needs cuBLAS's and cuSPARSE's headers,
// which the kernels do not use (the matmuls go through ATen).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "gpt2fast.h"

#ifdef GPT2FAST_CUDA
namespace {

// The kernels' element type of a tensor the binding has already checked to be fp32, fp16 or bf16.
gpt2fast::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return gpt2fast::DType::Float32;
    case at::kHalf: return gpt2fast::DType::Float16;
    case at::kBFloat16: return gpt2fast::DType::BFloat16;
    default: TORCH_CHECK(false, "no CUDA kernel takes ", t.scalar_type());
  }
}

// `t` (called `name` in op's messages) is a CUDA tensor of a dtype the kernels take, on `like`'s device
// and of its dtype.
void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " is ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// Raises with the op's name if a launcher reported an error.
void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <std::size_t N>
bool one_of(const int64_t (&values)[N], int64_t value) {
  return std::find(std::begin(values), std::end(values), value) != std::end(values);
}

// The values as a message lists them: "a, b or c".
template <std::size_t N>
std::string listed(const int64_t (&values)[N]) {
  std::string text = std::to_string(values[0]);
  for (std::size_t i = 1; i < N; ++i) text += (i + 1 == N ? " or " : ", ") + std::to_string(values[i]);
  return text;
}

}  // namespace
#endif  // GPT2FAST_CUDA

// Each op's section holds its bindings (checks, then a launcher from gpt2fast.h), its operator schema
// gpt2fast::<op>_native, and its kernels per dispatch key (CUDA ones only where built with CUDA).

// ---- layer_norm ----

#ifdef GPT2FAST_CUDA
namespace {

// t as [rows, width] with unit-stride columns, as the row kernels take it: a view where t's layout allows
// one, else a dense copy.
at::Tensor unit_stride_rows(const at::Tensor& t, int64_t width) {
  const at::Tensor rows = t.reshape({-1, width});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

// (y, h, mean, rstd): h = x + residual, or an empty tensor without one (an output may not alias x); mean
// and rstd fp32, shaped x.shape[:-1].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_cuda(const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias, double eps,
                                                                           const std::optional<at::Tensor>& residual) {
  const char* op = "layer_norm";
  check_cuda(op, "x", x, x);
  check_cuda(op, "weight", weight, x);
  check_cuda(op, "bias", bias, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim, got a scalar");
  const int64_t width = x.size(-1);
  TORCH_CHECK(width >= 1 && width <= gpt2fast::layer_norm_max_width, op, ": the last dim must be 1 to ",
              gpt2fast::layer_norm_max_width, " wide (the kernels hold a row in registers), got ", width);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == width && bias.dim() == 1 && bias.size(0) == width, op,
              ": weight and bias must be [", width, "], got ", weight.sizes(), " and ", bias.sizes());
  if (residual) {
    check_cuda(op, "residual", *residual, x);
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
  }
  TORCH_CHECK(std::isfinite(eps) && static_cast<float>(eps) > 0, op, ": eps must be finite and > 0 in fp32, got ",
              eps);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, h, mean, rstd};
  const at::Tensor x_rows = unit_stride_rows(x, width);
  const at::Tensor residual_rows = residual ? unit_stride_rows(*residual, width) : at::Tensor();
  const at::Tensor dense_weight = weight.contiguous(), dense_bias = bias.contiguous();
  check_launch(op, gpt2fast::layer_norm_forward_cuda(
                       dtype_of(x), x_rows.data_ptr(), x_rows.stride(0), residual ? residual_rows.data_ptr() : nullptr,
                       residual ? residual_rows.stride(0) : 0, dense_weight.data_ptr(), dense_bias.data_ptr(),
                       y.data_ptr(), residual ? h.data_ptr() : nullptr, mean.data_ptr<float>(), rstd.data_ptr<float>(),
                       x_rows.size(0), width, static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()));
  return {y, h, mean, rstd};
}

// (dh, dweight, dbias) from the forward's h (x where there was no residual), mean and rstd; grad_h (or
// None), the gradient reaching h directly, is added to dh (which is then the grad of both x and residual).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "layer_norm_backward";
  check_cuda(op, "h", h, h);
  check_cuda(op, "grad_y", grad_y, h);
  check_cuda(op, "weight", weight, h);
  TORCH_CHECK(h.dim() >= 1, op, ": h must have at least one dim, got a scalar");
  const int64_t width = h.size(-1);
  TORCH_CHECK(width >= 1 && width <= gpt2fast::layer_norm_max_width, op, ": the last dim must be 1 to ",
              gpt2fast::layer_norm_max_width, " wide, got ", width);
  const int64_t rows = h.numel() / width;
  TORCH_CHECK(grad_y.sizes() == h.sizes(), op, ": grad_y must have h's shape ", h.sizes(), ", got ", grad_y.sizes());
  if (grad_h) {
    check_cuda(op, "grad_h", *grad_h, h);
    TORCH_CHECK(grad_h->sizes() == h.sizes(), op, ": grad_h must have h's shape ", h.sizes(), ", got ",
                grad_h->sizes());
  }
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == width, op, ": weight must be [", width, "], got ",
              weight.sizes());
  for (const auto& [name, stats] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}}) {
    TORCH_CHECK(stats.device() == h.device() && stats.scalar_type() == at::kFloat && stats.numel() == rows, op, ": ",
                name, " must be float32 on ", h.device(), " with one value a row (", rows, "), got ",
                stats.scalar_type(), " on ", stats.device(), " with ", stats.numel());
  }
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor dh = at::empty(h.sizes(), h.options());
  at::Tensor dweight = at::empty({width}, weight.options()), dbias = at::empty({width}, weight.options());
  int64_t workspace_elements = 0;
  const cudaError_t err = gpt2fast::layer_norm_backward_workspace(rows, width, &workspace_elements);
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  const at::Tensor workspace = at::empty({workspace_elements}, h.options().dtype(at::kFloat));
  const at::Tensor h_rows = unit_stride_rows(h, width), grad_y_rows = unit_stride_rows(grad_y, width);
  const at::Tensor grad_h_rows = grad_h ? unit_stride_rows(*grad_h, width) : at::Tensor();
  const at::Tensor dense_weight = weight.contiguous(), dense_mean = mean.contiguous(), dense_rstd = rstd.contiguous();
  check_launch(op, gpt2fast::layer_norm_backward_cuda(
                       dtype_of(h), grad_y_rows.data_ptr(), grad_y_rows.stride(0),
                       grad_h ? grad_h_rows.data_ptr() : nullptr, grad_h ? grad_h_rows.stride(0) : 0, h_rows.data_ptr(),
                       h_rows.stride(0), dense_weight.data_ptr(), dense_mean.data_ptr<float>(),
                       dense_rstd.data_ptr<float>(), dh.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
                       workspace.data_ptr<float>(), workspace_elements, rows, width,
                       c10::cuda::getCurrentCUDAStream()));
  return {dh, dweight, dbias};
}

}  // namespace
#endif  // GPT2FAST_CUDA

// gpt2fast/ops/native_backend.py registers the autograd formula, which calls the backward op.
TORCH_LIBRARY_FRAGMENT(gpt2fast, m) {
  m.def("layer_norm_native(Tensor x, Tensor weight, Tensor bias, float eps, Tensor? residual) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward_native(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor weight, Tensor mean, "
        "Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

#ifdef GPT2FAST_CUDA
TORCH_LIBRARY_IMPL(gpt2fast, CUDA, m) {
  m.impl("layer_norm_native", &layer_norm_cuda);
  m.impl("layer_norm_backward_native", &layer_norm_backward_cuda);
}
#endif  // GPT2FAST_CUDA

// ---- bias_gelu and gelu_mlp ----

#ifdef GPT2FAST_CUDA
namespace {

at::Tensor bias_gelu_cuda(const at::Tensor& x, const at::Tensor& bias) {
  const char* op = "bias_gelu";
  check_cuda(op, "x", x, x);
  check_cuda(op, "bias", bias, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim, got a scalar");
  const int64_t width = x.size(-1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == width, op, ": bias must be [", width, "], got ", bias.sizes());
  TORCH_CHECK(width <= INT32_MAX / 2, op, ": the last dim must be at most ", INT32_MAX / 2, " wide, got ", width);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  const at::Tensor x_rows = unit_stride_rows(x, width), dense_bias = bias.contiguous();
  check_launch(op, gpt2fast::bias_gelu_forward_cuda(dtype_of(x), x_rows.data_ptr(), x_rows.stride(0),
                                                    dense_bias.data_ptr(), y.data_ptr(), x_rows.size(0), width,
                                                    c10::cuda::getCurrentCUDAStream()));
  return y;
}

// (dx, dbias): dx = grad_y * gelu_tanh'(x + bias), dbias its sum over the rows.
std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                           const at::Tensor& bias) {
  const char* op = "bias_gelu_backward";
  check_cuda(op, "x", x, x);
  check_cuda(op, "grad_y", grad_y, x);
  check_cuda(op, "bias", bias, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim, got a scalar");
  const int64_t width = x.size(-1);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == width, op, ": bias must be [", width, "], got ", bias.sizes());
  TORCH_CHECK(width <= INT32_MAX / 2, op, ": the last dim must be at most ", INT32_MAX / 2, " wide, got ", width);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options()), dbias = at::empty({width}, bias.options());
  if (width == 0) return {dx, dbias};
  const at::Tensor x_rows = unit_stride_rows(x, width), grad_y_rows = unit_stride_rows(grad_y, width);
  const int64_t rows = x_rows.size(0);
  int64_t workspace_elements = 0;
  const cudaError_t err = gpt2fast::bias_gelu_backward_workspace(rows, width, &workspace_elements);
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  const at::Tensor workspace = at::empty({workspace_elements}, x.options().dtype(at::kFloat));
  const at::Tensor dense_bias = bias.contiguous();
  check_launch(op, gpt2fast::bias_gelu_backward_cuda(dtype_of(x), grad_y_rows.data_ptr(), grad_y_rows.stride(0),
                                                     x_rows.data_ptr(), x_rows.stride(0), dense_bias.data_ptr(),
                                                     dx.data_ptr(), dbias.data_ptr(), workspace.data_ptr<float>(),
                                                     workspace_elements, rows, width,
                                                     c10::cuda::getCurrentCUDAStream()));
  return {dx, dbias};
}

// (y, act, pre): pre = x @ w_fc without b_fc (the GELU adds it), act = gelu_tanh(pre + b_fc), both
// [..., F]; the backward needs both. The matmuls are cuBLAS's, through ATen, and the bias and GELU one
// pass of bias_gelu's kernel over pre. cuBLASLt's GELU_BIAS epilogue, which would fuse that pass into the
// first matmul, is the alternative to measure on a GPU (cuBLASLt's GELU is the tanh approximation).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_mlp_cuda(const at::Tensor& x, const at::Tensor& w_fc,
                                                             const at::Tensor& b_fc, const at::Tensor& w_proj,
                                                             const at::Tensor& b_proj) {
  const char* op = "gelu_mlp";
  check_cuda(op, "x", x, x);
  check_cuda(op, "w_fc", w_fc, x);
  check_cuda(op, "b_fc", b_fc, x);
  check_cuda(op, "w_proj", w_proj, x);
  check_cuda(op, "b_proj", b_proj, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim, got a scalar");
  const int64_t width = x.size(-1);
  TORCH_CHECK(w_fc.dim() == 2 && w_fc.size(0) == width, op, ": w_fc must be [", width, ", F], got ", w_fc.sizes());
  const int64_t hidden = w_fc.size(1);
  TORCH_CHECK(b_fc.dim() == 1 && b_fc.size(0) == hidden, op, ": b_fc must be [", hidden, "], got ", b_fc.sizes());
  TORCH_CHECK(w_proj.dim() == 2 && w_proj.size(0) == hidden && w_proj.size(1) == width, op, ": w_proj must be [",
              hidden, ", ", width, "], got ", w_proj.sizes());
  TORCH_CHECK(b_proj.dim() == 1 && b_proj.size(0) == width, op, ": b_proj must be [", width, "], got ",
              b_proj.sizes());
  TORCH_CHECK(hidden <= INT32_MAX / 2, op, ": the hidden width must be at most ", INT32_MAX / 2, ", got ", hidden);
  c10::cuda::CUDAGuard guard(x.device());
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  const int64_t rows = c10::multiply_integers(lead);
  const at::Tensor pre = at::mm(x.reshape({rows, width}), w_fc);
  at::Tensor act = at::empty({rows, hidden}, x.options());
  if (act.numel() > 0) {
    const at::Tensor pre_rows = unit_stride_rows(pre, hidden), dense_b_fc = b_fc.contiguous();
    check_launch(op, gpt2fast::bias_gelu_forward_cuda(dtype_of(x), pre_rows.data_ptr(), pre_rows.stride(0),
                                                      dense_b_fc.data_ptr(), act.data_ptr(), rows, hidden,
                                                      c10::cuda::getCurrentCUDAStream()));
  }
  const at::Tensor y = at::addmm(b_proj, act, w_proj);
  std::vector<int64_t> hidden_shape(lead.begin(), lead.end());
  hidden_shape.push_back(hidden);
  return {y.view(x.sizes()), act.view(hidden_shape), pre.view(hidden_shape)};
}

}  // namespace
#endif  // GPT2FAST_CUDA

namespace {

// The CPU kernel: fp32, forward only (native_backend.py sends inputs that need grad to the reference).
at::Tensor bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias) {
  const char* op = "bias_gelu";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim, got a scalar");
  const int64_t width = x.size(-1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat, op,
              ": the CPU kernel takes float32 x and bias, got ", x.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == width, op, ": bias must be [", width, "], got ", bias.sizes());
  TORCH_CHECK(bias.device().is_cpu(), op, ": bias must be on the CPU with x, got ", bias.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const at::Tensor x_rows = x.reshape({-1, width}), dense_bias = bias.contiguous();
  const at::Tensor rows = x_rows.stride(1) == 1 ? x_rows : x_rows.contiguous();
  const float* data = rows.data_ptr<float>();
  // Whole rows a task, about 16K elements at least: a decode step's few rows stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / width);
  at::parallel_for(0, rows.size(0), grain, [&](int64_t begin, int64_t end) {
    gpt2fast::bias_gelu_cpu(data, rows.stride(0), dense_bias.data_ptr<float>(), y.data_ptr<float>(), width, begin,
                            end);
  });
  return y;
}

}  // namespace

// gpt2fast/ops/native_backend.py registers the autograd formulas: bias_gelu's calls its backward op, and
// gelu_mlp's runs torch matmuls around that same backward op (CUDA; the CPU kernel is forward only).
TORCH_LIBRARY_FRAGMENT(gpt2fast, m) {
  m.def("bias_gelu_native(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_backward_native(Tensor grad_y, Tensor x, Tensor bias) -> (Tensor, Tensor)");
  m.def("gelu_mlp_native(Tensor x, Tensor w_fc, Tensor b_fc, Tensor w_proj, Tensor b_proj) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gpt2fast, CPU, m) { m.impl("bias_gelu_native", &bias_gelu_cpu); }

#ifdef GPT2FAST_CUDA
TORCH_LIBRARY_IMPL(gpt2fast, CUDA, m) {
  m.impl("bias_gelu_native", &bias_gelu_cuda);
  m.impl("bias_gelu_backward_native", &bias_gelu_backward_cuda);
  m.impl("gelu_mlp_native", &gelu_mlp_cuda);
}
#endif  // GPT2FAST_CUDA

// ---- causal_attention ----

#ifdef GPT2FAST_CUDA
namespace {

// The strides of a [B, H, rows, D] tensor as the attention launchers take them. A dim of size 1 is never
// stepped along, and a view may give it any stride: 0 then.
gpt2fast::HeadStrides head_strides(const at::Tensor& t) {
  const auto stride = [&](int64_t dim) { return t.size(dim) == 1 ? int64_t{0} : t.stride(dim); };
  return {stride(0), stride(1), stride(2)};
}

// t where the attention kernels can read its rows 16 bytes at a time (a unit-stride head dim, rows on
// 16-byte boundaries: [B, T, H, D] views of the model's projections are), else a dense copy.
at::Tensor with_16_byte_rows(const at::Tensor& t) {
  const gpt2fast::HeadStrides strides = head_strides(t);
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  const bool readable = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                        strides.batch % vec == 0 && strides.head % vec == 0 && strides.token % vec == 0;
  return readable ? t : t.clone(at::MemoryFormat::Contiguous);
}

// (out, lse): lse [B, H, T] fp32 holds each query's log-sum-exp of its scaled scores, for a backward.
std::tuple<at::Tensor, at::Tensor> causal_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v) {
  const char* op = "causal_attention";
  check_cuda(op, "q", q, q);
  check_cuda(op, "k", k, q);
  check_cuda(op, "v", v, q);
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, T, D], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k and v must have q's shape ", q.sizes(),
              ", got ", k.sizes(), " and ", v.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(one_of(gpt2fast::causal_attention_head_dims, head_dim), op, ": head dim must be ",
              listed(gpt2fast::causal_attention_head_dims), ", got ", head_dim);
  TORCH_CHECK(batch * heads <= INT32_MAX && seq_len <= int64_t{65535} * 64, op,
              ": at most 2^31 - 1 batch * heads and 4194240 tokens, got ", batch * heads, " and ", seq_len);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({batch, heads, seq_len, head_dim}, q.options());
  at::Tensor lse = at::empty({batch, heads, seq_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q16 = with_16_byte_rows(q), k16 = with_16_byte_rows(k), v16 = with_16_byte_rows(v);
  check_launch(op, gpt2fast::causal_attention_forward_cuda(
                       dtype_of(q), q16.data_ptr(), head_strides(q16), k16.data_ptr(), head_strides(k16),
                       v16.data_ptr(), head_strides(v16), out.data_ptr(), lse.data_ptr<float>(), batch, heads,
                       seq_len, head_dim, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

}  // namespace
#endif  // GPT2FAST_CUDA

// Inference only: no autograd formula (gpt2fast.ops runs the reference where inputs require grad).
TORCH_LIBRARY_FRAGMENT(gpt2fast, m) {
  m.def("causal_attention_native(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
}

#ifdef GPT2FAST_CUDA
TORCH_LIBRARY_IMPL(gpt2fast, CUDA, m) { m.impl("causal_attention_native", &causal_attention_cuda); }
#endif  // GPT2FAST_CUDA


// ---- decode_attention ----

namespace {

struct DecodeShape {
  int64_t batch, heads, queries, head_dim, cache_len;
};

// The checks the CUDA and CPU bindings share: q [B, H, Tq, D] with 1 <= Tq <= S, caches [B, H, S, D], lengths
// int32 or int64 [B] on q's device.
DecodeShape decode_shape(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4, op, ": q and the caches must be 4-D, got ", q.sizes(), " and ",
              k_cache.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), head_dim = q.size(3);
  const int64_t cache_len = k_cache.size(2);
  TORCH_CHECK(k_cache.sizes() == at::IntArrayRef({batch, heads, cache_len, head_dim}) &&
                  v_cache.sizes() == k_cache.sizes(),
              op, ": the caches must be [B, H, S, D] = [", batch, ", ", heads, ", S, ", head_dim, "], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(queries >= 1 && queries <= cache_len, op, ": q must hold 1 to ", cache_len, " queries, got ", queries);
  TORCH_CHECK(lengths.device() == q.device(), op, ": lengths must be on ", q.device(), ", got ", lengths.device());
  TORCH_CHECK(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong, op,
              ": lengths must be int32 or int64, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch, op, ": lengths must be [B] = [", batch, "], got ",
              lengths.sizes());
  return {batch, heads, queries, head_dim, cache_len};
}

}  // namespace

#ifdef GPT2FAST_CUDA
namespace {

// The lengths' values are gpt2fast.ops' to check (on the device): reading them here would wait for the GPU.
// With k_new and v_new, the new tokens' keys and values are appended to the caches, in place, by the kernel.
at::Tensor decode(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& lengths, const c10::optional<at::Tensor>& k_new,
                  const c10::optional<at::Tensor>& v_new) {
  check_cuda(op, "q", q, q);
  check_cuda(op, "k_cache", k_cache, q);
  check_cuda(op, "v_cache", v_cache, q);
  const DecodeShape shape = decode_shape(op, q, k_cache, v_cache, lengths);
  const int64_t batch = shape.batch, heads = shape.heads, queries = shape.queries, head_dim = shape.head_dim;
  const int64_t cache_len = shape.cache_len;
  TORCH_CHECK(queries <= gpt2fast::decode_attention_max_queries, op, ": q must hold 1 to ",
              gpt2fast::decode_attention_max_queries, " queries, and no more than the cache's ", cache_len,
              " positions, got ", queries);
  TORCH_CHECK(one_of(gpt2fast::decode_attention_head_dims, head_dim), op, ": head dim must be ",
              listed(gpt2fast::decode_attention_head_dims), ", got ", head_dim);
  TORCH_CHECK(batch * heads <= INT32_MAX, op, ": at most 2^31 - 1 batch * heads, got ", batch * heads);
  at::Tensor new_k, new_v;  // k_new and v_new with unit-stride rows, when appending
  if (k_new.has_value()) {
    check_cuda(op, "k_new", *k_new, q);
    check_cuda(op, "v_new", *v_new, q);
    TORCH_CHECK(k_new->sizes() == q.sizes() && v_new->sizes() == q.sizes(), op, ": k_new and v_new must have q's shape ",
                q.sizes(), ", got ", k_new->sizes(), " and ", v_new->sizes());
    // The kernel writes the caches where they are: a copy with 16-byte rows would take the append.
    TORCH_CHECK(with_16_byte_rows(k_cache).is_same(k_cache) && with_16_byte_rows(v_cache).is_same(v_cache), op,
                ": appending needs caches whose rows are 16-byte aligned with a unit-stride head dim");
    new_k = k_new->stride(3) == 1 ? *k_new : k_new->contiguous();
    new_v = v_new->stride(3) == 1 ? *v_new : v_new->contiguous();
  }
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({batch, heads, queries, head_dim}, q.options());
  if (out.numel() == 0) return out;
  const at::Tensor q16 = with_16_byte_rows(q), k16 = with_16_byte_rows(k_cache), v16 = with_16_byte_rows(v_cache);
  const at::Tensor dense_lengths = lengths.contiguous();
  int splits = 1;
  const cudaError_t err = gpt2fast::decode_attention_splits(batch * heads, cache_len, &splits);
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  at::Tensor partial_acc, partial_max, partial_sum;  // each chunk's (unnormalised output, max, sum), when several
  if (splits > 1) {
    const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
    partial_acc = at::empty({batch * heads, splits, queries, head_dim}, fp32);
    partial_max = at::empty({batch * heads, splits, queries}, fp32);
    partial_sum = at::empty({batch * heads, splits, queries}, fp32);
  }
  const auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  check_launch(op, gpt2fast::decode_attention_cuda(
                       dtype_of(q), q16.data_ptr(), head_strides(q16), k16.data_ptr(), head_strides(k16),
                       v16.data_ptr(), head_strides(v16), new_k.defined() ? new_k.data_ptr() : nullptr,
                       new_k.defined() ? head_strides(new_k) : gpt2fast::HeadStrides{},
                       new_v.defined() ? new_v.data_ptr() : nullptr,
                       new_v.defined() ? head_strides(new_v) : gpt2fast::HeadStrides{}, dense_lengths.data_ptr(),
                       dense_lengths.scalar_type() == at::kLong, out.data_ptr(), data(partial_acc),
                       data(partial_max), data(partial_sum), batch, heads, queries, cache_len, head_dim, splits,
                       c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& lengths) {
  return decode("decode_attention", q, k_cache, v_cache, lengths, c10::nullopt, c10::nullopt);
}

at::Tensor decode_attention_append_cuda(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                        const at::Tensor& lengths, const at::Tensor& k_new, const at::Tensor& v_new) {
  return decode("decode_attention_append", q, k_cache, v_cache, lengths, k_new, v_new);
}

}  // namespace
#endif  // GPT2FAST_CUDA

// Inference only: no autograd formula (gpt2fast.ops runs the reference where inputs require grad).
TORCH_LIBRARY_FRAGMENT(gpt2fast, m) {
  m.def("decode_attention_native(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths) -> Tensor");
  m.def("decode_attention_append_native(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lengths, "
        "Tensor k_new, Tensor v_new) -> Tensor");
}

#ifdef GPT2FAST_CUDA
TORCH_LIBRARY_IMPL(gpt2fast, CUDA, m) {
  m.impl("decode_attention_native", &decode_attention_cuda);
  m.impl("decode_attention_append_native", &decode_attention_append_cuda);
}
#endif  // GPT2FAST_CUDA

namespace {

// The CPU kernel: fp32, any head dim, lengths read here (they are on the host) and checked.
at::Tensor decode_cpu(const char* op, const at::Tensor& q, at::Tensor k_cache, at::Tensor v_cache,
                      const at::Tensor& lengths, const c10::optional<at::Tensor>& k_new,
                      const c10::optional<at::Tensor>& v_new) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k_cache", &k_cache},
                                {"v_cache", &v_cache}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, op, ": ", name,
                " must be a float32 CPU tensor (the CPU kernel's), got ", t->scalar_type(), " on ", t->device());
  }
  const DecodeShape shape = decode_shape(op, q, k_cache, v_cache, lengths);
  const int64_t batch = shape.batch, heads = shape.heads, queries = shape.queries, head_dim = shape.head_dim;
  const int64_t cache_len = shape.cache_len;
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op, ": the caches' rows must be dense (stride 1)");
  const at::Tensor lengths64 = lengths.to(at::kLong).contiguous();
  const int64_t* n = lengths64.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(n[b] >= queries && n[b] <= cache_len, op, ": every length must be in [", queries, ", ", cache_len,
                "], got ", n[b], " for sequence ", b);
  }
  at::Tensor new_k, new_v;
  if (k_new.has_value()) {
    TORCH_CHECK(k_new->sizes() == q.sizes() && v_new->sizes() == q.sizes() && k_new->scalar_type() == at::kFloat &&
                    v_new->scalar_type() == at::kFloat && k_new->device().is_cpu() && v_new->device().is_cpu(),
                op, ": k_new and v_new must be float32 CPU tensors of q's shape ", q.sizes());
    new_k = k_new->stride(3) == 1 ? *k_new : k_new->contiguous();
    new_v = v_new->stride(3) == 1 ? *v_new : v_new->contiguous();
  }
  const at::Tensor dense_q = q.stride(3) == 1 ? q : q.contiguous();
  at::Tensor out = at::empty({batch, heads, queries, head_dim}, q.options());
  if (out.numel() == 0) return out;
  const auto strides = [](const at::Tensor& t) {
    return gpt2fast::DecodeStrides{t.stride(0), t.stride(1), t.stride(2)};
  };
  const bool append = new_k.defined();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    gpt2fast::decode_attention_cpu(dense_q.data_ptr<float>(), strides(dense_q), k_cache.data_ptr<float>(),
                                   strides(k_cache), v_cache.data_ptr<float>(), strides(v_cache),
                                   append ? new_k.data_ptr<float>() : nullptr,
                                   append ? strides(new_k) : gpt2fast::DecodeStrides{},
                                   append ? new_v.data_ptr<float>() : nullptr,
                                   append ? strides(new_v) : gpt2fast::DecodeStrides{}, n, out.data_ptr<float>(),
                                   heads, queries, cache_len, head_dim, begin, end);
  });
  return out;
}

at::Tensor decode_attention_cpu_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& lengths) {
  return decode_cpu("decode_attention", q, k_cache, v_cache, lengths, c10::nullopt, c10::nullopt);
}

at::Tensor decode_attention_append_cpu_op(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                          const at::Tensor& lengths, const at::Tensor& k_new, const at::Tensor& v_new) {
  return decode_cpu("decode_attention_append", q, k_cache, v_cache, lengths, k_new, v_new);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt2fast, CPU, m) {
  m.impl("decode_attention_native", &decode_attention_cpu_op);
  m.impl("decode_attention_append_native", &decode_attention_append_cpu_op);
}

// ---- linear_cross_entropy: the row kernel (the chunks and matmuls are ATen's, in native_backend.py) ----

#ifdef GPT2FAST_CUDA
namespace {

// The loss of every row of logits [rows, V] against targets [rows] (fp32 [rows], 0 where the target is
// ignore_index); with write_grad, logits are overwritten in place with their gradient times scale.
at::Tensor cross_entropy_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scale,
                                   int64_t ignore_index, bool write_grad) {
  const char* op = "cross_entropy_rows";
  check_cuda(op, "logits", logits, logits);
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, op, ": logits must be [rows, V] with unit-stride rows, ",
              "got shape ", logits.sizes(), " and strides ", logits.strides());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have at least one column");
  TORCH_CHECK(targets.is_cuda() && targets.device() == logits.device() && targets.scalar_type() == at::kLong &&
                  targets.dim() == 1 && targets.size(0) == logits.size(0),
              op, ": targets must be int64 [", logits.size(0), "] on ", logits.device(), ", got ",
              targets.scalar_type(), " ", targets.sizes(), " on ", targets.device());
  TORCH_CHECK(scale.is_cuda() && scale.device() == logits.device() && scale.scalar_type() == at::kFloat &&
                  scale.numel() == 1,
              op, ": scale must be one float32 on ", logits.device());
  TORCH_CHECK(logits.size(0) <= INT32_MAX, op, ": at most ", INT32_MAX, " rows, got ", logits.size(0));
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  const at::Tensor dense_targets = targets.contiguous();
  check_launch(op, gpt2fast::cross_entropy_rows_cuda(dtype_of(logits), logits.data_ptr(), logits.stride(0),
                                                     dense_targets.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                                     scale.data_ptr<float>(), logits.size(0), logits.size(1),
                                                     ignore_index, write_grad, c10::cuda::getCurrentCUDAStream()));
  return loss;
}

}  // namespace
#endif  // GPT2FAST_CUDA

TORCH_LIBRARY_FRAGMENT(gpt2fast, m) {
  m.def("cross_entropy_rows_native(Tensor(a!) logits, Tensor targets, Tensor scale, int ignore_index, "
        "bool write_grad) -> Tensor");
}

#ifdef GPT2FAST_CUDA
TORCH_LIBRARY_IMPL(gpt2fast, CUDA, m) { m.impl("cross_entropy_rows_native", &cross_entropy_rows_cuda); }
#endif  // GPT2FAST_CUDA


namespace {

// ---- sample ----

at::Tensor sample_cpu(const at::Tensor& logits, double temperature, int64_t top_k, double top_p,
                      const at::Tensor& seed) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "sample: logits must be [B, V] with V >= 1, got ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "sample: logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "sample: temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(top_k >= 0, "sample: top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "sample: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "sample: seed must be one int64 on the CPU, got ", seed.sizes(), " ", seed.scalar_type());
  const at::Tensor x = logits.to(at::kFloat).contiguous();  // the reference's scores are fp32 too
  // The draw loop needs a row it can draw from: no NaN, and some logit above -inf.
  TORCH_CHECK(!at::isnan(x).any().item<bool>(), "sample: logits contain NaN");
  TORCH_CHECK((x > -INFINITY).any(1).all().item<bool>(), "sample: a row of logits is all -inf, so no token can be drawn");
  const int64_t rows = x.size(0), vocab = x.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* ids = out.data_ptr<int64_t>();
  const auto key = static_cast<uint64_t>(seed.item<int64_t>());
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      ids[r] = gpt2fast::sample_row_cpu(data + r * vocab, vocab, static_cast<float>(temperature), top_k,
                                        static_cast<float>(top_p), key, static_cast<uint64_t>(r));
    }
  });
  return out;
}

// Greedy: the first of equal maxima per row, as argmax. The caller (gpt2fast.ops.sample) has checked that no row
// holds NaN.
at::Tensor greedy_cpu(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.size(1) < (int64_t{1} << 31),
              "greedy: logits must be [B, V] with 1 <= V < 2^31, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "greedy: logits must be float32, got ", logits.scalar_type());
  const at::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* ids = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) ids[r] = gpt2fast::greedy_row_cpu(data + r * vocab, vocab);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2fast, m) {
  m.def("sample_native(Tensor logits, float temperature, int top_k, float top_p, Tensor seed) -> Tensor");
  m.def("greedy_native(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2fast, CPU, m) {
  m.impl("sample_native", &sample_cpu);
  m.impl("greedy_native", &greedy_cpu);
}

namespace {

// ---- quantized_linear ----

gpt2fast::WeightType weight_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kChar: return gpt2fast::WeightType::Int8;
    case at::kBFloat16: return gpt2fast::WeightType::BFloat16;
    case at::kFloat: return gpt2fast::WeightType::Float32;
    default: TORCH_CHECK(false, "quantized_linear: weight must be int8, bfloat16 or float32, got ", dtype);
  }
}

const char* const kIsaNames[] = {"portable", "avx2", "avx512", "amx"};  // by gpt2fast::CpuIsa
const char* const kFormNames[] = {"dot", "broadcast", "amx-int8", "amx-bf16"};  // by gpt2fast::QuantizedForm

// The build named `name` if this CPU runs it, else -1.
int isa_index(const std::string& name) {
  for (int i = 0; i <= static_cast<int>(gpt2fast::quantized_linear_cpu_best_isa()); ++i) {
    if (name == kIsaNames[i]) return i;
  }
  return -1;
}

const char* widest_isa() { return kIsaNames[static_cast<int>(gpt2fast::quantized_linear_cpu_best_isa())]; }

gpt2fast::CpuIsa cpu_isa(const std::string& name) {
  const int i = isa_index(name);
  TORCH_CHECK(i >= 0, "quantized_linear: isa must be one this CPU runs (up to ", widest_isa(), "), got '", name, "'");
  return static_cast<gpt2fast::CpuIsa>(i);
}

// The build a call without an isa runs: the widest this CPU runs, or GPT2FAST_CPU_ISA's where that is set (read
// at each call, so that a benchmark can set it between calls).
gpt2fast::CpuIsa default_isa() {
  const char* capped = std::getenv("GPT2FAST_CPU_ISA");
  if (capped == nullptr || *capped == '\0') return gpt2fast::quantized_linear_cpu_best_isa();
  const int i = isa_index(capped);
  TORCH_CHECK(i >= 0, "GPT2FAST_CPU_ISA must name a build this CPU runs (up to ", widest_isa(), "), got '", capped,
              "'");
  return static_cast<gpt2fast::CpuIsa>(i);
}

void quantized_linear_out_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& bias, at::Tensor& out, const std::string& isa) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "quantized_linear: x must be float32 [..., in], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), "quantized_linear: weight must be [out, ",
              x.size(-1), "], got ", weight.sizes());
  const gpt2fast::WeightType type = weight_type(weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  for (const auto* t : {&scale, &bias}) {
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == at::kFloat && (*t)->dim() == 1 && (*t)->size(0) == N),
                "quantized_linear: scale and bias must be float32 [", N, "]");
  }
  TORCH_CHECK(type != gpt2fast::WeightType::Int8 || scale.has_value(), "quantized_linear: int8 weights need a scale");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.sizes() == at::IntArrayRef(shape) && out.is_contiguous(),
              "quantized_linear: out must be a contiguous float32 tensor of shape ", at::IntArrayRef(shape), ", got ",
              out.scalar_type(), " ", out.sizes());
  const gpt2fast::CpuIsa chosen = isa.empty() ? default_isa() : cpu_isa(isa);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous(), w = weight.contiguous();
  const at::Tensor s = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = x2.size(0);
  // Many rows: the kernel reads a copy of x (transposed, or in parts for the tiles), packed here: first what needs
  // whole rows (the amx-int8 form's power of two per row), then a block of columns a task.
  const gpt2fast::QuantizedForm form = gpt2fast::quantized_linear_cpu_form(M, type, chosen);
  const int64_t packed_bytes = gpt2fast::quantized_linear_cpu_packed_bytes(M, K, form, chosen);
  at::Tensor packed;
  if (packed_bytes > 0) {
    packed = at::empty({packed_bytes}, x2.options().dtype(at::kByte));
    if (form == gpt2fast::QuantizedForm::AmxInt8) {  // the only form with a pass over whole rows
      at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        gpt2fast::quantized_linear_cpu_pack_rows(x2.data_ptr<float>(), M, K, packed.data_ptr(), begin, end, form,
                                                 chosen);
      });
    }
    at::parallel_for(0, (K + 31) / 32, 8, [&](int64_t begin, int64_t end) {  // blocks of 32 columns
      gpt2fast::quantized_linear_cpu_pack(x2.data_ptr<float>(), M, K, packed.data_ptr(), begin, end, form, chosen);
    });
  }
  // Each thread streams its own contiguous share of the weight rows, 96 at a time at least (a multiple of every
  // tile's weight rows).
  constexpr int64_t rows_per_task = 96;
  at::parallel_for(0, (N + rows_per_task - 1) / rows_per_task, 1, [&](int64_t begin, int64_t end) {
    gpt2fast::quantized_linear_cpu(x2.data_ptr<float>(), packed_bytes > 0 ? packed.data_ptr() : nullptr, M, K,
                                   w.data_ptr(), type, s.defined() ? s.data_ptr<float>() : nullptr,
                                   b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(), N,
                                   begin * rows_per_task, std::min(N, end * rows_per_task), form, chosen);
  });
}

at::Tensor quantized_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& bias) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  TORCH_CHECK(!shape.empty() && weight.dim() == 2, "quantized_linear: x must be [..., in] and weight [out, in], got ",
              x.sizes(), " and ", weight.sizes());
  shape.back() = weight.size(0);
  at::Tensor out = at::empty(shape, x.options());
  quantized_linear_out_cpu(x, weight, scale, bias, out, "");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2fast, m) {
  m.def("quantized_linear_native(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor");
  // The same into `out`, with the vector instructions named ("": the widest this CPU runs): for the tests.
  m.def("quantized_linear_out_native(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, Tensor(a!) out, "
        "str isa) -> ()");
}

TORCH_LIBRARY_IMPL(gpt2fast, CPU, m) {
  m.impl("quantized_linear_native", &quantized_linear_cpu);
  m.impl("quantized_linear_out_native", &quantized_linear_out_cpu);
}

#ifdef GPT2FAST_CUDA
namespace {

// sample_cpu's checks, except the values: NaN and all -inf rows are gpt2fast.ops' to check, on the device,
// as reading them here would wait for the GPU.
at::Tensor sample_cuda(const at::Tensor& logits, double temperature, int64_t top_k, double top_p,
                       const at::Tensor& seed) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "sample: logits must be [B, V] with V >= 1, got ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) <= (int64_t{1} << 30), "sample: V must be at most 2^30 on CUDA, got ", logits.size(1));
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "sample: logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "sample: temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(top_k >= 0, "sample: top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "sample: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device() == logits.device(),
              "sample: seed must be one int64 on ", logits.device(), ", got ", seed.sizes(), " ", seed.scalar_type(),
              " on ", seed.device());
  c10::cuda::CUDAGuard guard(logits.device());
  // The kernel reads fp32, fp16 and bf16 rows of any stride; other floating types as the reference, in fp32.
  at::Tensor x = logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                         logits.scalar_type() == at::kBFloat16
                     ? logits
                     : logits.to(at::kFloat);
  if (x.stride(1) != 1) x = x.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  check_launch("sample", gpt2fast::sample_cuda(dtype_of(x), x.data_ptr(), x.stride(0), x.size(0), x.size(1),
                                               static_cast<float>(temperature), top_k, static_cast<float>(top_p),
                                               seed.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                               c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt2fast, CUDA, m) { m.impl("sample_native", &sample_cuda); }
#endif  // GPT2FAST_CUDA

namespace {

template <std::size_t N>
pybind11::tuple tuple_of(const int64_t (&values)[N]) {
  pybind11::tuple t(N);
  for (std::size_t i = 0; i < N; ++i) t[i] = values[i];
  return t;
}

}  // namespace

// Python imports the module to load the operators above; it also says what was compiled in, and the
// kernels' limits (gpt2fast.h's), which gpt2fast/ops/native_backend.py checks inputs against.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef GPT2FAST_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("limits", [] {
    pybind11::dict limits;
    limits["layer_norm_max_width"] = gpt2fast::layer_norm_max_width;
    limits["causal_attention_head_dims"] = tuple_of(gpt2fast::causal_attention_head_dims);
    limits["decode_attention_head_dims"] = tuple_of(gpt2fast::decode_attention_head_dims);
    limits["decode_attention_max_queries"] = gpt2fast::decode_attention_max_queries;
    return limits;
  }, "The kernels' limits, by their names in csrc/gpt2fast.h.");
  m.def("bias_gelu_cpu_vectorized", &gpt2fast::bias_gelu_cpu_vectorized,
        "Whether the CPU bias_gelu kernel runs its AVX-512 build here (else its portable one).");
  m.def("greedy_cpu_vectorized", &gpt2fast::greedy_cpu_vectorized,
        "Whether the CPU greedy kernel runs its AVX-512 build here (else a plain loop).");
  m.def("decode_attention_cpu_vectorized", &gpt2fast::decode_attention_cpu_vectorized,
        "Whether the CPU decode_attention kernel runs its AVX-512 build here (else its portable one).");
  m.def("quantized_linear_isas", [] {
    std::vector<std::string> isas;
    for (int i = 0; i <= static_cast<int>(gpt2fast::quantized_linear_cpu_best_isa()); ++i) isas.push_back(kIsaNames[i]);
    return isas;
  }, "The vector instructions the CPU quantized_linear kernel can run with here, the widest (its choice) last.");
  m.def("quantized_linear_form", [](int64_t rows, const std::string& isa, const std::string& weight) {
    const char* const kWeightNames[] = {"fp32", "int8", "bf16"};  // by gpt2fast::WeightType
    int type = 0;
    while (type < 3 && weight != kWeightNames[type]) ++type;
    TORCH_CHECK(type < 3, "quantized_linear_form: weight must be int8, bf16 or fp32, got '", weight, "'");
    const gpt2fast::CpuIsa build = isa.empty() ? default_isa() : cpu_isa(isa);
    return std::string(kFormNames[static_cast<int>(gpt2fast::quantized_linear_cpu_form(rows, static_cast<gpt2fast::WeightType>(type), build))]);
  }, pybind11::arg("rows"), pybind11::arg("isa") = "", pybind11::arg("weight") = "int8",
     "Which form the CPU quantized_linear kernel's build `isa` (default: the one a call runs) takes for this many rows "
     "of x and weights of this type: "
     "'dot' (dot products along the weight rows), 'broadcast' (x transposed, each weight broadcast to a vector of "
     "rows), 'amx-int8' (AMX int8 tiles, x in four 8-bit parts) or 'amx-bf16' (AMX bf16 tiles, x in three bf16 "
     "parts).");
}
