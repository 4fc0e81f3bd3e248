// CPU kernels of medcam_fast::compose. Forward writes both halves of the [2N,C,H,W] buffer in one
// sweep over each (n, c) plane; backward sums grad_m over channels in one sweep per pixel chunk.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/isa.h"

namespace medcam_fast {
namespace {

constexpr int64_t kPixelsPerTask = 4096;

// One (n, c) plane span: e = m*x + (1-m)*b, et = m*x + (1-m)*r. `b_step` is 0 for a per-channel baseline.
template <typename T>
MEDCAM_ALWAYS_INLINE void compose_span(const T* __restrict x, const T* __restrict m, const T* __restrict b,
                                       int64_t b_step, const T* __restrict r, T* __restrict e, T* __restrict et,
                                       int64_t n) {
  if (b_step == 0) {
    const T bv = b[0];
    for (int64_t j = 0; j < n; ++j) {
      const T mj = m[j], keep = mj * x[j], rest = T(1) - mj;
      e[j] = keep + rest * bv;
      et[j] = keep + rest * r[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const T mj = m[j], keep = mj * x[j], rest = T(1) - mj;
      e[j] = keep + rest * b[j];
      et[j] = keep + rest * r[j];
    }
  }
}

MEDCAM_CPU_CLONES(void, span, compose_span<float>,
                  (const float* x, const float* m, const float* b, int64_t s, const float* r, float* e, float* et,
                   int64_t n),
                  (x, m, b, s, r, e, et, n))
MEDCAM_CPU_CLONES(void, span, compose_span<double>,
                  (const double* x, const double* m, const double* b, int64_t s, const double* r, double* e,
                   double* et, int64_t n),
                  (x, m, b, s, r, e, et, n))

// Accumulates one channel of the backward into gm (and writes gx when non-null).
template <typename T>
MEDCAM_ALWAYS_INLINE void compose_grad_span(const T* __restrict ge, const T* __restrict get,
                                            const T* __restrict x, const T* __restrict m, const T* __restrict b,
                                            int64_t b_step, const T* __restrict r, T* __restrict gm,
                                            T* __restrict gx, int64_t n) {
  if (b_step == 0) {
    const T bv = b[0];
    for (int64_t j = 0; j < n; ++j) gm[j] += ge[j] * (x[j] - bv) + get[j] * (x[j] - r[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) gm[j] += ge[j] * (x[j] - b[j]) + get[j] * (x[j] - r[j]);
  }
  if (gx)
    for (int64_t j = 0; j < n; ++j) gx[j] = (ge[j] + get[j]) * m[j];
}

MEDCAM_CPU_CLONES(void, grad_span, compose_grad_span<float>,
                  (const float* ge, const float* get, const float* x, const float* m, const float* b, int64_t s,
                   const float* r, float* gm, float* gx, int64_t n),
                  (ge, get, x, m, b, s, r, gm, gx, n))
MEDCAM_CPU_CLONES(void, grad_span, compose_grad_span<double>,
                  (const double* ge, const double* get, const double* x, const double* m, const double* b,
                   int64_t s, const double* r, double* gm, double* gx, int64_t n),
                  (ge, get, x, m, b, s, r, gm, gx, n))

// Copies n values of src, starting at src[0] with stride `step` (0 broadcasts), into dst as acc_t.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t step, int64_t n, std::vector<acc_t>& dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    dst.resize(n);
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j * step]);
    return dst.data();
  }
}

// Forward of one task: pixels [s0, s0+len) of plane (n, c).
template <typename scalar_t>
void compose_task(const ComposeInputs& in, int64_t plane, int64_t s0, int64_t len, scalar_t* out,
                  std::array<std::vector<at::opmath_type<scalar_t>>, 6>& scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = in.N, C = in.C, HW = in.HW, n = plane / C, c = plane % C, off = plane * HW + s0;
  const scalar_t *x = in.x.const_data_ptr<scalar_t>() + off, *m = in.m.const_data_ptr<scalar_t>() + n * HW + s0,
                 *r = in.background.const_data_ptr<scalar_t>() + off;
  const scalar_t* b = in.baseline.const_data_ptr<scalar_t>() + (in.baseline_per_channel ? c : off);
  const int64_t b_step = in.baseline_per_channel ? 0 : 1;
  scalar_t *e = out + off, *et = out + N * C * HW + off;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    span(x, m, b, b_step, r, e, et, len);
  } else {
    auto& [bx, bm, bb, br, be, bet] = scratch;
    be.resize(len);
    bet.resize(len);
    span(as_acc(x, 1, len, bx), as_acc(m, 1, len, bm), as_acc(b, b_step, len, bb), 1, as_acc(r, 1, len, br),
         be.data(), bet.data(), len);
    for (int64_t j = 0; j < len; ++j) {
      e[j] = static_cast<scalar_t>(be[j]);
      et[j] = static_cast<scalar_t>(bet[j]);
    }
  }
}

