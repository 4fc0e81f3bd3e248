// Schema and autocast policy of medcam_fast::compose (kernels: cpu/, cuda/).
//
// compose(x [N,C,H,W], m [N,1,H,W], baseline [C] or [N,C,H,W], background [N,C,H,W]) -> [2N,C,H,W]:
// rows 0..N-1 are m*x + (1-m)*baseline, rows N..2N-1 are m*x + (1-m)*background, in one buffer so
// that the classifier sees both in a single pass. The Python wrapper broadcasts other baselines.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace medcam_fast {
namespace {

at::Tensor compose_call(const at::Tensor& x, const at::Tensor& m, const at::Tensor& baseline,
                        const at::Tensor& background) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("medcam_fast::compose", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(x, m, baseline, background);
}

// Autocast: inputs of any float dtypes (a bf16 mask on an fp32 image, say) computed in fp32,
// returned in x's dtype (the image's: what the classifier would have been given).
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor compose_autocast(const at::Tensor& x, const at::Tensor& m, const at::Tensor& baseline,
                            const at::Tensor& background) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  auto f32 = [](const at::Tensor& t) { return at::autocast::cached_cast(at::kFloat, t, device_type); };
  return compose_call(f32(x), f32(m), f32(baseline), f32(background)).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medcam_fast, lib) {
  lib.def("compose(Tensor x, Tensor m, Tensor baseline, Tensor background) -> Tensor");
  // Returns (grad_m [N,1,H,W], grad_x [N,C,H,W] or an empty tensor when not need_grad_x).
  lib.def(
      "compose_backward(Tensor grad, Tensor x, Tensor m, Tensor baseline, Tensor background, "
      "bool need_grad_x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(medcam_fast, AutocastCPU, lib) {
  lib.impl("compose", TORCH_FN((compose_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(medcam_fast, AutocastCUDA, lib) {
  lib.impl("compose", TORCH_FN((compose_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

}  // namespace medcam_fast
