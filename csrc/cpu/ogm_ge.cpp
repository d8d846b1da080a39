// CPU implementation of ogm_ge_ (see ogm_ge.h for the maths).
//
// Work is split into a fixed table of chunks (kChunk elements of one tensor each) and run with OpenMP over that
// table, so large and small tensors share the threads. The result depends on neither the thread count nor the
// schedule: every chunk computes its statistics and its noise the same way whichever thread runs it, and the
// per-chunk statistics of a tensor are merged sequentially in chunk order. Runs are therefore bitwise reproducible.
//
// Two passes over memory when the noise is on (statistics, then scale + noise), one when it is off.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/ogm_ge_noise.h"
#include "ogm_ge.h"
#include "philox.h"

// The noise and statistics loops are compiled for AVX-512 and AVX2 as well as the baseline ISA; the loader picks the
// best one the machine has (GNU ifunc). Elsewhere the baseline build is used.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__INTEL_COMPILER)
#define AGM_FAST_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AGM_FAST_CPU_CLONES
#endif

namespace agm_fast {
namespace {

// Elements per work item. A multiple of 4 (whole Philox counters) and small enough to stay in L2 between the two
// statistics passes.
constexpr int64_t kChunk = 16384;
// Elements processed together on the stack: converted to float32, or given their normals.
constexpr int64_t kBlock = 1024;

// Count, mean and sum of squared deviations of a run of elements.
struct Moments {
  double n = 0.0;
  double mean = 0.0;
  double m2 = 0.0;
};

// Chan et al.'s pairwise merge: stable, unlike the sum of squares minus the square of the sum.
inline Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  Moments out;
  out.n = a.n + b.n;
  const double delta = b.mean - a.mean;
  out.mean = a.mean + delta * (b.n / out.n);
  out.m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / out.n);
  return out;
}

// Two-pass moments of n <= kBlock float32 values (in L1 for the second pass).
AGM_FAST_CPU_CLONES Moments block_moments(const float* x, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const float mean = sum / static_cast<float>(n);
  float m2 = 0.0f;
  float dsum = 0.0f;
#pragma omp simd reduction(+ : m2, dsum)
  for (int64_t j = 0; j < n; ++j) {
    const float d = x[j] - mean;
    m2 += d * d;
    dsum += d;
  }
  Moments out;
  out.n = static_cast<double>(n);
  // Corrected two-pass: removes the error of the rounded mean (Chan, Golub and LeVeque).
  out.mean = static_cast<double>(mean) + static_cast<double>(dsum) / out.n;
  out.m2 = static_cast<double>(m2) - static_cast<double>(dsum) * static_cast<double>(dsum) / out.n;
  return out;
}

// The portable noise pass: the normals of a block of counters into a buffer (the loop vectorises where the compiler
// can), then the scaling.
void noisy_scale_portable(float* x, int64_t n, float k, float sigma, const simd::NoiseKey& key) {
  float z[kBlock + 4];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    const int64_t first = key.first + b;  // the tensor index of element b
    const int64_t lane = first % 4;
    const uint64_t q0 = static_cast<uint64_t>(first / 4);
    const int64_t nq = (lane + m + 3) / 4;
#pragma omp simd
    for (int64_t j = 0; j < nq; ++j) {
      float z0, z1, z2, z3;
      philox::normal4(q0 + static_cast<uint64_t>(j), key.index, key.seed, key.offset, z0, z1, z2, z3);
      z[4 * j] = z0;
      z[4 * j + 1] = z1;
      z[4 * j + 2] = z2;
      z[4 * j + 3] = z3;
    }
    float* xb = x + b;
    for (int64_t j = 0; j < m; ++j) xb[j] = k * xb[j] + sigma * z[lane + j];
  }
}

// The best noise pass this CPU runs, capped by AGM_FAST_CPU_CAPABILITY (default, avx2 or avx512; unset: no cap).
simd::NoisyScaleFn pick_noisy_scale(const char** name = nullptr) {
  const char* cap_env = std::getenv("AGM_FAST_CPU_CAPABILITY");
  const std::string cap = cap_env == nullptr ? "" : cap_env;
  TORCH_CHECK(cap.empty() || cap == "default" || cap == "avx2" || cap == "avx512",
              "AGM_FAST_CPU_CAPABILITY: expected default, avx2 or avx512, got '", cap, "'");
  const char* unused;
  const char*& chosen = name == nullptr ? unused : *name;
#if AGM_FAST_X86_SIMD
  __builtin_cpu_init();
  if ((cap.empty() || cap == "avx512") && __builtin_cpu_supports("avx512f")) {
    chosen = "avx512";
    return &simd::noisy_scale_avx512;
  }
  if (cap != "default" && __builtin_cpu_supports("avx2")) {
    chosen = "avx2";
    return &simd::noisy_scale_avx2;
  }
#endif
  chosen = "default";
  return &noisy_scale_portable;
}

