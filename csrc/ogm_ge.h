// In-place noisy gradient scaling of OGM / OGM-GE over a list of gradient tensors.
//
// For tensor i of modality m = group[i]:
//   noise off: g <- coeffs[m] * g
//   noise on:  g <- coeffs[m] * g + sigma * z,  sigma = std_unbiased(g before scaling) + 1e-8,
// with z the Philox normals of philox.h keyed on (seed, offset, i, element index). A one-element tensor has no
// unbiased std; its std is taken as 0. Statistics are accumulated in float32 or better whatever the gradient dtype,
// and the coefficients are read from device memory (no host synchronisation).
//
// Shards (FSDP): with starts, tensor i is the slice of a larger tensor that begins at element starts[i], and its
// element j draws the normal of element starts[i] + j, so a shard's noise is bitwise the slice of the whole
// tensor's. With sigma (a [num tensors] float32 device tensor) the std is not computed: sigma[i] is used as given
// (the caller merges the shards' moments; docs/training-at-scale.md). Empty tensors (an empty shard) are allowed and
// left alone; they keep their place in the tensor indices.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cstdint>
#include <string>

// Dispatch over the gradient dtypes the op supports (float32, float16, bfloat16), with scalar_t bound in the body.
#define AGM_FAST_DISPATCH_GRAD_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace agm_fast {

// Tensors of 2^34 elements or more would overflow the 32-bit element-quad field of the Philox counter.
constexpr int64_t kOgmGeMaxNumel = int64_t{1} << 34;

// Metadata checks shared by the CPU and CUDA entry points; reads no tensor values.
inline void check_ogm_ge_args(at::TensorList grads, at::IntArrayRef group, const at::Tensor& coeffs,
                              at::OptionalIntArrayRef starts = c10::nullopt,
                              const c10::optional<at::Tensor>& sigma = c10::nullopt) {
  TORCH_CHECK(!grads.empty(), "ogm_ge_: grads must hold at least one tensor");
  TORCH_CHECK(group.size() == grads.size(), "ogm_ge_: group must give one modality per gradient tensor, got ",
              group.size(), " entries for ", grads.size(), " tensors");
  int64_t num_groups = 0;
  for (size_t i = 0; i < group.size(); ++i) {
    TORCH_CHECK(group[i] >= 0, "ogm_ge_: group[", i, "] must be a modality index >= 0, got ", group[i]);
    num_groups = std::max(num_groups, group[i] + 1);
  }
  const at::Device device = grads[0].device();
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), "ogm_ge_: grads[", i, "] is undefined");
    TORCH_CHECK(g.device() == device, "ogm_ge_: all grads must be on one device; grads[0] is on ", device,
                " but grads[", i, "] is on ", g.device());
    const auto dt = g.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                "ogm_ge_: grads must be float32, float16 or bfloat16 tensors; grads[", i, "] is ", dt);
    TORCH_CHECK(g.is_contiguous(), "ogm_ge_: grads[", i, "] must be contiguous (it is modified in place)");
    TORCH_CHECK(g.numel() < kOgmGeMaxNumel, "ogm_ge_: grads[", i, "] has ", g.numel(),
                " elements; at most 2^34 - 1 are supported");
  }
  if (starts.has_value()) {
    TORCH_CHECK(starts->size() == grads.size(), "ogm_ge_: starts must give one element offset per gradient tensor, got ",
                starts->size(), " entries for ", grads.size(), " tensors");
    for (size_t i = 0; i < grads.size(); ++i) {
      TORCH_CHECK((*starts)[i] >= 0 && (*starts)[i] + grads[i].numel() < kOgmGeMaxNumel, "ogm_ge_: starts[", i,
                  "] must be >= 0 and place the shard below element 2^34, got ", (*starts)[i]);
    }
  }
  if (sigma.has_value()) {
    TORCH_CHECK(sigma->scalar_type() == at::kFloat && sigma->dim() == 1 &&
                    sigma->size(0) == static_cast<int64_t>(grads.size()),
                "ogm_ge_: sigma must be a float32 tensor of shape [", grads.size(), "], got ", sigma->scalar_type(),
                " ", sigma->sizes());
    TORCH_CHECK(sigma->device() == device, "ogm_ge_: sigma must be on the grads' device ", device, ", got ",
                sigma->device());
  }
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat, "ogm_ge_: coeffs must be float32, got ", coeffs.scalar_type());
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == num_groups, "ogm_ge_: coeffs must have shape [", num_groups,
              "] (one coefficient per modality, max(group) + 1), got ", coeffs.sizes());
  TORCH_CHECK(coeffs.device() == device, "ogm_ge_: coeffs must be on the grads' device ", device, ", got ",
              coeffs.device());
}

// CPU implementation (csrc/cpu/ogm_ge.cpp).
void ogm_ge_cpu(at::TensorList grads, at::IntArrayRef group, const at::Tensor& coeffs, bool noise, int64_t seed,
                int64_t offset, at::OptionalIntArrayRef starts, const c10::optional<at::Tensor>& sigma);

// The instruction set of the CPU noise pass the next call uses: "avx512", "avx2" or "default" (portable).
std::string ogm_ge_cpu_capability();

// CUDA implementation (csrc/cuda/ogm_ge.cu).
void ogm_ge_cuda(at::TensorList grads, at::IntArrayRef group, const at::Tensor& coeffs, bool noise, int64_t seed,
                 int64_t offset, at::OptionalIntArrayRef starts, const c10::optional<at::Tensor>& sigma);

}  // namespace agm_fast
