// Schema and autocast policy of medcam_fast::mask_priors (kernels: cpu/, cuda/).
//
// mask_priors(m [N,1,H,W]) -> [N,3]: per sample, area = mean(p), binarisation = mean(p(1-p)),
// tv = mean|p[i+1,j]-p[i,j]| + mean|p[i,j+1]-p[i,j]| (+ the two diagonals weighted 1/sqrt(2) when
// diagonal), with p = sigmoid(m / temperature) when logits else m. A mean over no pairs is 0.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace medcam_fast {
namespace {

at::Tensor mask_priors_call(const at::Tensor& m, bool diagonal, bool logits, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("medcam_fast::mask_priors", "")
                       .typed<at::Tensor(const at::Tensor&, bool, bool, double)>();
  return op.call(m, diagonal, logits, temperature);
}

// Autocast: a reduction, so fp32 in and fp32 out (as autocast's own reductions: sum, mse_loss).
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor mask_priors_autocast(const at::Tensor& m, bool diagonal, bool logits, double temperature) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  return mask_priors_call(at::autocast::cached_cast(at::kFloat, m, device_type), diagonal, logits, temperature);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medcam_fast, lib) {
  lib.def(
      "mask_priors(Tensor m, bool diagonal=False, bool logits=False, float temperature=1.0) -> Tensor");
  lib.def(
      "mask_priors_backward(Tensor grad, Tensor m, bool diagonal, bool logits, float temperature) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(medcam_fast, AutocastCPU, lib) {
  lib.impl("mask_priors", TORCH_FN((mask_priors_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(medcam_fast, AutocastCUDA, lib) {
  lib.impl("mask_priors",
           TORCH_FN((mask_priors_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

}  // namespace medcam_fast
