// The noise pass of ogm_ge_ with AVX-512F (ogm_ge_simd.h on 512-bit vectors); ogm_ge.cpp calls it where the CPU has
// AVX-512F.
//
// Everything before the target pragma is compiled for the baseline ISA; only this file's own functions are AVX-512,
// and they have internal linkage (ogm_ge_simd.h) except the entry point. AVX-512F has fused multiply-add: the build's
// -ffp-contract=off keeps the compiler from fusing the separate multiplies and adds the noise is defined with.

#include "cpu/ogm_ge_noise.h"

#if AGM_FAST_X86_SIMD
#include <immintrin.h>

#include <cstdint>

#include "philox.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC target("avx512f")
// GCC 12's avx512fintrin.h trips its own -Wmaybe-uninitialized (the _mm512_undefined_* idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "cpu/ogm_ge_simd.h"

namespace agm_fast {
namespace simd {
namespace {

struct Avx512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kFloats = 16;

  static I iota64(uint64_t q) {
    return _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(q)), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  }
  static I set1_64(uint32_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
  static I set1_32(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static F set1_f(float v) { return _mm512_set1_ps(v); }
  static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I and32(I a, I b) { return _mm512_and_si512(a, b); }
  static I or32(I a, I b) { return _mm512_or_si512(a, b); }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  template <int N>
  static I srli64(I a) { return _mm512_srli_epi64(a, N); }
  template <int N>
  static I srli32(I a) { return _mm512_srli_epi32(a, N); }
  template <int N>
  static I slli32(I a) { return _mm512_slli_epi32(a, N); }
  static I mul_epu32(I a, I b) { return _mm512_mul_epu32(a, b); }
  static I gt32(I a, I b) { return _mm512_maskz_set1_epi32(_mm512_cmpgt_epi32_mask(a, b), -1); }
  static I low_pairs(I a, I b) { return _mm512_mask_blend_epi32(0xAAAA, a, _mm512_slli_epi64(b, 32)); }
  static F cvt_i32_f32(I a) { return _mm512_cvtepi32_ps(a); }
  static I cvtt_f32_i32(F a) { return _mm512_cvttps_epi32(a); }
  static F as_f(I a) { return _mm512_castsi512_ps(a); }
  static I as_i(F a) { return _mm512_castps_si512(a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  // mask_blend takes its second operand where the mask is set.
  static F select_odd(I n, F a, F b) { return _mm512_mask_blend_ps(_mm512_test_epi32_mask(n, set1_32(1u)), b, a); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static I load_i(const uint32_t* p) { return _mm512_load_si512(p); }
  static void store_i(uint32_t* p, I a) { _mm512_store_si512(p, a); }
  static void interleave(F a, F b, F& lo, F& hi) {
    // Index i < 16 reads a[i], 16 + i reads b[i].
    const I lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const I hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    lo = _mm512_permutex2var_ps(a, lo_idx, b);
    hi = _mm512_permutex2var_ps(a, hi_idx, b);
  }
};

}  // namespace

void noisy_scale_avx512(float* x, int64_t n, float k, float sigma, const NoiseKey& key) {
  noisy_scale<Avx512, 3>(x, n, k, sigma, key);
}

}  // namespace simd
}  // namespace agm_fast

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // AGM_FAST_X86_SIMD
