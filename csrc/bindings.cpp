// The extension module gpt2fast._C: the `cuda` backend's ops as PyTorch operators, gpt2fast::<op>_cuda,
// with a CPU and (where built with CUDA) a CUDA kernel each. Every binding checks its tensors (device,
// dtype, layout, shapes) and its parameters with TORCH_CHECK, so that a kernel only ever sees what it
// takes, then calls a launcher from gpt2fast.h. gpt2fast/ops/cuda_backend.py adds the fake (meta)
// functions and the autograd formulas, and registers the ops with gpt2fast.ops.
#include <torch/extension.h>

#include <ATen/Parallel.h>
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

}  // namespace
#endif  // GPT2FAST_CUDA

// Each op's section holds its bindings (checks, then a launcher from gpt2fast.h), its operator schema
// gpt2fast::<op>_cuda, and its kernels per dispatch key (CUDA ones only where built with CUDA).

// ---- layer_norm ----

// ---- bias_gelu and gelu_mlp ----

// ---- causal_attention ----

// ---- decode_attention ----

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2fast, m) {
  m.def("sample_cuda(Tensor logits, float temperature, int top_k, float top_p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2fast, CPU, m) { m.impl("sample_cuda", &sample_cpu); }

// (the sample CUDA kernel's binding and TORCH_LIBRARY_IMPL(gpt2fast, CUDA, m) go here)

// Python imports the module to load the operators above; it also says what was compiled in.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef GPT2FAST_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
