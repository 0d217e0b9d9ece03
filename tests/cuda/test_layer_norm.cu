// The LayerNorm kernels (csrc/layer_norm.cu) against a host reference in double, for each element type:
// widths that take a warp and a block per row, powers of two and not, the widest (8192) and tails
// (1, 17, 1025, 4097); one row, 77 and many (more than the backward's blocks, so that blocks and warps
// run several rows each); with and without the residual; rows padded apart (16-byte vectors) and rows an
// odd number of elements apart (one element at a time). Every output starts as NaN with NaN past its end,
// which must stay NaN; the backward runs twice and must give the same bits.
#include <algorithm>
#include <string>

#include "check.h"

namespace {

constexpr float kEps = 1e-5f;
constexpr size_t kGuard = 64;  // NaN elements past each output's end, which no kernel may write

template <typename T>
float round_to(float x) {
  return check::to_float(check::from_float<T>(x));
}

template <typename T>
bool guard_intact(const std::string& what, const T* device, size_t n) {
  for (float v : check::to_host(device + n, kGuard)) {
    if (!std::isnan(v)) {
      std::fprintf(stderr, "FAIL %s: written past its end\n", what.c_str());
      return false;
    }
  }
  return true;
}

struct Case {
  int64_t rows, width, x_stride;
  bool residual;
};

struct Reference {
  std::vector<double> h, y, mean, rstd, dh, dweight, dbias;
};

// The forward and backward in double from exactly the values the kernels read (h rounded as they round it).
Reference reference(const Case& c, const std::vector<float>& x, const std::vector<float>& residual,
                    const std::vector<float>& weight, const std::vector<float>& bias, const std::vector<float>& grad_y,
                    const std::vector<float>& grad_h, float (*round)(float)) {
  const int64_t n = c.width;
  Reference r{std::vector<double>(c.rows * n), std::vector<double>(c.rows * n), std::vector<double>(c.rows),
              std::vector<double>(c.rows), std::vector<double>(c.rows * n), std::vector<double>(n, 0.0),
              std::vector<double>(n, 0.0)};
  for (int64_t row = 0; row < c.rows; ++row) {
    double* h = &r.h[row * n];
    for (int64_t i = 0; i < n; ++i) {
      const float xi = x[row * c.x_stride + i];
      h[i] = c.residual ? round(xi + residual[row * n + i]) : xi;
    }
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += h[i];
    mean /= n;
    for (int64_t i = 0; i < n; ++i) var += (h[i] - mean) * (h[i] - mean);
    const double rstd = 1.0 / std::sqrt(var / n + kEps);
    r.mean[row] = mean;
    r.rstd[row] = rstd;
    double mean_wdy = 0.0, mean_wdy_xhat = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double xhat = (h[i] - mean) * rstd, dy = grad_y[row * n + i];
      r.y[row * n + i] = xhat * weight[i] + bias[i];
      mean_wdy += weight[i] * dy / n;
      mean_wdy_xhat += weight[i] * dy * xhat / n;
      r.dweight[i] += dy * xhat;
      r.dbias[i] += dy;
    }
    for (int64_t i = 0; i < n; ++i) {
      const double xhat = (h[i] - mean) * rstd, wdy = weight[i] * double(grad_y[row * n + i]);
      r.dh[row * n + i] = rstd * (wdy - mean_wdy - xhat * mean_wdy_xhat) + (c.residual ? grad_h[row * n + i] : 0.0);
    }
  }
  return r;
}

