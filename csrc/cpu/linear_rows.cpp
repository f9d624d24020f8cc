// Row passes of the fused LM-head ops (fastgrad/ops/_lm_head.py) over one token block's logits slab
// z = slab / T, [M, V] fp32 (fp64 for gradcheck), built by a GEMM the Python driver runs:
//   linear_rows_stats: the row's normalizer as two numbers, norm[m] = (mx, ls) with mx = max_j z_j and
//                      ls = log sum_j e^(z_j - mx) (lse = mx + ls; kept apart because ls is exact to an ulp of ls,
//                      while a rounded lse loses ulp(lse): 1e-3 at a logit offset of 1e4),
//                      logp[m, s] = min((z[m, index[m, s]] - mx) - ls, 0), and on request the entropy
//                      H = ls - sum_j p_j (z_j - mx) and sum_j p_j^2 (verl's sum_pi_squared); two reads of the row
//                      (max, then exp-sums), nothing written.
//   linear_rows_grad_: the slab is overwritten in place with dL/dslab (one read, one write):
//                      (sum_s c_s [j = y_s] - a p_j - g_H p_j (log p_j + H)) / T, log p_j = (z_j - mx) - ls,
//                      c = dL/dlogp [M, S], a = p_coef [M] (sum_s c_s, less dL/dlse when the lse is used),
//                      g_H = dL/dH [M] (empty: no entropy term).
// The driver validates indices and shapes; the kernels check only what they rely on.
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "vec_math.h"

namespace fastgrad {
namespace {

constexpr int64_t kChunk = 1024;  // 4 KB of floats: the row is visited in cache-resident chunks

// float: the vectorized helpers of vec_math.h; double (gradcheck): plain loops
inline float row_max(const float* x, int64_t n) { return max_of(x, n); }
inline double row_max(const double* x, int64_t n) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}
inline void exp_row(float* x, int64_t n) { exp_inplace(x, n); }
inline void exp_row(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
}
inline float row_sum(const float* x, int64_t n) { return sum_of(x, n); }
inline double row_sum(const double* x, int64_t n) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}
// sum_j x_j y_j with 8 partial sums (vectorizes without reassociation flags)
template <typename T>
inline T row_dot(const T* x, const T* y, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[j + l] * y[j + l];
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

void check_slab(const at::Tensor& slab, const at::Tensor& index) {
  FG_CHECK_2D(slab, "slab");
  FG_CHECK_2D(index, "index");
  TORCH_CHECK(slab.scalar_type() == at::kFloat || slab.scalar_type() == at::kDouble, "slab must be float32/64");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.size(0) == slab.size(0), "index must be int64 [M, S]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_rows_stats_cpu(
    const at::Tensor& slab, const at::Tensor& index, double inv_t, bool want_entropy, bool want_sum_sq) {
  check_slab(slab, index);
  const int64_t M = slab.size(0), V = slab.size(1), S = index.size(1);
  auto norm = at::empty({M, 2}, slab.options());
  auto logp = at::empty({M, S}, slab.options());
  auto ent = at::empty({want_entropy ? M : 0}, slab.options());
  auto sq = at::empty({want_sum_sq ? M : 0}, slab.options());
  if (M == 0) return {logp, norm, ent, sq};
  AT_DISPATCH_FLOATING_TYPES(slab.scalar_type(), "linear_rows_stats_cpu", [&] {
    using T = scalar_t;
    const T* zp = slab.data_ptr<T>();
    const int64_t* ip = index.data_ptr<int64_t>();
    T* np = norm.data_ptr<T>();
    T* op = logp.data_ptr<T>();
    T* ep = want_entropy ? ent.data_ptr<T>() : nullptr;
    T* qp = want_sum_sq ? sq.data_ptr<T>() : nullptr;
    const T it = static_cast<T>(inv_t);
    at::parallel_for(0, M, grain_for(2 * V), [&](int64_t m0, int64_t m1) {
      alignas(32) T buf[kChunk];
      alignas(32) T d[kChunk];
      for (int64_t m = m0; m < m1; ++m) {
        const T* row = zp + m * V;
        T mx = row_max(row, V) * it;  // T > 0: the max of z is the max of the slab, scaled
        // chunk sums in T (8 lanes each), accumulated across chunks in double: at V = 152k a float running sum
        // loses ~1e-4 of lse
        double s = 0, sz = 0, s2 = 0;  // sum_j e^(z_j - mx), sum_j e^(z_j - mx) (z_j - mx), sum_j e^(2 (z_j - mx))
        const T lowest = std::numeric_limits<T>::lowest();
        for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
          const int64_t len = std::min(kChunk, V - j0);
          // a -inf logit becomes the lowest finite value: e^lowest = 0 and 0 * lowest = 0 in the entropy sum
          for (int64_t j = 0; j < len; ++j) buf[j] = std::max(row[j0 + j] * it - mx, lowest);
          if (want_entropy) std::memcpy(d, buf, len * sizeof(T));
          exp_row(buf, len);
          s += row_sum(buf, len);
          if (want_entropy) sz += row_dot(buf, d, len);
          if (want_sum_sq) s2 += row_dot(buf, buf, len);
        }
        const T ls = static_cast<T>(std::log(s));  // s >= 1: the max's own term
        np[2 * m] = mx;  // NaN/inf rows propagate; the driver checks mx + ls
        np[2 * m + 1] = ls;
        // relative to the row max: (z - mx) is exact near the max however large |z| is. min(., 0): the compiler
        // may fuse z * it - mx into one FMA, which leaves the max's own log-prob at +(rounding error of mx)
        for (int64_t k = 0; k < S; ++k) op[m * S + k] = std::min((row[ip[m * S + k]] * it - mx) - ls, T(0));
        if (ep) ep[m] = static_cast<T>(std::log(s) - sz / s);  // H = lse - E[z] = log s - E[z - mx]
        if (qp) qp[m] = static_cast<T>(s2 / (s * s));
      }
    });
  });
  return {logp, norm, ent, sq};
}

