// CUDA implementation of ogm_ge_ (see ogm_ge.h for the maths): a multi-tensor launch over a chunk table.
//
// Every tensor is cut into chunks of kChunk elements and every chunk is one thread block, so one grid covers the
// whole list whatever the tensor sizes. Tensors are grouped by dtype; each dtype present costs two launches when the
// noise is on (statistics, then scale + noise) and one when it is off. Both run on the current stream and nothing
// synchronises with the host: the coefficients are read by the kernel.
//
// The launch table (per-tensor records and the chunk -> tensor map) is a few int64 words per tensor and per chunk,
// written to pinned memory and copied asynchronously; the statistics workspace is two doubles per chunk. Nothing
// proportional to the gradient size is allocated.
//
// Determinism: each chunk's moments come from a fixed-shape block reduction, and the apply kernel merges a tensor's
// chunk moments with a fixed tree (thread t folds chunks t, t + kThreads, ... in order, then a fixed shuffle tree), so
// the result does not depend on scheduling.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "ogm_ge.h"
#include "philox.h"

namespace agm_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elements per thread block; a multiple of 4 so that every chunk starts on a Philox counter.
constexpr int64_t kChunk = 16384;

// One tensor of the launch table, as int64 words.
struct TensorRecord {
  int64_t data;         // address of the first element
  int64_t numel;
  int64_t first_chunk;  // global index of its first chunk
  int64_t num_chunks;
  int64_t index;        // position in the user's list (the Philox counter word)
  int64_t group;        // modality: which coefficient scales it
  int64_t start;        // global index of element 0 (a shard of a larger tensor; 0 otherwise)
};
constexpr int64_t kRecordWords = sizeof(TensorRecord) / sizeof(int64_t);
static_assert(sizeof(TensorRecord) == kRecordWords * sizeof(int64_t), "TensorRecord must be packed int64 words");

struct Moments {
  double n;
  double mean;
  double m2;
};

