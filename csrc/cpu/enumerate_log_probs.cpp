// Log-probabilities of all K^k joint configurations, and their gradient, without the [K^k, B, k, K] one-hot.
#include <cmath>
#include <vector>

#include "common.h"

namespace fastgrad {

namespace {
// lpT[i][j][b] = log_softmax(logits[b, i])[j], laid out so that rows over b are contiguous
template <typename scalar_t, typename acc>
std::vector<acc> transposed_log_softmax(const scalar_t* lp, int64_t B, int64_t k, int64_t K, bool probs) {
  std::vector<acc> out(k * K * B);
  at::parallel_for(0, B * k, grain_for(3 * K), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = q / k, i = q % k;
      const scalar_t* row = lp + (b * k + i) * K;
      acc m = -INFINITY, s = 0;
      for (int64_t j = 0; j < K; ++j) m = std::max(m, static_cast<acc>(row[j]));
      for (int64_t j = 0; j < K; ++j) s += std::exp(static_cast<acc>(row[j]) - m);
      const acc l = m + std::log(s);
      for (int64_t j = 0; j < K; ++j) {
        const acc v = static_cast<acc>(row[j]) - l;
        out[(i * K + j) * B + b] = probs ? std::exp(v) : v;
      }
    }
  });
  return out;
}
// K**k, refusing sizes that overflow int64 (the Python contract refuses them first)
int64_t configurations(int64_t k, int64_t K) {
  TORCH_CHECK_VALUE(K >= 1 && k >= 1, "logits must have shape [B, k, K] with k >= 1 and K >= 1");
  int64_t C = 1;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(C <= (int64_t(1) << 62) / K, "enumerating ", K, "**", k, " configurations overflows int64");
    C *= K;
  }
  return C;
}
}  // namespace

at::Tensor enumerate_log_probs_cpu(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous(), "logits must be a contiguous [B, k, K] tensor");
  const int64_t B = logits.size(0), k = logits.size(1), K = logits.size(2);
  const int64_t C = configurations(k, K);
  auto out = at::empty({C, B}, logits.options());
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "enumerate_log_probs_cpu", [&] {
    using acc = acc_t<scalar_t>;
    auto lpT = transposed_log_softmax<scalar_t, acc>(logits.data_ptr<scalar_t>(), B, k, K, false);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, C, grain_for(k * B), [&](int64_t c0, int64_t c1) {
      std::vector<acc> row(B);
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(row.begin(), row.end(), acc(0));
        int64_t rest = c;
        for (int64_t i = k - 1; i >= 0; --i) {  // last latent is the fastest-varying digit
          const acc* src = lpT.data() + (i * K + rest % K) * B;
          rest /= K;
_Pragma("omp simd")
          for (int64_t b = 0; b < B; ++b) row[b] += src[b];
        }
        for (int64_t b = 0; b < B; ++b) op[c * B + b] = static_cast<scalar_t>(row[b]);
      }
    });
  });
  return out;
}

at::Tensor enumerate_log_probs_backward_cpu(const at::Tensor& grad, const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous(), "logits must be a contiguous [B, k, K] tensor");
  const int64_t B = logits.size(0), k = logits.size(1), K = logits.size(2);
  const int64_t C = configurations(k, K);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.is_contiguous() && grad.size(0) == C && grad.size(1) == B &&
                        grad.scalar_type() == logits.scalar_type(),
                    "grad must be a contiguous [K**k, B] tensor in the logits' dtype");
  auto gl = at::empty_like(logits);
  if (B == 0) return gl;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "enumerate_log_probs_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    auto pT = transposed_log_softmax<scalar_t, acc>(logits.data_ptr<scalar_t>(), B, k, K, true);
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* out = gl.data_ptr<scalar_t>();
    // split over b: each thread owns its columns, so the scatter over configurations needs no atomics
    at::parallel_for(0, B, std::max<int64_t>(256, grain_for(C * (k + 1))), [&](int64_t b0, int64_t b1) {
      const int64_t nb = b1 - b0;
      std::vector<acc> G(k * K * nb, acc(0)), S(nb, acc(0));
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* g = gp + c * B + b0;
        for (int64_t b = 0; b < nb; ++b) S[b] += static_cast<acc>(g[b]);
        int64_t rest = c;
        for (int64_t i = k - 1; i >= 0; --i) {
          acc* dst = G.data() + (i * K + rest % K) * nb;
          rest /= K;
          for (int64_t b = 0; b < nb; ++b) dst[b] += static_cast<acc>(g[b]);
        }
      }
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = 0; j < K; ++j)
            out[((b0 + b) * k + i) * K + j] =
                static_cast<scalar_t>(G[(i * K + j) * nb + b] - pT[(i * K + j) * B + b0 + b] * S[b]);
    });
  });
  return gl;
}

TORCH_LIBRARY_IMPL(fastgrad_C, CPU, m) {
  m.impl("enumerate_log_probs", &enumerate_log_probs_cpu);
  m.impl("enumerate_log_probs_backward", &enumerate_log_probs_backward_cpu);
}

}  // namespace fastgrad
