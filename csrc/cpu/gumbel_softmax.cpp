// Gumbel-softmax on the CPU, forward and backward; the backward regenerates the noise from (seed, offset).
#include <cmath>
#include <vector>

#include "common.h"
#include "philox.h"
#include "vec_math.h"

namespace fastgrad {

namespace {
// y = softmax(z / tau) in place
template <typename acc>
inline void softmax_inplace(acc* z, int64_t K, acc inv_tau) {
  if constexpr (std::is_same_v<acc, float>) {
    const float m = max_of(z, K);
    for (int64_t k = 0; k < K; ++k) z[k] = (z[k] - m) * inv_tau;
    exp_inplace(z, K);
    const float is = 1.0f / sum_of(z, K);
    for (int64_t k = 0; k < K; ++k) z[k] *= is;
  } else {
    acc m = -INFINITY;
    for (int64_t k = 0; k < K; ++k) m = std::max(m, z[k]);
    acc s = 0;
    for (int64_t k = 0; k < K; ++k) s += (z[k] = std::exp((z[k] - m) * inv_tau));
    const acc is = acc(1) / s;
    for (int64_t k = 0; k < K; ++k) z[k] *= is;
  }
}
}  // namespace

at::Tensor gumbel_softmax_cpu(const at::Tensor& logits, int64_t n, double tau, bool hard, int64_t seed,
                              int64_t offset) {
  FG_CHECK_2D(logits, "logits");
  TORCH_CHECK(tau > 0, "tau must be > 0");
  const int64_t R = logits.size(0), K = logits.size(1);
  bool zeroed = false;
  auto out = new_output({n, R, K}, logits.options(), &zeroed);
  if (R == 0 || K == 0) return out;
  const bool stream = out.nbytes() >= kStreamBytes;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_softmax_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc inv_tau = static_cast<acc>(1.0 / tau);
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * R, grain_for(4 * K), [&](int64_t b0, int64_t b1) {
      std::vector<acc> u(K), z(K);
      std::vector<scalar_t> row(K, scalar_t(0));
      std::vector<float> scratch(uniform_scratch(K));
      for (int64_t b = b0; b < b1; ++b) {  // b = s * R + r
        const int64_t r = b % R;
        perturbed_row(lp + r * K, K, seed, offset, static_cast<uint64_t>(b) * K, u.data(), z.data(), scratch.data());
        scalar_t* o = op + b * K;
        if (hard) {
          acc m = -INFINITY;
          int64_t am = 0;
          for (int64_t k = 0; k < K; ++k)
            if (z[k] > m) { m = z[k]; am = k; }
          write_one_hot(o, K, am, zeroed, row.data(), stream);
        } else {
          softmax_inplace(z.data(), K, inv_tau);
          for (int64_t k = 0; k < K; ++k) row[k] = static_cast<scalar_t>(z[k]);
          write_row(o, row.data(), K * sizeof(scalar_t), stream);
        }
      }
      stream_fence();
    });
  });
  return out;
}

at::Tensor gumbel_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, double tau, int64_t seed,
                                       int64_t offset) {
  FG_CHECK_2D(logits, "logits");
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous() && grad.size(1) == logits.size(0) &&
                  grad.size(2) == logits.size(1) && grad.scalar_type() == logits.scalar_type(),
              "grad must be a contiguous [n, R, K] tensor matching logits");
  const int64_t n = grad.size(0), R = logits.size(0), K = logits.size(1);
  auto gl = at::empty_like(logits);
  if (R == 0 || K == 0) return gl;
  
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_softmax_bwd_cpu", [&] {
    using acc_type = acc_t<scalar_t>;
    const acc_type inv_tau = static_cast<acc_type>(1.0 / tau);
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* out = gl.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain_for(4 * K * n), [&](int64_t r0, int64_t r1) {
      std::vector<acc_type> u(K), y(K), acc(K);
      std::vector<float> scratch(uniform_scratch(K));
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(acc.begin(), acc.end(), acc_type(0));
        for (int64_t s = 0; s < n; ++s) {
          const int64_t b = s * R + r;
          perturbed_row(lp + r * K, K, seed, offset, static_cast<uint64_t>(b) * K, u.data(), y.data(), scratch.data());
          softmax_inplace(y.data(), K, inv_tau);
          const scalar_t* g = gp + b * K;
          acc_type dot = 0;
          for (int64_t k = 0; k < K; ++k) dot += static_cast<acc_type>(g[k]) * y[k];
          for (int64_t k = 0; k < K; ++k) acc[k] += y[k] * (static_cast<acc_type>(g[k]) - dot) * inv_tau;
        }
        for (int64_t k = 0; k < K; ++k) out[r * K + k] = static_cast<scalar_t>(acc[k]);
      }
    });
  });
  return gl;
}

TORCH_LIBRARY_IMPL(fastgrad_C, CPU, m) {
  m.impl("gumbel_softmax", &gumbel_softmax_cpu);
  m.impl("gumbel_softmax_backward", &gumbel_softmax_backward_cpu);
}

}  // namespace fastgrad