// Chan et al.'s pairwise merge (stable); an empty side returns the other unchanged.
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  const double n = a.n + b.n;
  const double delta = b.mean - a.mean;
  return {n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

// Sum over the block with a fixed shuffle tree, so the result is the same on every run. All threads get the sum.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

__device__ __forceinline__ Moments shfl_down(const Moments& m, int off) {
  return {__shfl_down_sync(0xffffffffu, m.n, off), __shfl_down_sync(0xffffffffu, m.mean, off),
          __shfl_down_sync(0xffffffffu, m.m2, off)};
}

// Merge of the block's moments with a fixed tree; the result is valid in thread 0.
__device__ __forceinline__ Moments block_merge(Moments m, Moments* shared) {
  for (int off = 16; off > 0; off >>= 1) m = merge(m, shfl_down(m, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? shared[lane] : Moments{0.0, 0.0, 0.0};
    for (int off = 16; off > 0; off >>= 1) m = merge(m, shfl_down(m, off));
  }
  return m;
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The record of the tensor that owns `chunk`, copied to registers (the kernels write through pointers the compiler
// cannot tell apart from the table).
__device__ __forceinline__ TensorRecord chunk_record(const int64_t* table, int64_t num_tensors, int64_t chunk) {
  const TensorRecord* records = reinterpret_cast<const TensorRecord*>(table);
  const int64_t* chunk_tensor = table + num_tensors * kRecordWords;
  return records[chunk_tensor[chunk]];
}

// Moments of one chunk (corrected two-pass in float32; the second pass reads from L2) into partial[chunk].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ogm_ge_stats_kernel(const int64_t* __restrict__ table, int64_t num_tensors, int64_t chunk0,
                        double2* __restrict__ partial) {
  __shared__ float shared[kWarps];
  const int64_t chunk = chunk0 + blockIdx.x;
  const TensorRecord rec = chunk_record(table, num_tensors, chunk);
  const int64_t begin = (chunk - rec.first_chunk) * kChunk;
  const int64_t n = imin(kChunk, rec.numel - begin);
  const scalar_t* x = reinterpret_cast<const scalar_t*>(rec.data) + begin;

  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) sum += static_cast<float>(x[j]);
  const float mean = block_sum(sum, shared) / static_cast<float>(n);
  float m2 = 0.0f, dsum = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const float d = static_cast<float>(x[j]) - mean;
    m2 += d * d;
    dsum += d;
  }
  m2 = block_sum(m2, shared);
  dsum = block_sum(dsum, shared);
  if (threadIdx.x == 0) {
    // Corrected two-pass: dsum removes the error of the rounded mean (Chan, Golub and LeVeque).
    const double dn = static_cast<double>(n);
    partial[chunk] = make_double2(static_cast<double>(mean) + static_cast<double>(dsum) / dn,
                                  static_cast<double>(m2) - static_cast<double>(dsum) * static_cast<double>(dsum) / dn);
  }
}

// g <- k g (+ sigma z) on one chunk; with noise, sigma comes from the merged moments of the chunk's tensor.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ogm_ge_apply_kernel(const int64_t* __restrict__ table, int64_t num_tensors, int64_t chunk0,
                        const double2* __restrict__ partial, const float* __restrict__ coeffs, int64_t coeff_stride,
                        const float* __restrict__ given_sigma, bool noise, uint64_t seed, uint64_t offset) {
  __shared__ Moments shared_moments[kWarps];
  __shared__ float shared_sigma;
  const int64_t chunk = chunk0 + blockIdx.x;
  const TensorRecord rec = chunk_record(table, num_tensors, chunk);
  const int64_t begin = (chunk - rec.first_chunk) * kChunk;
  const int64_t n = imin(kChunk, rec.numel - begin);
  scalar_t* x = reinterpret_cast<scalar_t*>(rec.data) + begin;
  const float k = coeffs[rec.group * coeff_stride];

  if (!noise) {
    for (int64_t j = threadIdx.x; j < n; j += kThreads) x[j] = static_cast<scalar_t>(k * static_cast<float>(x[j]));
    return;
  }

  float sigma;
  if (given_sigma != nullptr) {
    // The caller's sigma (the merged moments of all shards of the tensor).
    sigma = given_sigma[rec.index];
  } else {
    Moments m{0.0, 0.0, 0.0};
    for (int64_t j = threadIdx.x; j < rec.num_chunks; j += kThreads) {
      const double2 p = partial[rec.first_chunk + j];
      const double count = static_cast<double>(imin(kChunk, rec.numel - j * kChunk));
      m = merge(m, Moments{count, p.x, p.y});
    }
    m = block_merge(m, shared_moments);
    if (threadIdx.x == 0) {
      // One element has no unbiased std: it is taken as 0. A NaN m2 (non-finite gradient) stays NaN through fmax.
      const double var = m.n > 1.0 ? fmax(m.m2, 0.0) / (m.n - 1.0) : 0.0;
      shared_sigma = static_cast<float>(isnan(m.m2) ? m.m2 : sqrt(var)) + 1e-8f;
    }
    __syncthreads();
    sigma = shared_sigma;
  }

  // Global quads (Philox counters) that cover this chunk's elements: a shard may start inside a quad.
  const int64_t first = rec.start + begin;
  const int64_t q_first = first / 4;
  const int64_t num_quads = (first + n + 3) / 4 - q_first;
  const uint32_t index = static_cast<uint32_t>(rec.index);
  for (int64_t q = threadIdx.x; q < num_quads; q += kThreads) {
    float z[4];
    philox::normal4(static_cast<uint64_t>(q_first + q), index, seed, offset, z[0], z[1], z[2], z[3]);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = 4 * (q_first + q) + e - first;
      // Rounded after each operation, as on the CPU (no fused multiply-add): the same float32 result.
      if (j >= 0 && j < n) {
        x[j] = static_cast<scalar_t>(philox::add(philox::mul(k, static_cast<float>(x[j])), philox::mul(sigma, z[e])));
      }
    }
  }
}

}  // namespace

