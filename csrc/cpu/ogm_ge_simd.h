// The noise pass of ogm_ge_ on CPU in SIMD registers: x <- k x + sigma z over float32, with z the Philox normals of
// philox.h, bitwise the same as its scalar normal4 (same operations in the same order, no fused multiply-add).
//
// Written once over a vector-ISA traits class V and instantiated by one source file per ISA (ogm_ge_avx2.cpp,
// ogm_ge_avx512.cpp), each compiled for its target with a pragma and nothing else from torch, so that no inline
// function compiled for a wider ISA can leak into the rest of the library. V provides:
//   I, F              integer and float vectors of kFloats 32-bit lanes (kFloats / 2 64-bit lanes)
//   iota64(q)         the 64-bit lanes q, q + 1, ...
//   set1_64/set1_32/set1_f, add32/sub32/and32/or32/xor_, srli64/srli32/slli32 (count as a template argument), mul_epu32 (64-bit products of the low 32-bit halves of the 64-bit lanes), gt32 (-1 where a > b,
//   signed), low_pairs(a, b) (the low halves of a's and b's 64-bit lanes, interleaved: a0, b0, a1, b1, ...),
//   cvt_i32_f32, cvtt_f32_i32, as_f/as_i, mul/add/sub, sqrt, select_odd(n, a, b) (a where n is odd, else b),
//   load/store (unaligned floats), load_i/store_i (aligned words), interleave(a, b, lo, hi) (lo, hi <- a0, b0, a1,
//   b1, ...). Wide<V, S> runs S of them in lockstep with the same interface.
//
// Philox runs on 64-bit lanes (one counter per lane): _mm*_mul_epu32 gives the full 32x32 -> 64 product, its high
// half is one shift away, and the garbage left in the high half of a lane is never read (every multiply reads only
// the low half; the output words are taken from the low halves). The counter's words 1 to 3 (tensor index, offset)
// are the same for every element, so the first two rounds are partly constant and are folded into scalars.
#pragma once

#include <algorithm>
#include <cstdint>

#include "ogm_ge_noise.h"
#include "philox.h"

namespace agm_fast {
namespace simd {
// Internal linkage: each ISA's source file has its own copy, compiled for that ISA only.
namespace {

// Round keys and the constants the first two Philox rounds fold, for one (tensor index, seed, offset).
struct PhiloxConsts {
  uint32_t k0[10];
  uint32_t k1[10];
  uint32_t r0_c0;      // round 0: new word 0 (constant)
  uint32_t r0_c1;      // round 0: new word 1 (constant)
  uint32_t r0_x2;      // round 0: word 2 = hi(M0 q) ^ r0_x2
  uint32_t r1_x0;      // round 1: word 0 = hi(M1 c2) ^ r1_x0
  uint32_t r1_m0_hi;   // round 1: hi(M0 r0_c0) ^ k1[1]; word 2 = word 3 (lo(M0 q)) ^ this
  uint32_t r1_c3;      // round 1: word 3 = lo(M0 r0_c0) (constant)
  uint32_t r2_x2;      // round 2: word 2 = hi(M0 c0) ^ r2_x2 (word 3 of round 1 is constant)

  PhiloxConsts(uint32_t index, uint64_t seed, uint64_t offset) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += philox::kW0;
      b += philox::kW1;
    }
    const uint32_t off_lo = static_cast<uint32_t>(offset), off_hi = static_cast<uint32_t>(offset >> 32);
    const uint64_t p1 = static_cast<uint64_t>(philox::kM1) * off_lo;
    r0_c0 = static_cast<uint32_t>(p1 >> 32) ^ index ^ k0[0];
    r0_c1 = static_cast<uint32_t>(p1);
    r0_x2 = off_hi ^ k1[0];
    r1_x0 = r0_c1 ^ k0[1];
    const uint64_t p0 = static_cast<uint64_t>(philox::kM0) * r0_c0;
    r1_m0_hi = static_cast<uint32_t>(p0 >> 32) ^ k1[1];
    r1_c3 = static_cast<uint32_t>(p0);
    r2_x2 = r1_c3 ^ k1[2];
  }
};

// PhiloxConsts broadcast to vectors of V, built once per call (the loop reads them as memory operands).
template <class V>
struct PhiloxVecs {
  typename V::I m0, m1, k0[10], k1[10], r0_c0, r0_x2, r1_x0, r1_m0_hi, r2_x2;

