// CPU kernels of medcam_fast::mask_priors: one pass forward, one gather pass backward.
// Work is split into fixed chunks of rows (independent of the thread count, so results are
// deterministic); each chunk sums in lanes the compiler vectorises, then chunks add in order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/isa.h"

namespace medcam_fast {
namespace {

constexpr int64_t kRowsPerChunk = 16;
constexpr int kTerms = 6;  // area, bin, vertical, horizontal, diagonal down-right, diagonal down-left

template <typename T>
constexpr int lanes() { return 64 / sizeof(T); }

template <typename T>
MEDCAM_ALWAYS_INLINE T sum_abs_diff(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int L = lanes<T>();
  T acc[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int l = 0; l < L; ++l) acc[l] += std::abs(a[k + l] - b[k + l]);
  T s = 0;
  for (; k < n; ++k) s += std::abs(a[k] - b[k]);
  for (int l = 0; l < L; ++l) s += acc[l];
  return s;
}

MEDCAM_ALWAYS_INLINE float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }
MEDCAM_ALWAYS_INLINE double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// Sums of the six terms over rows [r0, r1) of a p plane whose row r is at rows[r] (rows outside
// [0, H) are never read).
template <typename T>
MEDCAM_ALWAYS_INLINE void chunk_sums_impl(const T* const* rows, int64_t H, int64_t W, int64_t r0, int64_t r1,
                                          double* out) {
  constexpr int L = lanes<T>();
  double s[kTerms] = {};
  for (int64_t i = r0; i < r1; ++i) {
    const T* p = rows[i];
    T area[L] = {}, bin[L] = {};
    int64_t k = 0;
    for (; k + L <= W; k += L)
      for (int l = 0; l < L; ++l) {
        T v = p[k + l];
        area[l] += v;
        bin[l] += v * (T(1) - v);
      }
    T a = 0, b = 0;
    for (; k < W; ++k) {
      a += p[k];
      b += p[k] * (T(1) - p[k]);
    }
    for (int l = 0; l < L; ++l) {
      a += area[l];
      b += bin[l];
    }
    s[0] += a;
    s[1] += b;
    if (W > 1) s[3] += sum_abs_diff(p + 1, p, W - 1);
    if (i + 1 < H) {
      const T* q = rows[i + 1];
      s[2] += sum_abs_diff(q, p, W);
      if (W > 1) {
        s[4] += sum_abs_diff(q + 1, p, W - 1);  // (i,j) - (i+1,j+1)
        s[5] += sum_abs_diff(q, p + 1, W - 1);  // (i,j+1) - (i+1,j)
      }
    }
  }
  for (int t = 0; t < kTerms; ++t) out[t] = s[t];
}

MEDCAM_CPU_CLONES(void, chunk_sums, chunk_sums_impl<float>,
                  (const float* const* rows, int64_t H, int64_t W, int64_t r0, int64_t r1, double* out),
                  (rows, H, W, r0, r1, out))
MEDCAM_CPU_CLONES(void, chunk_sums, chunk_sums_impl<double>,
                  (const double* const* rows, int64_t H, int64_t W, int64_t r0, int64_t r1, double* out),
                  (rows, H, W, r0, r1, out))

template <typename T>
MEDCAM_ALWAYS_INLINE T sgn(T v) { return T(v > T(0)) - T(v < T(0)); }

// d prior / d p at (i, j) with full bounds checks; used on the edge columns.
template <typename T>
MEDCAM_ALWAYS_INLINE T pixel_grad(const T* const* rows, int64_t H, int64_t W, int64_t i, int64_t j, T a0, T a1, T cv,
                                  T ch, T cd) {
  const T pc = rows[i][j];
  T g = a0 + a1 * (T(1) - T(2) * pc);
  if (j > 0) g += ch * sgn(pc - rows[i][j - 1]);
  if (j + 1 < W) g -= ch * sgn(rows[i][j + 1] - pc);
  if (i > 0) {
    const T* u = rows[i - 1];
    g += cv * sgn(pc - u[j]);
    if (j > 0) g += cd * sgn(pc - u[j - 1]);
    if (j + 1 < W) g += cd * sgn(pc - u[j + 1]);
  }
  if (i + 1 < H) {
    const T* d = rows[i + 1];
    g -= cv * sgn(d[j] - pc);
    if (j + 1 < W) g -= cd * sgn(d[j + 1] - pc);
    if (j > 0) g -= cd * sgn(d[j - 1] - pc);
  }
  return g;
}

// Interior columns 1..W-2 of row i: no column bounds, row neighbours selected at compile time.
template <typename T, bool UP, bool DOWN>
MEDCAM_ALWAYS_INLINE void row_grad_interior(const T* __restrict u, const T* __restrict p, const T* __restrict d,
                                            T* __restrict g, int64_t W, T a0, T a1, T cv, T ch, T cd) {
  for (int64_t j = 1; j + 1 < W; ++j) {
    const T pc = p[j];
    T v = a0 + a1 * (T(1) - T(2) * pc) + ch * (sgn(pc - p[j - 1]) - sgn(p[j + 1] - pc));
    if constexpr (UP) v += cv * sgn(pc - u[j]) + cd * (sgn(pc - u[j - 1]) + sgn(pc - u[j + 1]));
    if constexpr (DOWN) v -= cv * sgn(d[j] - pc) + cd * (sgn(d[j + 1] - pc) + sgn(d[j - 1] - pc));
    g[j] = v;
  }
}

template <typename T>
MEDCAM_ALWAYS_INLINE void chunk_grad_impl(const T* const* rows, int64_t H, int64_t W, int64_t r0, int64_t r1,
                                          T* const* grows, T a0, T a1, T cv, T ch, T cd) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* u = i > 0 ? rows[i - 1] : nullptr;
    const T* d = i + 1 < H ? rows[i + 1] : nullptr;
    T* g = grows[i];
    if (W > 2) {
      if (u && d) row_grad_interior<T, true, true>(u, rows[i], d, g, W, a0, a1, cv, ch, cd);
      else if (u) row_grad_interior<T, true, false>(u, rows[i], d, g, W, a0, a1, cv, ch, cd);
      else if (d) row_grad_interior<T, false, true>(u, rows[i], d, g, W, a0, a1, cv, ch, cd);
      else row_grad_interior<T, false, false>(u, rows[i], d, g, W, a0, a1, cv, ch, cd);
      g[0] = pixel_grad(rows, H, W, i, 0, a0, a1, cv, ch, cd);
      g[W - 1] = pixel_grad(rows, H, W, i, W - 1, a0, a1, cv, ch, cd);
    } else {
      for (int64_t j = 0; j < W; ++j) g[j] = pixel_grad(rows, H, W, i, j, a0, a1, cv, ch, cd);
    }
  }
}

