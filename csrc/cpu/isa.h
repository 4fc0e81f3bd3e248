// CPU instruction-set clones of the hot loops, chosen at run time.
//
// Every hot loop is compiled three times: AVX-512, AVX2 and scalar (no vectorisation). The active
// clone is the best one the CPU supports, or the one MEDCAM_FAST_CPU_ISA names
// (auto|avx512|avx2|scalar), or the one set through medcam_fast::set_cpu_isa, so that tests can run
// every clone the machine supports. The build uses -ffp-contract=off and the loops keep a fixed
// summation order (lane arrays independent of the vector width), so all clones give the same bits.
#pragma once
#include <cstdint>

namespace medcam_fast::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The clone the kernels run (relaxed atomic read: cheap enough for once per span).
Isa active_isa();

}  // namespace medcam_fast::cpu

// Bodies of the clones must be inlined into each clone, or one shared copy would be compiled for
// the baseline target only.
#define MEDCAM_ALWAYS_INLINE inline __attribute__((always_inline))

#if MEDCAM_FAST_TARGET_CLONES
#define MEDCAM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define MEDCAM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define MEDCAM_TARGET_AVX512
#define MEDCAM_TARGET_AVX2
#endif
#define MEDCAM_TARGET_SCALAR __attribute__((optimize("no-tree-vectorize", "no-tree-slp-vectorize")))

// MEDCAM_CPU_CLONES(ret, name, impl, (params...), (args...)) defines `ret name(params...)` that
// calls `impl(args...)` compiled for the active ISA (impl must be MEDCAM_ALWAYS_INLINE).
#if MEDCAM_FAST_TARGET_CLONES
#define MEDCAM_CPU_CLONES(ret, name, impl, params, args)                        \
  MEDCAM_TARGET_AVX512 ret name##_avx512 params { return impl args; }           \
  MEDCAM_TARGET_AVX2 ret name##_avx2 params { return impl args; }               \
  MEDCAM_TARGET_SCALAR ret name##_scalar params { return impl args; }           \
  inline ret name params {                                                      \
    switch (::medcam_fast::cpu::active_isa()) {                                 \
      case ::medcam_fast::cpu::Isa::kAvx512: return name##_avx512 args;         \
      case ::medcam_fast::cpu::Isa::kAvx2: return name##_avx2 args;             \
      default: return name##_scalar args;                                       \
    }                                                                           \
  }
#else
// Not x86-64 with GCC: one plain build, reported as "generic".
#define MEDCAM_CPU_CLONES(ret, name, impl, params, args) \
  inline ret name params { return impl args; }
#endif