void ogm_ge_cuda(at::TensorList grads, at::IntArrayRef group, const at::Tensor& coeffs, bool noise, int64_t seed,
                 int64_t offset, at::OptionalIntArrayRef starts, const c10::optional<at::Tensor>& sigma) {
  check_ogm_ge_args(grads, group, coeffs, starts, sigma);
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), "ogm_ge_cuda: expected CUDA tensors, got ", device);
  const c10::cuda::CUDAGuard guard(device);
  const int64_t num_tensors = static_cast<int64_t>(grads.size());

  // Tensors ordered by dtype, so that each dtype is one contiguous range of records and chunks (one launch each).
  const at::ScalarType dtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};
  std::vector<int64_t> order;
  order.reserve(num_tensors);
  for (const at::ScalarType dt : dtypes) {
    for (int64_t i = 0; i < num_tensors; ++i) {
      if (grads[i].scalar_type() == dt) order.push_back(i);
    }
  }
  int64_t num_chunks = 0;
  for (const int64_t i : order) num_chunks += (grads[i].numel() + kChunk - 1) / kChunk;

  at::Tensor table_host = at::empty({num_tensors * kRecordWords + num_chunks},
                                    at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* words = table_host.data_ptr<int64_t>();
  TensorRecord* records = reinterpret_cast<TensorRecord*>(words);
  int64_t* chunk_tensor = words + num_tensors * kRecordWords;
  struct Range {
    at::ScalarType dtype;
    int64_t chunk_begin;
    int64_t chunk_end;
  };
  std::vector<Range> ranges;
  int64_t chunk = 0;
  for (int64_t pos = 0; pos < num_tensors; ++pos) {
    const at::Tensor& g = grads[order[pos]];
    const int64_t chunks = (g.numel() + kChunk - 1) / kChunk;
    records[pos] = {reinterpret_cast<int64_t>(g.mutable_data_ptr()), g.numel(), chunk, chunks, order[pos],
                    group[order[pos]], starts.has_value() ? (*starts)[order[pos]] : 0};
    if (ranges.empty() || ranges.back().dtype != g.scalar_type()) ranges.push_back({g.scalar_type(), chunk, chunk});
    for (int64_t c = 0; c < chunks; ++c) chunk_tensor[chunk + c] = pos;
    chunk += chunks;
    ranges.back().chunk_end = chunk;
  }
  // The caching host allocator keeps the pinned block alive until this copy has run on the stream.
  const at::Tensor table = table_host.to(device, at::kLong, /*non_blocking=*/true);
  const bool stats = noise && !sigma.has_value();
  const at::Tensor partial = stats && num_chunks > 0
                                 ? at::empty({num_chunks, 2}, at::TensorOptions().dtype(at::kDouble).device(device))
                                 : at::Tensor();
  double2* partial_ptr = partial.defined() ? reinterpret_cast<double2*>(partial.data_ptr<double>()) : nullptr;
  const at::Tensor given = sigma.has_value() ? sigma->contiguous() : at::Tensor();
  const float* given_ptr = given.defined() ? given.const_data_ptr<float>() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const Range& r : ranges) {
    const unsigned int blocks = static_cast<unsigned int>(r.chunk_end - r.chunk_begin);
    // Only empty tensors (empty shards) of this dtype: nothing to launch.
    if (blocks == 0) continue;
    AGM_FAST_DISPATCH_GRAD_TYPES(r.dtype, "ogm_ge_cuda", [&] {
      if (stats) {
        ogm_ge_stats_kernel<scalar_t>
            <<<blocks, kThreads, 0, stream>>>(table.const_data_ptr<int64_t>(), num_tensors, r.chunk_begin, partial_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      ogm_ge_apply_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          table.const_data_ptr<int64_t>(), num_tensors, r.chunk_begin, partial_ptr, coeffs.const_data_ptr<float>(),
          coeffs.stride(0), given_ptr, noise, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace agm_fast
