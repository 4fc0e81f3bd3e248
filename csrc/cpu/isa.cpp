// The active CPU clone and the ops that report and set it (no tensors: catch-all kernels).
//
//   cpu_isa() -> str                 the clone the kernels run now
//   cpu_isas() -> str                the clones this CPU supports, best first, comma-separated
//   set_cpu_isa(str isa) -> str      "auto", "avx512", "avx2" or "scalar"; returns the clone now active
// Off x86-64 GCC builds there is one plain build, reported as "generic".
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "isa.h"

namespace medcam_fast::cpu {
namespace {

const char* name_of(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default:
#if MEDCAM_FAST_TARGET_CLONES
      return "scalar";
#else
      return "generic";  // not x86-64 GCC: the one plain build
#endif
  }
}

std::vector<Isa> supported() {
  std::vector<Isa> out;
#if MEDCAM_FAST_TARGET_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    out.push_back(Isa::kAvx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(Isa::kAvx2);
#endif
  out.push_back(Isa::kScalar);
  return out;
}

Isa resolve(const std::string& want) {
  const auto ok = supported();
  if (want.empty() || want == "auto") return ok.front();
  if (want == "scalar" || want == "generic") return Isa::kScalar;  // always built
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kScalar}) {
    if (want != name_of(isa)) continue;
    for (Isa s : ok)
      if (s == isa) return isa;
    TORCH_CHECK(false, "medcam_fast: CPU clone '", want, "' is not supported by this CPU (supported: ",
                std::string(name_of(ok.front())), ok.size() > 1 ? " and lower" : "", ")");
  }
  TORCH_CHECK(false, "medcam_fast: unknown CPU clone '", want, "'; use auto, avx512, avx2 or scalar");
  return Isa::kScalar;  // not reached
}

std::atomic<int>& state() {
  // First use: MEDCAM_FAST_CPU_ISA, else the best supported clone. A bad value fails the first op.
  static std::atomic<int> isa{static_cast<int>(resolve([] {
    const char* env = std::getenv("MEDCAM_FAST_CPU_ISA");
    return std::string(env ? env : "auto");
  }()))};
  return isa;
}

std::string cpu_isa_op() { return name_of(active_isa()); }

std::string cpu_isas_op() {
  std::string out;
  for (Isa isa : supported()) out += (out.empty() ? "" : ",") + std::string(name_of(isa));
  return out;
}

std::string set_cpu_isa_op(std::string want) {
  state().store(static_cast<int>(resolve(want)), std::memory_order_relaxed);
  return cpu_isa_op();
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(state().load(std::memory_order_relaxed)); }

TORCH_LIBRARY_FRAGMENT(medcam_fast, lib) {
  lib.def("cpu_isa() -> str", &cpu_isa_op);
  lib.def("cpu_isas() -> str", &cpu_isas_op);
  lib.def("set_cpu_isa(str isa) -> str", &set_cpu_isa_op);
}

}  // namespace medcam_fast::cpu
