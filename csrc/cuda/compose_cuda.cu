// CUDA kernels of medcam_fast::compose: one thread per (n, pixel) walks the channels, so m is read
// once per pixel; the backward sums grad_m over channels in registers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"

namespace medcam_fast {
namespace {

constexpr int kThreads = 256;

inline int grid_for(int64_t total) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 65536)));
}

template <typename scalar_t, typename acc_t>
__global__ void compose_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ m,
                               const scalar_t* __restrict__ b, bool per_channel, const scalar_t* __restrict__ r,
                               int64_t N, int64_t C, int64_t HW, scalar_t* __restrict__ out) {
  const int64_t half = N * C * HW;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < N * HW; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = k / HW, s = k % HW;
    const acc_t mk = static_cast<acc_t>(m[k]), rest = acc_t(1) - mk;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = (n * C + c) * HW + s;
      const acc_t keep = mk * static_cast<acc_t>(x[off]);
      const acc_t bv = static_cast<acc_t>(per_channel ? b[c] : b[off]);
      out[off] = static_cast<scalar_t>(keep + rest * bv);
      out[half + off] = static_cast<scalar_t>(keep + rest * static_cast<acc_t>(r[off]));
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void compose_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ m, const scalar_t* __restrict__ b,
                                        bool per_channel, const scalar_t* __restrict__ r, int64_t N, int64_t C,
                                        int64_t HW, scalar_t* __restrict__ gm, scalar_t* __restrict__ gx) {
  const int64_t half = N * C * HW;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < N * HW; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = k / HW, s = k % HW;
    const acc_t mk = static_cast<acc_t>(m[k]);
    acc_t acc = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = (n * C + c) * HW + s;
      const acc_t ge = static_cast<acc_t>(g[off]), get = static_cast<acc_t>(g[half + off]);
      const acc_t xv = static_cast<acc_t>(x[off]);
      const acc_t bv = static_cast<acc_t>(per_channel ? b[c] : b[off]);
      acc += ge * (xv - bv) + get * (xv - static_cast<acc_t>(r[off]));
      if (gx != nullptr) gx[off] = static_cast<scalar_t>((ge + get) * mk);
    }
    gm[k] = static_cast<scalar_t>(acc);
  }
}

at::Tensor compose_cuda(const at::Tensor& x_in, const at::Tensor& m_in, const at::Tensor& b_in,
                        const at::Tensor& r_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto in = check_compose(x_in, m_in, b_in, r_in);
  auto out = at::empty({2 * in.N, in.C, x_in.size(2), x_in.size(3)}, in.x.options());
  if (in.N * in.C * in.HW == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "compose_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    compose_kernel<scalar_t, acc_t><<<grid_for(in.N * in.HW), kThreads, 0, stream>>>(
        in.x.const_data_ptr<scalar_t>(), in.m.const_data_ptr<scalar_t>(), in.baseline.const_data_ptr<scalar_t>(),
        in.baseline_per_channel, in.background.const_data_ptr<scalar_t>(), in.N, in.C, in.HW,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> compose_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                         const at::Tensor& m_in, const at::Tensor& b_in,
                                                         const at::Tensor& r_in, bool need_grad_x) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto in = check_compose(x_in, m_in, b_in, r_in);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == 2 * in.N && grad_in.size(1) == in.C &&
                  grad_in.size(2) * grad_in.size(3) == in.HW,
              "grad must be [2N,C,H,W], got ", grad_in.sizes());
  const auto grad = grad_in.to(in.x.scalar_type()).contiguous();
  auto grad_m = at::empty_like(in.m);
  auto grad_x = need_grad_x ? at::empty_like(in.x) : at::empty({0}, in.x.options());
  if (in.N * in.HW == 0) return {grad_m, grad_x};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "compose_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    compose_backward_kernel<scalar_t, acc_t><<<grid_for(in.N * in.HW), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), in.x.const_data_ptr<scalar_t>(), in.m.const_data_ptr<scalar_t>(),
        in.baseline.const_data_ptr<scalar_t>(), in.baseline_per_channel, in.background.const_data_ptr<scalar_t>(),
        in.N, in.C, in.HW, grad_m.mutable_data_ptr<scalar_t>(),
        need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_m, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(medcam_fast, CUDA, lib) {
  lib.impl("compose", TORCH_FN(compose_cuda));
  lib.impl("compose_backward", TORCH_FN(compose_backward_cuda));
}

}  // namespace medcam_fast