MEDCAM_CPU_CLONES(void, chunk_grad, chunk_grad_impl<float>,
                  (const float* const* rows, int64_t H, int64_t W, int64_t r0, int64_t r1, float* const* grows,
                   float a0, float a1, float cv, float ch, float cd),
                  (rows, H, W, r0, r1, grows, a0, a1, cv, ch, cd))
MEDCAM_CPU_CLONES(void, chunk_grad, chunk_grad_impl<double>,
                  (const double* const* rows, int64_t H, int64_t W, int64_t r0, int64_t r1, double* const* grows,
                   double a0, double a1, double cv, double ch, double cd),
                  (rows, H, W, r0, r1, grows, a0, a1, cv, ch, cd))

// Gives row pointers of p = m (or sigmoid(m/T)) as acc_t for rows [lo, hi) of one plane. Reads the
// input in place when no conversion is needed, else converts into `storage`.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* plane, int64_t W, int64_t lo, int64_t hi, bool logits, acc_t inv_t,
               std::vector<acc_t>& storage, std::vector<const acc_t*>& rows) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!logits) {
      for (int64_t r = lo; r < hi; ++r) rows[r] = plane + r * W;
      return;
    }
  }
  storage.resize((hi - lo) * W);
  for (int64_t r = lo; r < hi; ++r) {
    const scalar_t* src = plane + r * W;
    acc_t* dst = storage.data() + (r - lo) * W;
    for (int64_t j = 0; j < W; ++j) {
      acc_t v = static_cast<acc_t>(src[j]);
      dst[j] = logits ? sigmoid(v * inv_t) : v;
    }
    rows[r] = dst;
  }
}