  explicit PhiloxVecs(const PhiloxConsts& c) {
    m0 = V::set1_64(philox::kM0);
    m1 = V::set1_64(philox::kM1);
    for (int r = 0; r < 10; ++r) {
      k0[r] = V::set1_64(c.k0[r]);
      k1[r] = V::set1_64(c.k1[r]);
    }
    r0_c0 = V::set1_64(c.r0_c0);
    r0_x2 = V::set1_64(c.r0_x2);
    r1_x0 = V::set1_64(c.r1_x0);
    r1_m0_hi = V::set1_64(c.r1_m0_hi);
    r2_x2 = V::set1_64(c.r2_x2);
  }
};

// Philox4x32-10 of the counters in the 64-bit lanes of q (words 1-3 and the key folded into c), on W = Wide<V, S>.
// Out: the four words in the low halves of the lanes of w0..w3.
template <class W>
inline __attribute__((always_inline)) void philox_lanes(typename W::I q, const PhiloxVecs<typename W::Base>& c,
                                                        typename W::I& w0, typename W::I& w1, typename W::I& w2,
                                                        typename W::I& w3) {
  using I = typename W::I;
  const I m0 = W::splat(c.m0), m1 = W::splat(c.m1);
  // Round 0: only the product M0 q varies.
  I p0 = W::mul_epu32(q, m0);
  I c0 = W::splat(c.r0_c0);
  I c2 = W::xor_(W::template srli64<32>(p0), W::splat(c.r0_x2));
  I c3 = p0;
  // Round 1: word 0 is constant, so is the product M0 c0.
  I p1 = W::mul_epu32(c2, m1);
  c0 = W::xor_(W::template srli64<32>(p1), W::splat(c.r1_x0));
  I c1 = p1;
  c2 = W::xor_(c3, W::splat(c.r1_m0_hi));
  // Round 2: word 3 is constant.
  p0 = W::mul_epu32(c0, m0);
  p1 = W::mul_epu32(c2, m1);
  c0 = W::xor_(W::xor_(W::template srli64<32>(p1), c1), W::splat(c.k0[2]));
  c1 = p1;
  c2 = W::xor_(W::template srli64<32>(p0), W::splat(c.r2_x2));
  c3 = p0;
#pragma GCC unroll 7
  for (int r = 3; r < 10; ++r) {
    p0 = W::mul_epu32(c0, m0);
    p1 = W::mul_epu32(c2, m1);
    const I n0 = W::xor_(W::xor_(W::template srli64<32>(p1), c1), W::splat(c.k0[r]));
    const I n2 = W::xor_(W::xor_(W::template srli64<32>(p0), c3), W::splat(c.k1[r]));
    c0 = n0;
    c1 = p1;
    c2 = n2;
    c3 = p0;
  }
  w0 = c0;
  w1 = c1;
  w2 = c2;
  w3 = c3;
}

// philox::log_positive on every lane.
template <class V>
inline __attribute__((always_inline)) typename V::F log_positive(typename V::F x) {
  using I = typename V::I;
  using F = typename V::F;
  const I b = V::as_i(x);
  const I mant = V::and32(b, V::set1_32(0x007FFFFFu));
  // -1 where the mantissa is above sqrt(2): those get the exponent of [0.5, 1) (0x3F800000 - 2^23) and one more in e.
  const I fold = V::gt32(mant, V::set1_32(0x003504F3u));
  const F m = V::as_f(V::or32(mant, V::add32(V::set1_32(0x3F800000u), V::template slli32<23>(fold))));
  const F e = V::cvt_i32_f32(V::sub32(V::sub32(V::template srli32<23>(b), fold), V::set1_32(127u)));
  const F f = V::sub(m, V::set1_f(1.0f));
  const F z = V::mul(f, f);
  F y = V::set1_f(7.0376836292e-2f);
  y = V::sub(V::mul(y, f), V::set1_f(1.1514610310e-1f));
  y = V::add(V::mul(y, f), V::set1_f(1.1676998740e-1f));
  y = V::sub(V::mul(y, f), V::set1_f(1.2420140846e-1f));
  y = V::add(V::mul(y, f), V::set1_f(1.4249322787e-1f));
  y = V::sub(V::mul(y, f), V::set1_f(1.6668057665e-1f));
  y = V::add(V::mul(y, f), V::set1_f(2.0000714765e-1f));
  y = V::sub(V::mul(y, f), V::set1_f(2.4999993993e-1f));
  y = V::add(V::mul(y, f), V::set1_f(3.3333331174e-1f));
  y = V::mul(V::mul(y, f), z);
  y = V::add(y, V::mul(V::set1_f(-2.12194440e-4f), e));
  y = V::add(y, V::mul(V::set1_f(-0.5f), z));
  return V::add(V::add(f, y), V::mul(V::set1_f(0.693359375f), e));
}

// philox::sincos_2pi on every lane.
template <class V>
inline __attribute__((always_inline)) void sincos_2pi(typename V::F u, typename V::F& s, typename V::F& c) {
  using I = typename V::I;
  using F = typename V::F;
  const I n = V::cvtt_f32_i32(V::add(V::mul(V::set1_f(4.0f), u), V::set1_f(0.5f)));
  const F a = V::mul(V::sub(u, V::mul(V::set1_f(0.25f), V::cvt_i32_f32(n))), V::set1_f(6.28318530717958647692f));
  const F z = V::mul(a, a);
  const F sp = V::add(
      a, V::mul(V::mul(a, z),
                V::add(V::set1_f(-1.6666654611e-1f),
                       V::mul(z, V::add(V::set1_f(8.3321608736e-3f), V::mul(z, V::set1_f(-1.9515295891e-4f)))))));
  const F cp = V::add(
      V::sub(V::set1_f(1.0f), V::mul(V::set1_f(0.5f), z)),
      V::mul(V::mul(z, z),
             V::add(V::set1_f(4.166664568298827e-2f),
                    V::mul(z, V::add(V::set1_f(-1.388731625493765e-3f), V::mul(z, V::set1_f(2.443315711809948e-5f)))))));
  const F s0 = V::select_odd(n, cp, sp);
  const F c0 = V::select_odd(n, sp, cp);
  const I sign = V::set1_32(2u);
  s = V::as_f(V::xor_(V::as_i(s0), V::template slli32<30>(V::and32(n, sign))));
  c = V::as_f(V::xor_(V::as_i(c0), V::template slli32<30>(V::and32(V::add32(n, V::set1_32(1u)), sign))));
}

// philox::box_muller on every lane.
template <class V>
inline __attribute__((always_inline)) void box_muller(typename V::I xa, typename V::I xb, typename V::F& za,
                                                      typename V::F& zb) {
  using F = typename V::F;
  const F inv24 = V::set1_f(philox::kInv24);
  const F u1 = V::mul(V::cvt_i32_f32(V::add32(V::template srli32<8>(xa), V::set1_32(1u))), inv24);
  const F u2 = V::mul(V::cvt_i32_f32(V::template srli32<8>(xb)), inv24);
  const F r = V::sqrt(V::mul(V::set1_f(-2.0f), log_positive<V>(u1)));
  F s, c;
  sincos_2pi<V>(u2, s, c);
  za = V::mul(r, c);
  zb = V::mul(r, s);
}

// S vectors of V as one: every operation applied to each, in lockstep, so that the S independent dependency chains
// (the polynomials are long ones) are interleaved in the instruction stream and fill the pipelines.
template <class V, int S>
struct Wide {
  using Base = V;
  struct I {
    typename V::I v[S];
  };
  struct F {
    typename V::F v[S];
  };
  static constexpr int kFloats = V::kFloats * S;

#define AGM_FAST_WIDE(R, name, params, args) \
  static R name params {                     \
    R r;                                     \
    for (int s = 0; s < S; ++s) r.v[s] = V::name args; \
    return r;                                \
  }
  AGM_FAST_WIDE(I, set1_64, (uint32_t x), (x))
  AGM_FAST_WIDE(I, set1_32, (uint32_t x), (x))
  AGM_FAST_WIDE(F, set1_f, (float x), (x))
  AGM_FAST_WIDE(I, add32, (I a, I b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(I, sub32, (I a, I b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(I, and32, (I a, I b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(I, or32, (I a, I b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(I, xor_, (I a, I b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(I, mul_epu32, (I a, I b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(I, gt32, (I a, I b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(I, low_pairs, (I a, I b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(F, cvt_i32_f32, (I a), (a.v[s]))
  AGM_FAST_WIDE(I, cvtt_f32_i32, (F a), (a.v[s]))
  AGM_FAST_WIDE(F, as_f, (I a), (a.v[s]))
  AGM_FAST_WIDE(I, as_i, (F a), (a.v[s]))
  AGM_FAST_WIDE(F, mul, (F a, F b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(F, add, (F a, F b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(F, sub, (F a, F b), (a.v[s], b.v[s]))
  AGM_FAST_WIDE(F, sqrt, (F a), (a.v[s]))
  AGM_FAST_WIDE(F, select_odd, (I n, F a, F b), (n.v[s], a.v[s], b.v[s]))
#undef AGM_FAST_WIDE
  template <int N>
  static I srli64(I a) {
    I r;
    for (int s = 0; s < S; ++s) r.v[s] = V::template srli64<N>(a.v[s]);
    return r;
  }
  template <int N>
  static I srli32(I a) {
    I r;
    for (int s = 0; s < S; ++s) r.v[s] = V::template srli32<N>(a.v[s]);
    return r;
  }
  template <int N>
  static I slli32(I a) {
    I r;
    for (int s = 0; s < S; ++s) r.v[s] = V::template slli32<N>(a.v[s]);
    return r;
  }
  static I load_i(const uint32_t* p) {
    I r;
    for (int s = 0; s < S; ++s) r.v[s] = V::load_i(p + s * V::kFloats);
    return r;
  }
  static void store_i(uint32_t* p, I a) {
    for (int s = 0; s < S; ++s) V::store_i(p + s * V::kFloats, a.v[s]);
  }
  static F load(const float* p) {
    F r;
    for (int s = 0; s < S; ++s) r.v[s] = V::load(p + s * V::kFloats);
    return r;
  }
  static void store(float* p, F a) {
    for (int s = 0; s < S; ++s) V::store(p + s * V::kFloats, a.v[s]);
  }
  static I splat(typename V::I a) {
    I r;
    for (int s = 0; s < S; ++s) r.v[s] = a;
    return r;
  }
  // Set s holds the counters q + s V::kFloats / 2, ...
  static I iota64(uint64_t q) {
    I r;
    for (int s = 0; s < S; ++s) r.v[s] = V::iota64(q + static_cast<uint64_t>(s * (V::kFloats / 2)));
    return r;
  }
};

// Lane 2i of a vector of xa takes word 0 of its counter i, lane 2i + 1 word 2 (and xb words 1 and 3): the pairs of
// Box-Muller. The normals za, zb of a lane are then elements 4i + 2 (lane & 1) and the one after, and interleaving
// za with zb puts the elements in order.
//
// x[j] <- k x[j] + sigma z_j for the nc counters q .. q + nc - 1 (elements x[0 .. 4 nc)), nc a multiple of
// V::kFloats / 2 * S, in three passes over buffers of kBlockCounters counters: the Philox words, the radii
// sqrt(-2 ln u1), then the angles, the normals and the scaling of x. Each pass is a loop of independent iterations of
// S vectors in lockstep, which the CPU overlaps; one loop doing it all is bound by the latency of the polynomials.
template <class V, int S>
struct NoiseBlock {
  using W = Wide<V, S>;
  static constexpr int kStep = V::kFloats / 2 * S;  // counters per iteration
  static constexpr int kBlockCounters = 256 / kStep * kStep;

  alignas(64) uint32_t xa[2 * kBlockCounters];
  alignas(64) uint32_t xb[2 * kBlockCounters];
  alignas(64) float radius[2 * kBlockCounters];

  void run(float* x, int nc, uint64_t q, float k, float sigma, const PhiloxVecs<V>& c) {
    using F = typename W::F;
    const F inv24 = W::set1_f(philox::kInv24);
    for (int i = 0; i < nc; i += kStep) {
      typename W::I w0, w1, w2, w3;
      philox_lanes<W>(W::iota64(q + static_cast<uint64_t>(i)), c, w0, w1, w2, w3);
      W::store_i(xa + 2 * i, W::low_pairs(w0, w2));
      W::store_i(xb + 2 * i, W::low_pairs(w1, w3));
    }
    for (int i = 0; i < 2 * nc; i += W::kFloats) {
      const F u1 = W::mul(W::cvt_i32_f32(W::add32(W::template srli32<8>(W::load_i(xa + i)), W::set1_32(1u))), inv24);
      W::store(radius + i, W::sqrt(W::mul(W::set1_f(-2.0f), log_positive<W>(u1))));
    }
    const typename V::F kv = V::set1_f(k), sv = V::set1_f(sigma);
    for (int i = 0; i < 2 * nc; i += W::kFloats) {
      const F u2 = W::mul(W::cvt_i32_f32(W::template srli32<8>(W::load_i(xb + i))), inv24);
      F s, co;
      sincos_2pi<W>(u2, s, co);
      const F r = W::load(radius + i);
      const F za = W::mul(r, co), zb = W::mul(r, s);
      for (int t = 0; t < S; ++t) {
        float* xs = x + 2 * (i + t * V::kFloats);
        typename V::F lo, hi;
        V::interleave(za.v[t], zb.v[t], lo, hi);
        V::store(xs, V::add(V::mul(kv, V::load(xs)), V::mul(sv, lo)));
        V::store(xs + V::kFloats, V::add(V::mul(kv, V::load(xs + V::kFloats)), V::mul(sv, hi)));
      }
    }
  }
};

// x[j] <- k x[j] + sigma z_j for j in [0, n): whole blocks in place, the last part of a block through a padded
// copy, and the elements before the first counter boundary (a shard that starts inside a counter) one by one.
template <class V, int S>
void noisy_scale(float* x, int64_t n, float k, float sigma, const NoiseKey& key) {
  using Block = NoiseBlock<V, S>;
  const int64_t head = std::min<int64_t>((4 - key.first % 4) % 4, n);
  scale_scalar(x, 0, head, k, sigma, key);
  const PhiloxVecs<V> c(PhiloxConsts(key.index, key.seed, key.offset));
  Block block;
  int64_t j = head;
  uint64_t q = static_cast<uint64_t>((key.first + j) / 4);
  for (; n - j >= 4 * Block::kStep; ) {
    const int nc = static_cast<int>(std::min<int64_t>(Block::kBlockCounters, (n - j) / (4 * Block::kStep) * Block::kStep));
    block.run(x + j, nc, q, k, sigma, c);
    j += 4 * static_cast<int64_t>(nc);
    q += static_cast<uint64_t>(nc);
  }
  if (j < n) {
    // Fewer elements than one iteration: computed on a padded copy (the padding's noise is drawn and dropped).
    alignas(64) float pad[4 * Block::kStep] = {};
    std::copy(x + j, x + n, pad);
    block.run(pad, Block::kStep, q, k, sigma, c);
    std::copy(pad, pad + (n - j), x + j);
  }
}

}  // namespace
}  // namespace simd
}  // namespace agm_fast
