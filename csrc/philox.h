// Counter-based Gaussian noise shared by the CPU and CUDA kernels of agm_fast.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) turns a 128-bit counter
// and a 64-bit key into four 32-bit words. agm_fast keys it on the seed and counts on
// (element_index / 4, tensor index, offset), so any element's noise can be computed independently, on any device,
// in any order: a run is reproducible and every data-parallel replica draws the same noise.
//
// The four words of one counter give the normals of four consecutive elements by the Box-Muller transform on 24-bit
// uniforms (exact in float32):
//   u1 = ((x_a >> 8) + 1) * 2^-24 in (0, 1],   u2 = (x_b >> 8) * 2^-24 in [0, 1),
//   r = sqrt(-2 ln u1),   z_a = r cos(2 pi u2),   z_b = r sin(2 pi u2),
// for the pairs (x0, x1) -> elements 4q, 4q+1 and (x2, x3) -> elements 4q+2, 4q+3.
//
// The logarithm and the sine/cosine are branch-free float32 polynomial evaluations (Cephes coefficients, about one
// ulp) instead of calls into libm, so that the CPU loops vectorise and the CPU and CUDA builds evaluate the same
// arithmetic. The quarter-turn range reduction of sin/cos works on u2 itself, which is exact. Every multiply and add
// rounds on its own (no fused multiply-add): mul/add/sub below are __fmul_rn/__fadd_rn on the GPU, which nvcc never
// contracts, and plain operators on the CPU, built with -ffp-contract=off. The noise is then bitwise the same on
// every CPU ISA (csrc/cpu/ogm_ge_simd.h), on CUDA and in agm_fast.reference.philox_normal_ref.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AGM_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define AGM_FAST_HOST_DEVICE __forceinline
#else
#define AGM_FAST_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace agm_fast {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

// 2^-24: the spacing of the 24-bit uniforms.
constexpr float kInv24 = 5.9604644775390625e-08f;

AGM_FAST_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

AGM_FAST_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Float32 arithmetic rounded after every operation.
AGM_FAST_HOST_DEVICE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

AGM_FAST_HOST_DEVICE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

AGM_FAST_HOST_DEVICE float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Correctly rounded square root (nvcc's sqrtf is too, unless built with fast math; this does not depend on it).
AGM_FAST_HOST_DEVICE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// One Philox round on the counter (c0, c1, c2, c3) with the round key (k0, k1).
AGM_FAST_HOST_DEVICE void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// Philox4x32-10: ten rounds, the key bumped by the Weyl constants between rounds. In place on the counter.
AGM_FAST_HOST_DEVICE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                        uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
}

// Natural logarithm of a positive, normal, finite float (the only inputs Box-Muller gives it: [2^-24, 1]).
AGM_FAST_HOST_DEVICE float log_positive(float x) {
  const uint32_t b = float_bits(x);
  // Mantissa in [1, 2), folded into [sqrt(1/2), sqrt(2)) so that the polynomial argument stays small: mantissas
  // above sqrt(2) (0x3504F3) get the exponent of [0.5, 1) and one more in e. Integer selects keep it branch-free.
  const uint32_t fold = (b & 0x007FFFFFu) > 0x003504F3u ? 1u : 0u;
  const float m = bits_float((b & 0x007FFFFFu) | (0x3F800000u - (fold << 23)));
  const float e = static_cast<float>(static_cast<int32_t>((b >> 23) + fold) - 127);
  const float f = sub(m, 1.0f);
  const float z = mul(f, f);
  float y = 7.0376836292e-2f;
  y = sub(mul(y, f), 1.1514610310e-1f);
  y = add(mul(y, f), 1.1676998740e-1f);
  y = sub(mul(y, f), 1.2420140846e-1f);
  y = add(mul(y, f), 1.4249322787e-1f);
  y = sub(mul(y, f), 1.6668057665e-1f);
  y = add(mul(y, f), 2.0000714765e-1f);
  y = sub(mul(y, f), 2.4999993993e-1f);
  y = add(mul(y, f), 3.3333331174e-1f);
  y = mul(mul(y, f), z);
  // ln 2 split in a short head (exact in the product with e) and a correction.
  y = add(y, mul(-2.12194440e-4f, e));
  y = add(y, mul(-0.5f, z));
  return add(add(f, y), mul(0.693359375f, e));
}

// sin(2 pi u) and cos(2 pi u) for u in [0, 1). The reduction to the nearest quarter turn, u - n/4, is exact in float32.
AGM_FAST_HOST_DEVICE void sincos_2pi(float u, float& s, float& c) {
  const int n = static_cast<int>(add(mul(4.0f, u), 0.5f));
  const float a = mul(sub(u, mul(0.25f, static_cast<float>(n))), 6.28318530717958647692f);  // |a| <= pi/4
  const float z = mul(a, a);
  const float sp =
      add(a, mul(mul(a, z), add(-1.6666654611e-1f, mul(z, add(8.3321608736e-3f, mul(z, -1.9515295891e-4f))))));
  const float cp = add(sub(1.0f, mul(0.5f, z)),
                       mul(mul(z, z), add(4.166664568298827e-2f,
                                          mul(z, add(-1.388731625493765e-3f, mul(z, 2.443315711809948e-5f))))));
  // Rotate by n quarter turns: odd n swaps sin and cos, then the signs of (sin, cos) follow the quadrant. Done on
  // the bits so that the loop has no branch and vectorises.
  const uint32_t swap = 0u - static_cast<uint32_t>(n & 1);
  const uint32_t sb = float_bits(sp), cb = float_bits(cp);
  const uint32_t s0 = (cb & swap) | (sb & ~swap);
  const uint32_t c0 = (sb & swap) | (cb & ~swap);
  s = bits_float(s0 ^ (static_cast<uint32_t>(n & 2) << 30));
  c = bits_float(c0 ^ (static_cast<uint32_t>((n + 1) & 2) << 30));
}

// Two standard normals from two Philox words.
AGM_FAST_HOST_DEVICE void box_muller(uint32_t xa, uint32_t xb, float& za, float& zb) {
  const float u1 = mul(static_cast<float>((xa >> 8) + 1u), kInv24);
  const float u2 = mul(static_cast<float>(xb >> 8), kInv24);
  const float r = sqrt_rn(mul(-2.0f, log_positive(u1)));
  float s, c;
  sincos_2pi(u2, s, c);
  za = mul(r, c);
  zb = mul(r, s);
}

// The four normals of elements 4q .. 4q+3 of tensor `index` under (seed, offset).
AGM_FAST_HOST_DEVICE void normal4(uint64_t q, uint32_t index, uint64_t seed, uint64_t offset, float& z0, float& z1,
                                  float& z2, float& z3) {
  uint32_t c0 = static_cast<uint32_t>(q), c1 = index;
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(c0, c1, z0, z1);
  box_muller(c2, c3, z2, z3);
}

}  // namespace philox
}  // namespace agm_fast