at::Tensor mask_priors_cpu(const at::Tensor& m_in, bool diagonal, bool logits, double temperature) {
  check_mask(m_in, "m");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const auto m = m_in.contiguous();
  const int64_t N = m.size(0), H = m.size(2), W = m.size(3);
  auto out = at::empty({N, 3}, m.options());
  if (N == 0) return out;
  const int64_t chunks = (H + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(N * chunks * kTerms, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "mask_priors_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = m.const_data_ptr<scalar_t>();
    const acc_t inv_t = acc_t(1.0 / temperature);
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> storage;
      std::vector<const acc_t*> rows(H, nullptr);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / chunks, c = task % chunks;
        const int64_t r0 = c * kRowsPerChunk, r1 = std::min(H, r0 + kRowsPerChunk);
        load_rows<scalar_t, acc_t>(base + n * H * W, W, r0, std::min(H, r1 + 1), logits, inv_t, storage, rows);
        chunk_sums(rows.data(), H, W, r0, r1, partial.data() + task * kTerms);
      }
    });
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const PriorScales<double> sc(H, W, diagonal);
    for (int64_t n = 0; n < N; ++n) {
      double s[kTerms] = {};
      for (int64_t c = 0; c < chunks; ++c)
        for (int t = 0; t < kTerms; ++t) s[t] += partial[(n * chunks + c) * kTerms + t];
      o[n * 3 + 0] = static_cast<scalar_t>(s[0] * sc.inv_hw);
      o[n * 3 + 1] = static_cast<scalar_t>(s[1] * sc.inv_hw);
      o[n * 3 + 2] = static_cast<scalar_t>(s[2] * sc.inv_v + s[3] * sc.inv_h + (s[4] + s[5]) * sc.inv_d);
    }
  });
  return out;
}

at::Tensor mask_priors_backward_cpu(const at::Tensor& grad_in, const at::Tensor& m_in, bool diagonal, bool logits,
                                    double temperature) {
  check_mask(m_in, "m");
  const auto m = m_in.contiguous();
  const int64_t N = m.size(0), H = m.size(2), W = m.size(3);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == N && grad_in.size(1) == 3, "grad must be [N,3], got ",
              grad_in.sizes());
  auto grad_m = at::empty_like(m);
  if (N == 0 || H * W == 0) return grad_m;
  const auto grad = grad_in.to(at::kDouble).contiguous();
  const double* gp = grad.const_data_ptr<double>();
  const int64_t chunks = (H + kRowsPerChunk - 1) / kRowsPerChunk;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "mask_priors_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = m.const_data_ptr<scalar_t>();
    scalar_t* gbase = grad_m.mutable_data_ptr<scalar_t>();
    const acc_t inv_t = acc_t(1.0 / temperature);
    const PriorScales<double> sc(H, W, diagonal);
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> storage, gstore(kRowsPerChunk * W);
      std::vector<const acc_t*> rows(H, nullptr);
      std::vector<acc_t*> grows(H, nullptr);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / chunks, c = task % chunks;
        const int64_t r0 = c * kRowsPerChunk, r1 = std::min(H, r0 + kRowsPerChunk);
        load_rows<scalar_t, acc_t>(base + n * H * W, W, std::max<int64_t>(0, r0 - 1), std::min(H, r1 + 1), logits,
                                   inv_t, storage, rows);
        const bool direct = std::is_same_v<scalar_t, acc_t> && !logits;
        for (int64_t r = r0; r < r1; ++r)
          grows[r] = direct ? reinterpret_cast<acc_t*>(gbase + (n * H + r) * W) : gstore.data() + (r - r0) * W;
        const double g0 = gp[n * 3], g1 = gp[n * 3 + 1], g2 = gp[n * 3 + 2];
        chunk_grad(rows.data(), H, W, r0, r1, grows.data(), acc_t(g0 * sc.inv_hw), acc_t(g1 * sc.inv_hw),
                   acc_t(g2 * sc.inv_v), acc_t(g2 * sc.inv_h), acc_t(g2 * sc.inv_d));
        if (!direct) {
          for (int64_t r = r0; r < r1; ++r) {
            scalar_t* dst = gbase + (n * H + r) * W;
            const acc_t* p = rows[r];
            for (int64_t j = 0; j < W; ++j) {
              acc_t v = grows[r][j];
              if (logits) v *= p[j] * (acc_t(1) - p[j]) * inv_t;  // d sigmoid(m/T) / dm
              dst[j] = static_cast<scalar_t>(v);
            }
          }
        }
      }
    });
  });
  return grad_m;
}

}  // namespace

TORCH_LIBRARY_IMPL(medcam_fast, CPU, lib) {
  lib.impl("mask_priors", TORCH_FN(mask_priors_cpu));
  lib.impl("mask_priors_backward", TORCH_FN(mask_priors_backward_cpu));
}

}  // namespace medcam_fast
