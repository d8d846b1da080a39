// AGM's scores and coefficients on stacked subset logits F [S, B, C], on the CPU, in one call.
//
// The arithmetic of agm_fast.ops.shapley.shapley_scores_torch (docs/methods.md, sections 1.3 and 1.4):
//   psi[m] = sum_s W[m, s] F[s]              (one float32 matrix product, returned in F's dtype)
//   s_m    = mean_b -max(log softmax(psi_m)[b, y_b], log 1e-8)   (regression: mean (psi_m - y)^2)
//   r_m = exp(mean_{j!=m} s_j - s_m), rbar_m the same on the running means, c_m = exp(alpha min(rbar_m - r_m, cap))
//   running <- running t/(t+1) + s/(t+1), t <- t+1, unless a score is not finite.
// A row of psi with a non-finite value gives a NaN score; outside the window the coefficients are 1 (or the
// previous ones with hold_last), NaN when a score is not finite. The statistics are float32, as on the torch path;
// the sums run in another order, so the results agree with it to float32 rounding, not bitwise.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace agm_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shapley_scores_cpu(
    const at::Tensor& F, const at::Tensor& W, const at::Tensor& labels, const at::Tensor& running,
    const at::Tensor& count, const at::Tensor& prev_coeffs, double alpha, c10::optional<double> cap, bool in_window,
    bool hold_last, bool regression);

}  // namespace agm_fast
