// AGM's scores and coefficients on the CPU: see shapley.h.

#include "../shapley.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <vector>

namespace agm_fast {

namespace {

// The reference clamps the softmax probability at 1e-8 before the log; the torch path compares in float32.
const float kLogProbFloor = static_cast<float>(std::log(1e-8));

// -max(log softmax(x)[y], floor) of one row of C logits; NaN when a logit is not finite.
float row_nll(const float* x, int64_t C, int64_t y) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    if (!std::isfinite(x[c])) {
      return std::numeric_limits<float>::quiet_NaN();
    }
    mx = x[c] > mx ? x[c] : mx;
  }
  float sum = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    sum += std::exp(x[c] - mx);
  }
  const float logp = x[y] - mx - std::log(sum);
  return -(logp < kLogProbFloor ? kLogProbFloor : logp);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shapley_scores_cpu(
    const at::Tensor& F, const at::Tensor& W, const at::Tensor& labels, const at::Tensor& running,
    const at::Tensor& count, const at::Tensor& prev_coeffs, double alpha, c10::optional<double> cap, bool in_window,
    bool hold_last, bool regression) {
  TORCH_CHECK(F.dim() == 3, "F: expected subset logits [S, B, C], got ", F.dim(), " dimensions");
  TORCH_CHECK(W.dim() == 2 && W.size(1) == F.size(0), "W: expected [M, S] with S = ", F.size(0));
  const int64_t S = F.size(0), B = F.size(1), C = F.size(2), M = W.size(0);
  TORCH_CHECK(M >= 2 && B >= 1 && C >= 1, "shapley_scores: expected M >= 2, B >= 1 and C >= 1");
  TORCH_CHECK(running.numel() == M && prev_coeffs.numel() == M && count.numel() == 1,
              "shapley_scores: expected running and prev_coeffs of M values and one count");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // psi: the torch path's own float32 matrix product, then F's dtype (and float32 again for the statistics).
  at::Tensor psi32 = at::mm(W.to(at::kFloat), F.to(at::kFloat).reshape({S, B * C})).reshape({M, B, C});
  at::Tensor psi = psi32.to(F.scalar_type()).contiguous();
  at::Tensor x = psi.to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();

  at::Tensor scores = at::empty({M}, f32);
  float* sp = scores.data_ptr<float>();
  if (!regression) {
    TORCH_CHECK(labels.dim() == 1 && labels.size(0) == B && labels.scalar_type() == at::kLong,
                "labels: expected [B] int64 class indices");
    at::Tensor y = labels.contiguous();
    const int64_t* yp = y.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(yp[b] >= 0 && yp[b] < C, "labels: expected class indices in [0, ", C, "), got ", yp[b]);
    }
    for (int64_t m = 0; m < M; ++m) {
      double acc = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        acc += row_nll(xp + (m * B + b) * C, C, yp[b]);
      }
      sp[m] = static_cast<float>(static_cast<float>(acc) / static_cast<float>(B));
    }
  } else {
    TORCH_CHECK((labels.dim() == 1 && labels.size(0) == B) || (labels.dim() == 2 && labels.size(0) == B &&
                                                              labels.size(1) == C),
                "labels: expected regression targets [B] or [B, C]");
    at::Tensor y = labels.to(at::kFloat).contiguous();
    const float* yp = y.data_ptr<float>();
    const bool per_class = labels.dim() == 2;
    for (int64_t m = 0; m < M; ++m) {
      double acc = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          const float d = xp[(m * B + b) * C + c] - yp[per_class ? b * C + c : b];
          acc += d * d;
        }
      }
      sp[m] = static_cast<float>(static_cast<float>(acc) / static_cast<float>(B * C));
    }
  }

  at::Tensor run = running.to(at::kFloat).contiguous();
  at::Tensor prev = prev_coeffs.to(at::kFloat).contiguous();
  const float* rp = run.data_ptr<float>();
  const float* pp = prev.data_ptr<float>();
  const float t = count.to(at::kFloat).reshape({}).item<float>();
  float s_sum = 0.f, r_sum = 0.f;
  bool finite = true;
  for (int64_t m = 0; m < M; ++m) {
    s_sum += sp[m];
    r_sum += rp[m];
    finite = finite && std::isfinite(sp[m]);
  }
  at::Tensor coeffs = at::empty({M}, f32);
  at::Tensor running_new = at::empty({M}, f32);
  float* cp = coeffs.data_ptr<float>();
  float* np = running_new.data_ptr<float>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float denom = static_cast<float>(M - 1);
  for (int64_t m = 0; m < M; ++m) {
    if (in_window) {
      const float others = (s_sum - sp[m]) / denom;
      const float others_run = (r_sum - rp[m]) / denom;
      float diff = std::exp(others_run - rp[m]) - std::exp(others - sp[m]);
      if (cap.has_value()) {
        const float bound = static_cast<float>(*cap);
        diff = diff > bound ? bound : diff;
      }
      cp[m] = std::exp(static_cast<float>(alpha) * diff);
    } else {
      cp[m] = finite ? (hold_last ? pp[m] : 1.f) : nan;
    }
    np[m] = finite ? rp[m] * (t / (t + 1.f)) + sp[m] / (t + 1.f) : rp[m];
  }
  at::Tensor count_new = at::full(count.sizes(), finite ? t + 1.f : t, f32);
  return {psi, scores, running_new, count_new, coeffs};
}

}  // namespace agm_fast