template <typename T>
bool run_case(const Case& c, uint64_t seed) {
  const int64_t n = c.width, dense = c.rows * n;
  const int64_t allocated = std::max<int64_t>(dense, 1);  // no zero-byte buffers where there are no rows
  const std::string name = std::string(check::dtype_name<T>) + " " + std::to_string(c.rows) + "x" + std::to_string(n) +
                           (c.residual ? " +residual" : "") +
                           (c.x_stride != n ? " stride " + std::to_string(c.x_stride) : "");
  // A non-zero mean, so that a kernel letting missing columns into the statistics shows.
  std::vector<float> x, residual, weight, bias, grad_y, grad_h;
  T* d_x = check::to_device<T>(check::randn(std::max<int64_t>(c.rows * c.x_stride, 1), seed, 2.0f, 3.0f), &x);
  T* d_residual = c.residual ? check::to_device<T>(check::randn(allocated, seed + 1, 1.0f, -1.0f), &residual) : nullptr;
  T* d_weight = check::to_device<T>(check::randn(n, seed + 2, 0.1f, 1.0f), &weight);
  T* d_bias = check::to_device<T>(check::randn(n, seed + 3, 0.1f), &bias);
  T* d_grad_y = check::to_device<T>(check::randn(allocated, seed + 4), &grad_y);
  T* d_grad_h = c.residual ? check::to_device<T>(check::randn(allocated, seed + 5), &grad_h) : nullptr;
  T* d_y = check::poisoned<T>(dense + kGuard);
  T* d_h = c.residual ? check::poisoned<T>(dense + kGuard) : nullptr;
  float* d_mean = check::poisoned<float>(c.rows + kGuard);
  float* d_rstd = check::poisoned<float>(c.rows + kGuard);

  CHECK_CUDA(gpt2fast::layer_norm_forward_cuda(check::dtype_of<T>, d_x, c.x_stride, d_residual, n, d_weight, d_bias, d_y, d_h,
                                               d_mean, d_rstd, c.rows, n, kEps, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const Reference want = reference(c, x, residual, weight, bias, grad_y, grad_h, round_to<T>);
  const double rtol = check::rtol<T>();
  bool ok = check::close((name + " y").c_str(), check::to_host(d_y, dense), want.y, rtol, rtol) &&
            guard_intact(name + " y", d_y, dense);
  if (c.residual) {
    // The kernel rounds x + residual to T exactly as the host does: no tolerance.
    ok = ok && check::close((name + " h").c_str(), check::to_host(d_h, dense), want.h, 0.0, 0.0) &&
         guard_intact(name + " h", d_h, dense);
  }
  ok = ok && check::close((name + " mean").c_str(), check::to_host(d_mean, c.rows), want.mean, 1e-5, 1e-5) &&
       check::close((name + " rstd").c_str(), check::to_host(d_rstd, c.rows), want.rstd, 1e-5, 1e-5) &&
       guard_intact(name + " mean", d_mean, c.rows) && guard_intact(name + " rstd", d_rstd, c.rows);

  // The backward takes h, which is x itself (rows x_stride apart) without a residual.
  const T* d_saved = c.residual ? d_h : d_x;
  const int64_t saved_stride = c.residual ? n : c.x_stride;
  int64_t workspace_elements = 0;
  CHECK_CUDA(gpt2fast::layer_norm_backward_workspace(c.rows, n, &workspace_elements));
  std::vector<float> first_dh, first_dweight;
  for (int run = 0; run < 2 && ok; ++run) {
    T* d_dh = check::poisoned<T>(dense + kGuard);
    T* d_dweight = check::poisoned<T>(n + kGuard);
    T* d_dbias = check::poisoned<T>(n + kGuard);
    float* d_workspace = check::poisoned<float>(workspace_elements);  // every element read must be written first
    CHECK_CUDA(gpt2fast::layer_norm_backward_cuda(check::dtype_of<T>, d_grad_y, n, d_grad_h, n, d_saved, saved_stride, d_weight,
                                                  d_mean, d_rstd, d_dh, d_dweight, d_dbias, d_workspace,
                                                  workspace_elements, c.rows, n, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<float> dh = check::to_host(d_dh, dense), dweight = check::to_host(d_dweight, n);
    if (run == 0) {
      // dweight and dbias sum over the rows: their rounding error grows with the row count.
      const double sum_atol = rtol * 2.0 * std::sqrt(double(c.rows));
      ok = check::close((name + " dh").c_str(), dh, want.dh, rtol, rtol) && guard_intact(name + " dh", d_dh, dense) &&
           check::close((name + " dweight").c_str(), dweight, want.dweight, rtol, sum_atol) &&
           check::close((name + " dbias").c_str(), check::to_host(d_dbias, n), want.dbias, rtol, sum_atol) &&
           guard_intact(name + " dweight", d_dweight, n) && guard_intact(name + " dbias", d_dbias, n);
      first_dh = dh;
      first_dweight = dweight;
    } else if (dh != first_dh || dweight != first_dweight) {  // bitwise: no atomics, a fixed order of adds
      std::fprintf(stderr, "FAIL %s: the backward gave different bits on a second run\n", name.c_str());
      ok = false;
    }
    for (void* p : {static_cast<void*>(d_dh), static_cast<void*>(d_dweight), static_cast<void*>(d_dbias),
                    static_cast<void*>(d_workspace)}) {
      CHECK_CUDA(cudaFree(p));
    }
  }
  for (void* p : {static_cast<void*>(d_x), static_cast<void*>(d_residual), static_cast<void*>(d_weight),
                  static_cast<void*>(d_bias), static_cast<void*>(d_grad_y), static_cast<void*>(d_grad_h),
                  static_cast<void*>(d_y), static_cast<void*>(d_h), static_cast<void*>(d_mean),
                  static_cast<void*>(d_rstd)}) {
    CHECK_CUDA(cudaFree(p));
  }
  return ok;
}

template <typename T>
int failures(uint64_t& seed) {
  int failed = 0;
  for (int64_t width : {768, 1000, 1536, 1600, 8192, 1, 17, 1025, 4097}) {
    const int64_t many = width <= 2048 ? 4099 : 1031;
    for (int64_t rows : {int64_t{1}, int64_t{77}, many}) {
      for (bool residual : {false, true}) failed += !run_case<T>({rows, width, width, residual}, seed += 10);
    }
    failed += !run_case<T>({77, width, width + 8, false}, seed += 10);  // padded rows: still 16-byte vectors
    failed += !run_case<T>({77, width, width + 1, true}, seed += 10);   // odd row stride: element by element
  }
  failed += !run_case<T>({0, 768, 768, true}, seed += 10);  // no rows: dweight and dbias are zeros
  return failed;
}

}  // namespace

int main() {
  uint64_t seed = 1;
  const int failed = failures<float>(seed) + failures<__half>(seed) + failures<__nv_bfloat16>(seed);
  if (failed) std::fprintf(stderr, "%d layer_norm case(s) failed\n", failed);
  else std::printf("all layer_norm cases passed\n");
  return failed ? 1 : 0;
}