// Backward of one task: pixels [s0, s0+len) of sample n, all channels.
template <typename scalar_t>
void compose_grad_task(const ComposeInputs& in, const scalar_t* g, int64_t n, int64_t s0, int64_t len,
                       scalar_t* gm_out, scalar_t* gx_out, std::array<std::vector<at::opmath_type<scalar_t>>, 8>& t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = in.N, C = in.C, HW = in.HW;
  auto& gm = t[0];
  auto& gx = t[1];
  gm.assign(len, acc_t(0));
  gx.resize(len);
  const acc_t* m = as_acc(in.m.const_data_ptr<scalar_t>() + n * HW + s0, 1, len, t[2]);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t off = (n * C + c) * HW + s0;
    const scalar_t *x = in.x.const_data_ptr<scalar_t>() + off, *r = in.background.const_data_ptr<scalar_t>() + off;
    const scalar_t* b = in.baseline.const_data_ptr<scalar_t>() + (in.baseline_per_channel ? c : off);
    const int64_t b_step = in.baseline_per_channel ? 0 : 1;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      grad_span(g + off, g + N * C * HW + off, x, m, b, b_step, r, gm.data(), gx_out ? gx_out + off : nullptr, len);
    } else {
      grad_span(as_acc(g + off, 1, len, t[3]), as_acc(g + N * C * HW + off, 1, len, t[4]), as_acc(x, 1, len, t[5]), m,
                as_acc(b, b_step, len, t[6]), 1, as_acc(r, 1, len, t[7]), gm.data(), gx_out ? gx.data() : nullptr, len);
      if (gx_out)
        for (int64_t j = 0; j < len; ++j) gx_out[off + j] = static_cast<scalar_t>(gx[j]);
    }
  }
  for (int64_t j = 0; j < len; ++j) gm_out[n * HW + s0 + j] = static_cast<scalar_t>(gm[j]);
}

at::Tensor compose_cpu(const at::Tensor& x_in, const at::Tensor& m_in, const at::Tensor& b_in,
                       const at::Tensor& r_in) {
  const auto in = check_compose(x_in, m_in, b_in, r_in);
  auto out = at::empty({2 * in.N, in.C, x_in.size(2), x_in.size(3)}, in.x.options());
  if (in.N * in.C * in.HW == 0) return out;
  const int64_t spans = (in.HW + kPixelsPerTask - 1) / kPixelsPerTask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "compose_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, in.N * in.C * spans, 1, [&](int64_t begin, int64_t end) {
      std::array<std::vector<at::opmath_type<scalar_t>>, 6> scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s0 = (task % spans) * kPixelsPerTask;
        compose_task<scalar_t>(in, task / spans, s0, std::min(kPixelsPerTask, in.HW - s0), o, scratch);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> compose_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                        const at::Tensor& m_in, const at::Tensor& b_in,
                                                        const at::Tensor& r_in, bool need_grad_x) {
  const auto in = check_compose(x_in, m_in, b_in, r_in);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == 2 * in.N && grad_in.size(1) == in.C &&
                  grad_in.size(2) * grad_in.size(3) == in.HW,
              "grad must be [2N,C,H,W], got ", grad_in.sizes());
  const auto grad = grad_in.to(in.x.scalar_type()).contiguous();
  auto grad_m = at::empty_like(in.m);
  auto grad_x = need_grad_x ? at::empty_like(in.x) : at::empty({0}, in.x.options());
  if (in.N * in.HW == 0) return {grad_m, grad_x};
  const int64_t spans = (in.HW + kPixelsPerTask - 1) / kPixelsPerTask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "compose_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* gm = grad_m.mutable_data_ptr<scalar_t>();
    scalar_t* gx = need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, in.N * spans, 1, [&](int64_t begin, int64_t end) {
      std::array<std::vector<at::opmath_type<scalar_t>>, 8> scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s0 = (task % spans) * kPixelsPerTask;
        compose_grad_task<scalar_t>(in, g, task / spans, s0, std::min(kPixelsPerTask, in.HW - s0), gm, gx, scratch);
      }
    });
  });
  return {grad_m, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(medcam_fast, CPU, lib) {
  lib.impl("compose", TORCH_FN(compose_cpu));
  lib.impl("compose_backward", TORCH_FN(compose_backward_cpu));
}

}  // namespace medcam_fast
