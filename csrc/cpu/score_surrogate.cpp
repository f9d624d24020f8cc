// REINFORCE surrogate at vocabulary scale on the CPU: one read of each logits row forward (max, sum-exp),
// one write of the gradient backward; the log_softmax is never materialized. The forward validates what it
// reads (a row whose lse is not finite: NaN, +inf or no finite entry; an index outside [0, K)) and raises a
// ValueError, so the Python layer needs no extra pass or host sync for these checks on the CPU.
#include <atomic>
#include <cmath>

#include "common.h"
#include "vec_math.h"

namespace fastgrad {

std::tuple<at::Tensor, at::Tensor> score_surrogate_cpu(const at::Tensor& logits, const at::Tensor& index,
                                                       const at::Tensor& weight) {
  FG_CHECK_2D(logits, "logits");
  FG_CHECK_2D(index, "index");
  FG_CHECK_2D(weight, "weight");
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64");
  const int64_t R = logits.size(0), K = logits.size(1), n = index.size(0);
  TORCH_CHECK(index.size(1) == R && weight.size(0) == n && weight.size(1) == R, "index/weight must be [n, R]");
  const bool dbl = logits.scalar_type() == at::kDouble;
  auto lse = at::empty({R}, logits.options().dtype(dbl ? at::kDouble : at::kFloat));
  auto out = at::empty_like(weight);
  if (R == 0) return {out, lse};
  std::atomic<bool> bad_row{false}, bad_index{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "score_surrogate_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    acc* lsep = lse.data_ptr<acc>();
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "score_surrogate_cpu_w", [&] {
      using wt = scalar_t;
      const wt* wp = weight.data_ptr<wt>();
      wt* op = out.data_ptr<wt>();
      at::parallel_for(0, R, grain_for(K + n), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto* row = lp + r * K;
          acc m = -INFINITY, s = 0;
          if constexpr (std::is_same_v<acc, float>) {
            // online logsumexp over 4 KB chunks: one read of the row
            alignas(32) float buf[1024];
            for (int64_t k0 = 0; k0 < K; k0 += 1024) {
              const int64_t len = std::min<int64_t>(1024, K - k0);
              for (int64_t k = 0; k < len; ++k) buf[k] = static_cast<float>(row[k0 + k]);
              const float cm = max_of(buf, len);
              if (cm == -INFINITY) {  // a fully masked chunk adds nothing, unless it hides a NaN (max skips NaN)
                for (int64_t k = 0; k < len; ++k)
                  if (buf[k] != buf[k]) s = NAN;
                continue;
              }
              if (cm > m) {
                s *= std::exp(m - cm);
                m = cm;
              }
              for (int64_t k = 0; k < len; ++k) buf[k] -= m;
              exp_inplace(buf, len);
              s += sum_of(buf, len);
            }
            if (m == -INFINITY) s = NAN;  // every category masked: lse is undefined
          } else {
            for (int64_t k = 0; k < K; ++k) m = std::max(m, static_cast<acc>(row[k]));
            for (int64_t k = 0; k < K; ++k) s += std::exp(static_cast<acc>(row[k]) - m);
          }
          const acc l = m + std::log(s);
          lsep[r] = l;
          if (!std::isfinite(l)) bad_row.store(true, std::memory_order_relaxed);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t k = ip[j * R + r];
            if (k < 0 || k >= K) {
              bad_index.store(true, std::memory_order_relaxed);
              continue;
            }
            op[j * R + r] = static_cast<wt>(static_cast<acc>(wp[j * R + r]) * (static_cast<acc>(row[k]) - l));
          }
        }
      });
    });
  });
  TORCH_CHECK_VALUE(!bad_index.load(), "samples must lie in [0, ", K, ")");
  TORCH_CHECK_VALUE(!bad_row.load(), FG_INVALID_ROWS_MESSAGE);
  return {out, lse};
}

at::Tensor score_surrogate_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& index,
                                        const at::Tensor& weight, const at::Tensor& lse) {
  FG_CHECK_2D(logits, "logits");
  FG_CHECK_2D(grad, "grad");
  const int64_t R = logits.size(0), K = logits.size(1), n = index.size(0);
  auto gl = new_output(logits.sizes(), logits.options());
  if (R == 0) return gl;
  const bool stream = gl.nbytes() >= kStreamBytes;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto a = (grad.to(acc_dtype) * weight.to(acc_dtype)).contiguous();  // [n, R], tiny next to logits
  auto lse_acc = lse.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "score_surrogate_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    const acc* ap = a.data_ptr<acc>();
    const acc* lsep = lse_acc.data_ptr<acc>();
    scalar_t* out = gl.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain_for(K + n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        acc asum = 0;
        for (int64_t j = 0; j < n; ++j) asum += ap[j * R + r];
        const auto* row = lp + r * K;
        auto* o = out + r * K;
        const acc l = lsep[r];
        if constexpr (std::is_same_v<scalar_t, float>) {
          float* of = reinterpret_cast<float*>(o);  // scalar_t is float here (the lambda is no template)
          const float* rf = reinterpret_cast<const float*>(row);
          const float lf = static_cast<float>(l), na = -static_cast<float>(asum);
          alignas(32) float buf[1024];  // one write of the output per 4 KB chunk, one-hot part included
          for (int64_t k0 = 0; k0 < K; k0 += 1024) {
            const int64_t len = std::min<int64_t>(1024, K - k0);
            for (int64_t k = 0; k < len; ++k) buf[k] = rf[k0 + k] - lf;
            exp_inplace(buf, len);
            for (int64_t k = 0; k < len; ++k) buf[k] *= na;
            for (int64_t j = 0; j < n; ++j) {
              const int64_t k = ip[j * R + r] - k0;
              if (k >= 0 && k < len) buf[k] += static_cast<float>(ap[j * R + r]);
            }
            write_row(of + k0, buf, static_cast<size_t>(len) * sizeof(float), stream);
          }
          continue;
        } else {
          for (int64_t k = 0; k < K; ++k) o[k] = static_cast<scalar_t>(-asum * std::exp(static_cast<acc>(row[k]) - l));
        }
        if constexpr (std::is_same_v<scalar_t, double>) {
          for (int64_t j = 0; j < n; ++j) o[ip[j * R + r]] += ap[j * R + r];
        } else {
          // accumulate the one-hot part in float before rounding to the output dtype
          for (int64_t j = 0; j < n; ++j) {
            const int64_t k = ip[j * R + r];
            acc v = -asum * std::exp(static_cast<acc>(row[k]) - l);
            for (int64_t t = 0; t < n; ++t)
              if (ip[t * R + r] == k) v += ap[t * R + r];
            o[k] = static_cast<scalar_t>(v);
          }
        }
      }
      stream_fence();
    });
  });
  return gl;
}

TORCH_LIBRARY_IMPL(fastgrad_C, CPU, m) {
  m.impl("score_surrogate", &score_surrogate_cpu);
  m.impl("score_surrogate_backward", &score_surrogate_backward_cpu);
}

}  // namespace fastgrad
