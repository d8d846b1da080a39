// The noise pass of ogm_ge_ on CPU (x <- k x + sigma z over float32) and the ISA it runs with.
//
// One implementation per instruction set, chosen at run time: AVX-512 or AVX2 (ogm_ge_avx512.cpp, ogm_ge_avx2.cpp,
// the same template of ogm_ge_simd.h) where the CPU has them, else a portable loop (ogm_ge.cpp). All draw bitwise the
// normals of philox::normal4: the same float32 operations in the same order, none fused (-ffp-contract=off).
// AGM_FAST_CPU_CAPABILITY=default|avx2|avx512 caps the choice (as ATEN_CPU_CAPABILITY does for ATen), for tests.
#pragma once

#include <cstdint>

#include "philox.h"

// The x86-64 SIMD paths need GCC or Clang (target pragmas, immintrin.h, __builtin_cpu_supports).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__INTEL_COMPILER)
#define AGM_FAST_X86_SIMD 1
#else
#define AGM_FAST_X86_SIMD 0
#endif

namespace agm_fast {
namespace simd {

// The noise of one tensor's elements: element j of x is element first + j of the tensor, drawn from counter
// (first + j) / 4 of (index, seed, offset).
struct NoiseKey {
  int64_t first;
  uint32_t index;
  uint64_t seed;
  uint64_t offset;
};

// x[j] <- k x[j] + sigma z_j for j in [j0, j1), one counter at a time (philox::normal4).
inline void scale_scalar(float* x, int64_t j0, int64_t j1, float k, float sigma, const NoiseKey& key) {
  int64_t j = j0;
  while (j < j1) {
    const int64_t g = key.first + j;
    float z[4];
    philox::normal4(static_cast<uint64_t>(g / 4), key.index, key.seed, key.offset, z[0], z[1], z[2], z[3]);
    const int64_t e0 = g % 4;
    const int64_t end = j + 4 - e0 < j1 ? j + 4 - e0 : j1;
    for (int64_t e = e0; j < end; ++j, ++e) x[j] = k * x[j] + sigma * z[e];
  }
}

using NoisyScaleFn = void (*)(float* x, int64_t n, float k, float sigma, const NoiseKey& key);

#if AGM_FAST_X86_SIMD
void noisy_scale_avx2(float* x, int64_t n, float k, float sigma, const NoiseKey& key);
void noisy_scale_avx512(float* x, int64_t n, float k, float sigma, const NoiseKey& key);
#endif

}  // namespace simd
}  // namespace agm_fast