template <typename scalar_t>
Moments chunk_moments(const void* data, int64_t begin, int64_t end) {
  const scalar_t* x = static_cast<const scalar_t*>(data);
  Moments acc;
  float buf[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const float* xf;
    if constexpr (std::is_same_v<scalar_t, float>) {
      xf = x + b;
    } else {
      for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(x[b + j]);
      xf = buf;
    }
    acc = merge(acc, block_moments(xf, n));
  }
  return acc;
}

template <typename scalar_t>
void chunk_apply(void* data, int64_t begin, int64_t end, float k, bool noise, float sigma, const simd::NoiseKey& key,
                 simd::NoisyScaleFn noisy_scale) {
  scalar_t* x = static_cast<scalar_t*>(data);
  if (!noise) {
    for (int64_t j = begin; j < end; ++j) x[j] = static_cast<scalar_t>(k * static_cast<float>(x[j]));
    return;
  }
  // key.first is the tensor index of element 0; the noise pass wants that of its own first element.
  if constexpr (std::is_same_v<scalar_t, float>) {
    noisy_scale(x + begin, end - begin, k, sigma, {key.first + begin, key.index, key.seed, key.offset});
  } else {
    // Through a float32 buffer: the same float32 arithmetic, rounded once to the gradient dtype.
    float buf[kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = std::min(kBlock, end - b);
      for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(x[b + j]);
      noisy_scale(buf, n, k, sigma, {key.first + b, key.index, key.seed, key.offset});
      for (int64_t j = 0; j < n; ++j) x[b + j] = static_cast<scalar_t>(buf[j]);
    }
  }
}

using MomentsFn = Moments (*)(const void*, int64_t, int64_t);
using ApplyFn = void (*)(void*, int64_t, int64_t, float, bool, float, const simd::NoiseKey&, simd::NoisyScaleFn);

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

}  // namespace

std::string ogm_ge_cpu_capability() {
  const char* name = nullptr;
  pick_noisy_scale(&name);
  return name;
}

void ogm_ge_cpu(at::TensorList grads, at::IntArrayRef group, const at::Tensor& coeffs, bool noise, int64_t seed,
                int64_t offset, at::OptionalIntArrayRef starts, const c10::optional<at::Tensor>& sigma_in) {
  check_ogm_ge_args(grads, group, coeffs, starts, sigma_in);
  TORCH_CHECK(grads[0].device().is_cpu(), "ogm_ge_cpu: expected CPU tensors, got ", grads[0].device());
  const int64_t num_tensors = static_cast<int64_t>(grads.size());

  std::vector<void*> data(num_tensors);
  std::vector<MomentsFn> moments_fn(num_tensors);
  std::vector<ApplyFn> apply_fn(num_tensors);
  std::vector<int64_t> first_chunk(num_tensors + 1, 0);
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < num_tensors; ++i) {
    const at::Tensor& g = grads[i];
    data[i] = g.mutable_data_ptr();
    AGM_FAST_DISPATCH_GRAD_TYPES(g.scalar_type(), "ogm_ge_cpu", [&] {
      moments_fn[i] = &chunk_moments<scalar_t>;
      apply_fn[i] = &chunk_apply<scalar_t>;
    });
    const int64_t numel = g.numel();
    for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({i, b, std::min(numel, b + kChunk)});
    first_chunk[i + 1] = static_cast<int64_t>(chunks.size());
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const int num_threads = at::get_num_threads();

  std::vector<float> sigma(num_tensors, 0.0f);
  if (noise && sigma_in.has_value()) {
    const at::Tensor given = sigma_in->contiguous();
    const float* sp = given.const_data_ptr<float>();
    for (int64_t i = 0; i < num_tensors; ++i) sigma[i] = sp[i];
  } else if (noise) {
    std::vector<Moments> partial(num_chunks);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t c = 0; c < num_chunks; ++c) {
      const Chunk& ch = chunks[c];
      partial[c] = moments_fn[ch.tensor](data[ch.tensor], ch.begin, ch.end);
    }
    for (int64_t i = 0; i < num_tensors; ++i) {
      Moments m;
      for (int64_t c = first_chunk[i]; c < first_chunk[i + 1]; ++c) m = merge(m, partial[c]);
      // The unbiased std of one element is undefined; it is taken as 0 (sigma = 1e-8).
      // A non-finite gradient gives NaN moments; std::max(NaN, 0.0) returns its first argument, so sigma is NaN and
      // the gradient stays non-finite.
      const double stddev = m.n > 1.0 ? std::sqrt(std::max(m.m2, 0.0) / (m.n - 1.0)) : 0.0;
      sigma[i] = static_cast<float>(stddev) + 1e-8f;
    }
  }

  const float* k = coeffs.const_data_ptr<float>();
  const int64_t k_stride = coeffs.stride(0);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint64_t uoffset = static_cast<uint64_t>(offset);
  const simd::NoisyScaleFn noisy_scale = noise ? pick_noisy_scale() : nullptr;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const int64_t i = ch.tensor;
    const simd::NoiseKey key{starts.has_value() ? (*starts)[i] : 0, static_cast<uint32_t>(i), useed, uoffset};
    apply_fn[i](data[i], ch.begin, ch.end, k[group[i] * k_stride], noise, sigma[i], key, noisy_scale);
  }
}

}  // namespace agm_fast
