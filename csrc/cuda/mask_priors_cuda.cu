// CUDA kernels of medcam_fast::mask_priors. Forward: each block reduces a slice of one sample's
// pixels into six partial sums, then one thread per sample adds the slices in order
// (deterministic, no atomics). Backward: one thread per pixel gathers from its 8 neighbours.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"

namespace medcam_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kTerms = 6;
constexpr int64_t kPixelsPerBlock = 8 * kThreads;

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_p(const scalar_t* plane, int64_t idx, bool logits, acc_t inv_t) {
  const acc_t v = static_cast<acc_t>(plane[idx]);
  return logits ? acc_t(1) / (acc_t(1) + exp(-v * inv_t)) : v;
}

template <typename scalar_t, typename acc_t>
__global__ void mask_priors_partial_kernel(const scalar_t* __restrict__ m, int64_t H, int64_t W, bool logits,
                                           acc_t inv_t, int64_t blocks_per_sample, acc_t* __restrict__ partial) {
  const int64_t n = blockIdx.y, HW = H * W;
  const scalar_t* plane = m + n * HW;
  acc_t s[kTerms] = {};
  const int64_t start = blockIdx.x * kPixelsPerBlock, stop = min(HW, start + kPixelsPerBlock);
  for (int64_t idx = start + threadIdx.x; idx < stop; idx += blockDim.x) {
    const int64_t i = idx / W, j = idx % W;
    const acc_t p = load_p(plane, idx, logits, inv_t);
    s[0] += p;
    s[1] += p * (acc_t(1) - p);
    if (j + 1 < W) s[3] += abs(load_p(plane, idx + 1, logits, inv_t) - p);
    if (i + 1 < H) {
      s[2] += abs(load_p(plane, idx + W, logits, inv_t) - p);
      if (j + 1 < W) s[4] += abs(load_p(plane, idx + W + 1, logits, inv_t) - p);
      if (j > 0) s[5] += abs(load_p(plane, idx + W - 1, logits, inv_t) - p);
    }
  }
  __shared__ acc_t shared[kTerms][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int t = 0; t < kTerms; ++t) {
    acc_t v = s[t];
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffff, v, o);
    if (lane == 0) shared[t][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < kTerms) {
    acc_t v = 0;
    for (int w = 0; w < kThreads / 32; ++w) v += shared[threadIdx.x][w];
    partial[(n * blocks_per_sample + blockIdx.x) * kTerms + threadIdx.x] = v;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void mask_priors_finish_kernel(const acc_t* __restrict__ partial, int64_t N, int64_t blocks_per_sample,
                                          PriorScales<acc_t> sc, scalar_t* __restrict__ out) {
  const int64_t n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  acc_t s[kTerms] = {};
  for (int64_t b = 0; b < blocks_per_sample; ++b)
    for (int t = 0; t < kTerms; ++t) s[t] += partial[(n * blocks_per_sample + b) * kTerms + t];
  out[n * 3 + 0] = static_cast<scalar_t>(s[0] * sc.inv_hw);
  out[n * 3 + 1] = static_cast<scalar_t>(s[1] * sc.inv_hw);
  out[n * 3 + 2] = static_cast<scalar_t>(s[2] * sc.inv_v + s[3] * sc.inv_h + (s[4] + s[5]) * sc.inv_d);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sgn(acc_t v) { return acc_t(v > acc_t(0)) - acc_t(v < acc_t(0)); }

template <typename scalar_t, typename acc_t>
__global__ void mask_priors_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ m,
                                            int64_t N, int64_t H, int64_t W, bool logits, acc_t inv_t,
                                            PriorScales<acc_t> sc, scalar_t* __restrict__ grad_m) {
  const int64_t HW = H * W;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < N * HW; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = k / HW, idx = k % HW, i = idx / W, j = idx % W;
    const scalar_t* plane = m + n * HW;
    const acc_t g2 = grad[n * 3 + 2], cv = g2 * sc.inv_v, ch = g2 * sc.inv_h, cd = g2 * sc.inv_d;
    auto P = [&](int64_t ii, int64_t jj) { return load_p(plane, ii * W + jj, logits, inv_t); };
    const acc_t pc = P(i, j);
    acc_t g = (grad[n * 3] + grad[n * 3 + 1] * (acc_t(1) - acc_t(2) * pc)) * sc.inv_hw;
    if (j > 0) g += ch * sgn(pc - P(i, j - 1));
    if (j + 1 < W) g -= ch * sgn(P(i, j + 1) - pc);
    if (i > 0) {
      g += cv * sgn(pc - P(i - 1, j));
      if (j > 0) g += cd * sgn(pc - P(i - 1, j - 1));
      if (j + 1 < W) g += cd * sgn(pc - P(i - 1, j + 1));
    }
    if (i + 1 < H) {
      g -= cv * sgn(P(i + 1, j) - pc);
      if (j + 1 < W) g -= cd * sgn(P(i + 1, j + 1) - pc);
      if (j > 0) g -= cd * sgn(P(i + 1, j - 1) - pc);
    }
    if (logits) g *= pc * (acc_t(1) - pc) * inv_t;
    grad_m[k] = static_cast<scalar_t>(g);
  }
}

at::Tensor mask_priors_cuda(const at::Tensor& m_in, bool diagonal, bool logits, double temperature) {
  check_mask(m_in, "m");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const c10::cuda::CUDAGuard guard(m_in.device());
  const auto m = m_in.contiguous();
  const int64_t N = m.size(0), H = m.size(2), W = m.size(3);
  auto out = at::empty({N, 3}, m.options());
  if (N == 0) return out;
  const int64_t blocks = std::max<int64_t>(1, (H * W + kPixelsPerBlock - 1) / kPixelsPerBlock);
  TORCH_CHECK(N <= 65535, "mask_priors on CUDA takes at most 65535 samples per call, got ", N);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "mask_priors_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto partial = at::empty({N, blocks, kTerms}, m.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    mask_priors_partial_kernel<scalar_t, acc_t><<<dim3(blocks, N), kThreads, 0, stream>>>(
        m.const_data_ptr<scalar_t>(), H, W, logits, acc_t(1.0 / temperature), blocks, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mask_priors_finish_kernel<scalar_t, acc_t><<<(N + 127) / 128, 128, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), N, blocks, PriorScales<acc_t>(H, W, diagonal), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor mask_priors_backward_cuda(const at::Tensor& grad_in, const at::Tensor& m_in, bool diagonal, bool logits,
                                     double temperature) {
  check_mask(m_in, "m");
  const c10::cuda::CUDAGuard guard(m_in.device());
  const auto m = m_in.contiguous();
  const int64_t N = m.size(0), H = m.size(2), W = m.size(3);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == N && grad_in.size(1) == 3, "grad must be [N,3], got ",
              grad_in.sizes());
  auto grad_m = at::empty_like(m);
  if (N * H * W == 0) return grad_m;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "mask_priors_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto grad = grad_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const int64_t total = N * H * W;
    const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65536));
    mask_priors_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        grad.const_data_ptr<acc_t>(), m.const_data_ptr<scalar_t>(), N, H, W, logits, acc_t(1.0 / temperature),
        PriorScales<acc_t>(H, W, diagonal), grad_m.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_m;
}

}  // namespace

TORCH_LIBRARY_IMPL(medcam_fast, CUDA, lib) {
  lib.impl("mask_priors", TORCH_FN(mask_priors_cuda));
  lib.impl("mask_priors_backward", TORCH_FN(mask_priors_backward_cuda));
}

}  // namespace medcam_fast
