// Inverse-CDF categorical sampling on the CPU: one softmax pass and one CDF per row serve all n draws.
//
// Pass 1 writes the n*R uniforms (8-wide Philox) as doubles into the index buffer; pass 2 reads row r's n
// uniforms from there and overwrites them with the drawn indices (same slots, so in place is safe). A one-hot
// output in fresh (zero) pages gets only its ones written; in reused memory each row is streamed out whole.
// A row without a valid distribution (NaN, +inf, or no finite entry) makes the op raise a ValueError.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "philox.h"
#include "vec_math.h"

namespace fastgrad {

std::tuple<at::Tensor, at::Tensor> categorical_sample_cpu(const at::Tensor& logits, int64_t n, int64_t seed,
                                                          int64_t offset, bool one_hot) {
  FG_CHECK_2D(logits, "logits");
  TORCH_CHECK(n >= 1, "n must be >= 1");
  const int64_t R = logits.size(0), K = logits.size(1);
  auto idx = new_output({n, R}, logits.options().dtype(at::kLong));
  bool zeroed = false;
  auto oh = one_hot ? new_output({n, R, K}, logits.options(), &zeroed) : at::empty({0}, logits.options());
  if (R == 0) return {idx, oh};
  const bool stream = one_hot && oh.nbytes() >= kStreamBytes;
  int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t E = n * R;
  // pass 1: uniform of stream element e -> slot e (as a double)
  at::parallel_for(0, (E + 31) / 32, 256, [&](int64_t c0, int64_t c1) {
    float u[32];
    for (int64_t c = c0; c < c1; ++c) {
      uniform32(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + 8 * c, u);
      const int64_t e0 = 32 * c, m = std::min<int64_t>(32, E - e0);
      for (int64_t j = 0; j < m; ++j) {
        const double d = u[j];
        std::memcpy(ip + e0 + j, &d, sizeof d);
      }
    }
  });
  std::atomic<bool> bad_row{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "categorical_sample_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* op = one_hot ? oh.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, R, grain_for(K * (n + 2)), [&](int64_t r0, int64_t r1) {
      std::vector<float> p(K);
      std::vector<double> cdf(K);
      std::vector<scalar_t> zrow(op && !zeroed ? K : 0, scalar_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = lp + r * K;
        if constexpr (std::is_same_v<scalar_t, double>) {
          // subtract the row max in double: float64 logits far from 0 (1e7 and 1e7 + 0.5) keep their difference
          double m = -INFINITY;
          for (int64_t k = 0; k < K; ++k) m = std::max(m, static_cast<double>(row[k]));
          for (int64_t k = 0; k < K; ++k) p[k] = static_cast<float>(static_cast<double>(row[k]) - m);
        } else {
          for (int64_t k = 0; k < K; ++k) p[k] = static_cast<float>(row[k]);
          const float m = max_of(p.data(), K);
          for (int64_t k = 0; k < K; ++k) p[k] -= m;
        }
        exp_inplace(p.data(), K);
        double run = 0;
        for (int64_t k = 0; k < K; ++k) cdf[k] = run += p[k];
        // NaN or +inf anywhere, or every entry -inf, makes exp(l - max) NaN somewhere and the total NaN
        if (!std::isfinite(run)) {
          bad_row.store(true, std::memory_order_relaxed);
          run = 1.0;  // draws of this row are discarded with the error below; keep the search in bounds
        }
        // first k with cdf_k > u * total (a zero-probability step can never satisfy it); binary search per
        // draw: O(n log K) per row, no sorting of the targets
        const double* c = cdf.data();
        for (int64_t s = 0; s < n; ++s) {
          double u;
          std::memcpy(&u, ip + s * R + r, sizeof u);
          const int64_t k = upper_bound_branchless(c, K - 1, u * run);
          ip[s * R + r] = k;
        }
        if (op) {
          for (int64_t s = 0; s < n; ++s)
            write_one_hot(op + (s * R + r) * K, K, ip[s * R + r], zeroed, zrow.data(), stream);
        }
      }
      stream_fence();
    });
  });
  TORCH_CHECK_VALUE(!bad_row.load(), FG_INVALID_ROWS_MESSAGE);
  return {idx, oh};
}

TORCH_LIBRARY_IMPL(fastgrad_C, CPU, m) { m.impl("categorical_sample", &categorical_sample_cpu); }

}  // namespace fastgrad
