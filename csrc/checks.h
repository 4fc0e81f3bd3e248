// Shared shape checks of the kernels. The Python wrappers check first and raise ValueError with the
// argument's name; these guard direct torch.ops calls.
#pragma once
#include <ATen/ATen.h>

namespace medcam_fast {

inline void check_mask(const at::Tensor& m, const char* name) {
  TORCH_CHECK(m.dim() == 4 && m.size(1) == 1, name, " must be [N,1,H,W], got ", m.sizes());
  TORCH_CHECK(at::isFloatingType(m.scalar_type()), name, " must be floating point, got ", m.scalar_type());
}

// Per-sample constants of mask_priors: 1/count of each term, a mean over no pairs being 0.
template <typename acc_t>
struct PriorScales {
  acc_t inv_hw, inv_v, inv_h, inv_d;  // inv_d already carries the 1/sqrt(2) diagonal weight
  PriorScales(int64_t H, int64_t W, bool diagonal) {
    auto inv = [](int64_t c) { return c > 0 ? acc_t(1) / acc_t(c) : acc_t(0); };
    inv_hw = inv(H * W);
    inv_v = inv((H - 1) * W);
    inv_h = inv(H * (W - 1));
    inv_d = diagonal ? inv((H - 1) * (W - 1)) / acc_t(1.4142135623730951) : acc_t(0);
  }
};

}  // namespace medcam_fast

namespace medcam_fast {

// compose's inputs, made contiguous; baseline_per_channel is true for a [C] baseline.
struct ComposeInputs {
  at::Tensor x, m, baseline, background;
  bool baseline_per_channel;
  int64_t N, C, HW;
};

inline ComposeInputs check_compose(const at::Tensor& x, const at::Tensor& m, const at::Tensor& baseline,
                                   const at::Tensor& background) {
  TORCH_CHECK(x.dim() == 4, "x must be [N,C,H,W], got ", x.sizes());
  check_mask(m, "m");
  TORCH_CHECK(m.size(0) == x.size(0) && m.size(2) == x.size(2) && m.size(3) == x.size(3), "m must be [N,1,H,W] for x ",
              x.sizes(), ", got ", m.sizes());
  TORCH_CHECK(background.sizes() == x.sizes(), "background must have x's shape ", x.sizes(), ", got ",
              background.sizes());
  const bool per_channel = baseline.dim() == 1 && baseline.size(0) == x.size(1);
  TORCH_CHECK(per_channel || baseline.sizes() == x.sizes(), "baseline must be [C] or [N,C,H,W] for x ", x.sizes(),
              ", got ", baseline.sizes());
  for (const auto* t : {&m, &baseline, &background}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "compose inputs must share x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "compose inputs must share x's device ", x.device(), ", got ",
                t->device());
  }
  return {x.contiguous(), m.contiguous(), baseline.contiguous(), background.contiguous(), per_channel,
          x.size(0),      x.size(1),      x.size(2) * x.size(3)};
}

}  // namespace medcam_fast
