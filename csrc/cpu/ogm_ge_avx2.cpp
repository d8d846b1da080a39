// The noise pass of ogm_ge_ with AVX2 (ogm_ge_simd.h on 256-bit vectors); ogm_ge.cpp calls it where the CPU has AVX2.
//
// Everything before the target pragma is compiled for the baseline ISA; only this file's own functions are AVX2, and
// they have internal linkage (ogm_ge_simd.h) except the entry point. No FMA: the ISA is AVX2 alone.

#include "cpu/ogm_ge_noise.h"

#if AGM_FAST_X86_SIMD
#include <immintrin.h>

#include <cstdint>

#include "philox.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC target("avx2")
#endif

#include "cpu/ogm_ge_simd.h"

namespace agm_fast {
namespace simd {
namespace {

struct Avx2 {
  using I = __m256i;
  using F = __m256;
  static constexpr int kFloats = 8;

  static I iota64(uint64_t q) {
    return _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(q)), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static I set1_64(uint32_t v) { return _mm256_set1_epi64x(static_cast<long long>(v)); }
  static I set1_32(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static F set1_f(float v) { return _mm256_set1_ps(v); }
  static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I and32(I a, I b) { return _mm256_and_si256(a, b); }
  static I or32(I a, I b) { return _mm256_or_si256(a, b); }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  template <int N>
  static I srli64(I a) { return _mm256_srli_epi64(a, N); }
  template <int N>
  static I srli32(I a) { return _mm256_srli_epi32(a, N); }
  template <int N>
  static I slli32(I a) { return _mm256_slli_epi32(a, N); }
  static I mul_epu32(I a, I b) { return _mm256_mul_epu32(a, b); }
  static I gt32(I a, I b) { return _mm256_cmpgt_epi32(a, b); }
  static I low_pairs(I a, I b) { return _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA); }
  static F cvt_i32_f32(I a) { return _mm256_cvtepi32_ps(a); }
  static I cvtt_f32_i32(F a) { return _mm256_cvttps_epi32(a); }
  static F as_f(I a) { return _mm256_castsi256_ps(a); }
  static I as_i(F a) { return _mm256_castps_si256(a); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  // blendv reads the sign bit of each lane: n << 31 is set where n is odd.
  static F select_odd(I n, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(_mm256_slli_epi32(n, 31))); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static I load_i(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store_i(uint32_t* p, I a) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), a); }
  static void interleave(F a, F b, F& lo, F& hi) {
    const F t0 = _mm256_unpacklo_ps(a, b);  // a0 b0 a1 b1 | a4 b4 a5 b5
    const F t1 = _mm256_unpackhi_ps(a, b);  // a2 b2 a3 b3 | a6 b6 a7 b7
    lo = _mm256_permute2f128_ps(t0, t1, 0x20);
    hi = _mm256_permute2f128_ps(t0, t1, 0x31);
  }
};

}  // namespace

void noisy_scale_avx2(float* x, int64_t n, float k, float sigma, const NoiseKey& key) {
  noisy_scale<Avx2, 6>(x, n, k, sigma, key);
}

}  // namespace simd
}  // namespace agm_fast

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // AGM_FAST_X86_SIMD
