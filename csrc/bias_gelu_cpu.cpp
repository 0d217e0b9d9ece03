// GPT-2's GELU of x + bias on the CPU, fp32 (the weight-only quantized MLP's activation, between its two
// matmuls): y = gelu_tanh(z), z = x + bias, computed as z / (1 + e^(-2u)) with u = sqrt(2/pi) (z + 0.044715 z^3),
// which is 0.5 z (1 + tanh u) (0.5 (1 + tanh u) is the logistic function of 2u). Forward only.
//
// Two builds, picked at run time by __builtin_cpu_supports: AVX-512 (e^x by a polynomial, cpu_exp.h) and
// portable (std::tanh, the formula as the reference writes it).
#include <cmath>
#include <cstdint>

#include "gpt2fast.h"

#include "cpu_x86.h"

namespace gpt2fast {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

namespace portable {
void row(const float* x, const float* bias, float* y, int64_t width) {
  for (int64_t i = 0; i < width; ++i) {
    const float z = x[i] + (bias ? bias[i] : 0.f);
    y[i] = 0.5f * z * (1.f + std::tanh(kSqrt2OverPi * (z + kCubic * z * z * z)));
  }
}
}  // namespace portable

#ifdef GPT2FAST_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
namespace avx512 {
#include "cpu_exp.h"  // e^x

inline __m512 gelu(__m512 z) {
  const __m512 z3 = _mm512_mul_ps(_mm512_mul_ps(z, z), z);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(kSqrt2OverPi), _mm512_fmadd_ps(_mm512_set1_ps(kCubic), z3, z));
  const __m512 e = exp(_mm512_mul_ps(_mm512_set1_ps(-2.f), u));  // inf for z below about -9: y = -0
  return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

void row(const float* x, const float* bias, float* y, int64_t width) {
  for (int64_t i = 0; i < width; i += 16) {
    const __mmask16 mask = static_cast<__mmask16>(width - i >= 16 ? 0xffff : (1u << (width - i)) - 1);
    __m512 z = _mm512_maskz_loadu_ps(mask, x + i);
    if (bias) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(mask, bias + i));
    _mm512_mask_storeu_ps(y + i, mask, gelu(z));
  }
}
}  // namespace avx512
#pragma GCC pop_options
#endif

}  // namespace

bool bias_gelu_cpu_vectorized() {
#ifdef GPT2FAST_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

void bias_gelu_cpu(const float* x, int64_t x_row_stride, const float* bias, float* y, int64_t width,
                   int64_t row_begin, int64_t row_end) {
  const bool vectorized = bias_gelu_cpu_vectorized();
  for (int64_t r = row_begin; r < row_end; ++r) {
#ifdef GPT2FAST_X86
    if (vectorized) {
      avx512::row(x + r * x_row_stride, bias, y + r * width, width);
      continue;
    }
#endif
    (void)vectorized;
    portable::row(x + r * x_row_stride, bias, y + r * width, width);
  }
}

}  // namespace gpt2fast
