// Inverse-CDF categorical sampling on the CPU: one softmax pass per row serves all n draws.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common.h"
#include "philox.h"

namespace fastgrad {

std::tuple<at::Tensor, at::Tensor> categorical_sample_cpu(const at::Tensor& logits, int64_t n, int64_t seed,
                                                          int64_t offset, bool one_hot) {
  FG_CHECK_2D(logits, "logits");
  TORCH_CHECK(n >= 1, "n must be >= 1");
  const int64_t R = logits.size(0), K = logits.size(1);
  auto idx = at::empty({n, R}, logits.options().dtype(at::kLong));
  auto oh = one_hot ? at::empty({n, R, K}, logits.options()) : at::empty({0}, logits.options());
  if (R == 0) return {idx, oh};
  int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "categorical_sample_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* op = one_hot ? oh.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> p(K);
      std::vector<std::pair<double, int64_t>> targets(n);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = lp + r * K;
        float m = -INFINITY;
        for (int64_t k = 0; k < K; ++k) m = std::max(m, static_cast<float>(row[k]));
_Pragma("omp simd")
        for (int64_t k = 0; k < K; ++k) p[k] = std::exp(static_cast<float>(row[k]) - m);
        double total = 0;
        for (int64_t k = 0; k < K; ++k) total += p[k];
        for (int64_t s = 0; s < n; ++s)
          targets[s] = {static_cast<double>(uniform_at(seed, offset, static_cast<uint64_t>(s * R + r))) * total, s};
        std::sort(targets.begin(), targets.end());
        // one merge pass: first k with cdf_k > target (zero-probability steps can never satisfy it)
        double cdf = 0;
        int64_t k = 0;
        for (int64_t t = 0; t < n; ++t) {
          const double target = targets[t].first;
          while (k < K - 1 && !(cdf + p[k] > target)) cdf += p[k++];
          ip[targets[t].second * R + r] = k;
        }
        if (op) {
          for (int64_t s = 0; s < n; ++s) {
            scalar_t* o = op + (s * R + r) * K;
            std::fill_n(o, K, scalar_t(0));
            o[ip[s * R + r]] = scalar_t(1);
          }
        }
      }
    });
  });
  return {idx, oh};
}

TORCH_LIBRARY_IMPL(fastgrad_C, CPU, m) { m.impl("categorical_sample", &categorical_sample_cpu); }

}  // namespace fastgrad