void linear_rows_grad_cpu(const at::Tensor& slab, const at::Tensor& index, const at::Tensor& coef,
                          const at::Tensor& p_coef, const at::Tensor& g_ent, const at::Tensor& norm,
                          const at::Tensor& ent, double inv_t) {
  check_slab(slab, index);
  const int64_t M = slab.size(0), V = slab.size(1), S = index.size(1);
  TORCH_CHECK(coef.sizes() == index.sizes() && coef.is_contiguous() && coef.scalar_type() == slab.scalar_type(),
              "coef must match index and the slab's dtype");
  TORCH_CHECK(p_coef.numel() == M && norm.numel() == 2 * M, "p_coef must be [M] and norm [M, 2]");
  const bool with_ent = g_ent.numel() > 0;
  TORCH_CHECK(!with_ent || (g_ent.numel() == M && ent.numel() == M), "g_ent and entropy must be [M]");
  if (M == 0) return;
  AT_DISPATCH_FLOATING_TYPES(slab.scalar_type(), "linear_rows_grad_cpu", [&] {
    using T = scalar_t;
    T* zp = slab.data_ptr<T>();
    const int64_t* ip = index.data_ptr<int64_t>();
    const T* cp = coef.data_ptr<T>();
    const auto pc = p_coef.contiguous(), nm = norm.contiguous();
    const auto ge = with_ent ? g_ent.contiguous() : g_ent, he = with_ent ? ent.contiguous() : ent;
    const T* pp = pc.data_ptr<T>();
    const T* np = nm.data_ptr<T>();
    const T* gp = with_ent ? ge.data_ptr<T>() : nullptr;
    const T* hp = with_ent ? he.data_ptr<T>() : nullptr;
    const T it = static_cast<T>(inv_t);
    at::parallel_for(0, M, grain_for(V), [&](int64_t m0, int64_t m1) {
      alignas(32) T buf[kChunk];
      alignas(32) T lpj[kChunk];
      for (int64_t m = m0; m < m1; ++m) {
        T* row = zp + m * V;
        const T mx = np[2 * m], ls = np[2 * m + 1];
        const T g = gp ? gp[m] : T(0), h = hp ? hp[m] : T(0);
        const T a = -pp[m] * it, b = -g * it;  // dz_j = a p_j + b p_j (log p_j + H), before the one-hot part
        for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
          const int64_t len = std::min(kChunk, V - j0);
          T* o = row + j0;
          for (int64_t j = 0; j < len; ++j) buf[j] = (o[j] * it - mx) - ls;  // log p_j, relative to the max
          if (g != T(0)) {
            std::memcpy(lpj, buf, len * sizeof(T));
            exp_row(buf, len);
            for (int64_t j = 0; j < len; ++j) o[j] = buf[j] == T(0) ? T(0) : buf[j] * (a + b * (lpj[j] + h));
          } else {
            exp_row(buf, len);
            for (int64_t j = 0; j < len; ++j) o[j] = buf[j] * a;
          }
        }
        for (int64_t k = 0; k < S; ++k) row[ip[m * S + k]] += cp[m * S + k] * it;
      }
    });
  });
}

TORCH_LIBRARY_IMPL(fastgrad_C, CPU, m) {
  m.impl("linear_rows_stats", &linear_rows_stats_cpu);
  m.impl("linear_rows_grad_", &linear_rows_grad_cpu);
}

}  // namespace fastgrad
