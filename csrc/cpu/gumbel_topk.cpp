// k distinct categories per row by Gumbel-top-k (Vieira 2014; Kool, van Hoof & Welling 2019): the indices of the k
// largest perturbed log-probabilities phi_i = log_softmax(l)_i + G_i, G_i = -log(-log u_i), u_i the uniform of
// stream element r * K + i. A max pass, then one pass that makes the exponentials (summed for the logsumexp), the
// noise and the selection. Float rows select in the exponential domain (one vector log per element): rows of one
// block with 2 <= k <= 8 without a branch per element (few_smallest_keys), the others through a sorted array of the
// k best entered only by elements that beat the current k-th; double rows, float rows whose k-th key is too large
// for the exponential domain (a pick with l - max below about -69: e^(l - m) near or below float's normal range,
// where the key a / w loses precision or overflows), and every row with k > kSortK, in the log domain, the last by a
// selection and sort of the row's perturbed values: O(K + k log k), not O(K k). Nothing [R, K] is allocated. Validates
// what it reads: a row whose logsumexp is not finite, or with fewer than k categories of nonzero probability, is a
// ValueError.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <utility>
#include <vector>

#include "common.h"
#include "philox.h"
#include "vec_math.h"

namespace fastgrad {
namespace {

// Keys a / w below this come from w = e^(l - m) >= a_min / kKeyMax > 5.9e-38 (a = -log u >= 5.96e-8 for the
// largest float u below 1), a normal float: exact up to rounding. A key of an element whose w is subnormal is at
// least about 5e30, so a k-th key below kKeyMax also orders those correctly (they are never picked).
constexpr float kKeyMax = 1e30f;
// Above this k, the selection picks the k best of the row's perturbed values (nth_element) and sorts them, instead
// of inserting into a sorted k-array
constexpr int64_t kSortK = 64;

// sum of e^(row - m) over one block of len elements. Float: vectorized, and buf holds the exponentials afterwards
// (the exponential-domain selection reads them); double: buf is scratch.
template <typename scalar_t, typename acc>
acc block_exps(const scalar_t* row, int64_t len, acc m, acc* buf) {
  for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<acc>(row[j]) - m;
  if constexpr (std::is_same_v<acc, float>) {
    exp_inplace(buf, len);
    return sum_of(buf, len);
  } else {
    acc s = 0;
    for (int64_t j = 0; j < len; ++j) s += std::exp(buf[j]);
    return s;
  }
}

// Insert (v, i) into the k best held, sorted so that better(topv[t], topv[t + 1]) (the caller has checked that v
// beats the k-th once k are held): O(k) moves.
template <typename T, typename Better>
inline void insert_best(T* topv, int64_t* topi, int64_t& filled, int64_t k, T v, int64_t i, Better better) {
  int64_t pos = filled < k ? filled++ : k - 1;
  while (pos > 0 && better(v, topv[pos - 1])) {
    topv[pos] = topv[pos - 1];
    topi[pos] = topi[pos - 1];
    --pos;
  }
  topv[pos] = v;
  topi[pos] = i;
}

// One block (K <= C, e^(l - m) in w), 2 <= k <= 8: the k smallest keys without a branch per element. The minima of
// the 16 lanes (lane = j mod 16) are 16 distinct elements, so their k-th smallest T bounds the k-th smallest key:
// every key <= T is a candidate (on average 1.03 k to 1.3 k of them for k = 2 to 8), compacted without branches,
// then each candidate's rank (ties to the smaller index, as insert_best) places it. Returns false where T is not
// finite (a lane of zero probabilities) or more than 64 keys pass: the caller's loop handles that row. keys: K >= 16
// floats holding log u on entry, overwritten.
inline bool few_smallest_keys(float* keys, const float* w, int64_t K, int64_t k, int32_t* cand, float* ckey,
                              float* topv, int64_t* topi) {
  constexpr int64_t L = 16;
  for (int64_t j = 0; j < K; ++j) keys[j] = -keys[j] / w[j];  // a / w, +inf where w = 0
  float lm[L];
  for (int64_t g = 0; g < L; ++g) lm[g] = INFINITY;
  int64_t j = 0;
  for (; j + L <= K; j += L)
    for (int64_t g = 0; g < L; ++g) lm[g] = std::min(lm[g], keys[j + g]);
  for (; j < K; ++j) lm[j % L] = std::min(lm[j % L], keys[j]);
  std::nth_element(lm, lm + (k - 1), lm + L);
  const float T = lm[k - 1];
  if (!(T < kKeyMax)) return false;  // an infinite or imprecise key could be among the k: the log domain decides
  int64_t c = 0;
  for (int64_t i = 0; i < K; ++i) {
    cand[c] = static_cast<int32_t>(i);
    c += keys[i] <= T;
  }
  if (c > 64) return false;  // the rank pass is O(c^2): a row with many near-equal keys takes the caller's loop
  const int64_t cp = (c + 7) / 8 * 8;  // padded with +inf: fixed-length, vectorized counting
  for (int64_t i = 0; i < cp; ++i) ckey[i] = i < c ? keys[cand[i]] : INFINITY;
  for (int64_t i = 0; i < c; ++i) {
    const float v = ckey[i];
    int32_t r = 0, eq = 0;
    for (int64_t t = 0; t < cp; ++t) {
      r += ckey[t] < v;
      eq += ckey[t] == v;
    }
    if (eq > 1)  // an exact tie: the candidates before i (ascending index) rank below
      for (int64_t t = 0; t < i; ++t) r += ckey[t] == v;
    if (r < k) {
      topv[r] = v;
      topi[r] = cand[i];
    }
  }
  return true;
}

// Select in the exponential domain: phi_i = log_softmax(l)_i - log(a_i), a_i = -log u_i, is largest where the key
// a_i / w_i is smallest (w_i = e^(l_i - m)): one vector log per element instead of two, a divide for the elements
// that beat the current k-th key. The order is phi's up to float rounding. A category whose w underflows to 0 never
// enters. Float rows only. On entry with K <= C, buf holds w and se their sum; with K > C each block's w is made
// here and added to se (the logsumexp and the selection share one exp per element). Returns whether all k were
// filled: topv then holds the k smallest keys, ascending (the caller turns them into phi once lse is known).
template <typename scalar_t, typename acc>
bool exp_domain_select(const scalar_t* row, int64_t K, int64_t C, acc m, acc& se, uint64_t s, uint64_t off,
                       uint64_t e0, acc* buf, acc* u, float* scratch, acc* topv, int64_t* topi, int64_t k,
                       int32_t* cand, float* ckey) {
  if constexpr (std::is_same_v<acc, float>) {
    if (K <= C && K >= 16 && k >= 2 && k <= 8) {  // k = 1: the loop below (a rare branch) is faster
      fill_uniform(s, off, e0, K, u, scratch);
      log_inplace(u, K);
      if (few_smallest_keys(u, buf, K, k, cand, ckey, topv, topi)) return true;
    }
    int64_t filled = 0;
    float worst = INFINITY;  // the k-th smallest key once k are held
    for (int64_t j0 = 0; j0 < K; j0 += C) {
      const int64_t len = std::min(C, K - j0);
      if (K > C) se += block_exps(row + j0, len, m, buf);
      fill_uniform(s, off, e0 + j0, len, u, scratch);
      log_inplace(u, len);  // log u <= 0
      for (int64_t j = 0; j < len; ++j) {
        const float w = buf[j];
        const float a = -u[j];
        if (!(a < worst * w)) continue;  // w = 0 (zero or underflowed probability) never passes
        insert_best(topv, topi, filled, k, a / w, j0 + j, [](float x, float y) { return x < y; });  // ascending
        if (filled == k) worst = topv[k - 1];
      }
    }
    return filled == k && topv[k - 1] < kKeyMax;
  } else {
    return false;
  }
}

// max of a row (float: vectorized); a NaN is caught by the caller's non-finite lse either way
template <typename scalar_t, typename acc>
acc row_max(const scalar_t* row, int64_t K) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return max_of(row, K);
  } else {
    acc m = -INFINITY;
    for (int64_t j = 0; j < K; ++j) m = std::max(m, static_cast<acc>(row[j]));
    return m;
  }
}

// keys (ascending) -> phi = l - lse - log(a) = (m - lse) - log(key), in place
template <typename acc>
void keys_to_phi(acc* v, int64_t k, acc shift) {
  if constexpr (std::is_same_v<acc, float>) {
    log_inplace(v, k);
  } else {  // (double rows never select by keys; compiled for the dtype dispatch)
    for (int64_t t = 0; t < k; ++t) v[t] = std::log(v[t]);
  }
  for (int64_t t = 0; t < k; ++t) v[t] = shift - v[t];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gumbel_topk_cpu(const at::Tensor& logits, int64_t k, int64_t seed,
                                                   int64_t offset) {
  FG_CHECK_2D(logits, "logits");
  const int64_t R = logits.size(0), K = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= K, "k must lie in [1, K] = [1, ", K, "], got ", k);
  const bool dbl = logits.scalar_type() == at::kDouble;
  auto idx = at::empty({R, k}, logits.options().dtype(at::kLong));
  auto val = at::empty({R, k}, logits.options().dtype(dbl ? at::kDouble : at::kFloat));
  if (R == 0) return {idx, val};
  std::atomic<bool> bad_row{false}, too_few{false};
  const uint64_t s = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_topk_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    int64_t* ip = idx.data_ptr<int64_t>();
    acc* vp = val.data_ptr<acc>();
    at::parallel_for(0, R, grain_for(4 * K), [&](int64_t r0, int64_t r1) {
      constexpr int64_t C = 1024;
      std::vector<acc> buf(C);
      std::vector<acc> u(C);
      std::vector<float> scratch(uniform_scratch(C));
      std::vector<acc> topv(k);
      std::vector<int64_t> topi(k);
      std::vector<int32_t> cand(C);  // few_smallest_keys' candidates
      std::vector<float> ckey(C);
      std::vector<std::pair<acc, int64_t>> all;  // k > kSortK: the row's perturbed values
      if (k > kSortK) all.reserve(K);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = lp + r * K;
        acc se = 0;
        const acc m = row_max<scalar_t, acc>(row, K);
        const uint64_t e0 = static_cast<uint64_t>(r) * static_cast<uint64_t>(K);
        // float rows: the exponential-domain selection (which, for K > C, also sums the exponentials); a row it
        // leaves with fewer than k (or a double row) goes through the log domain
        constexpr bool exp_domain = std::is_same_v<acc, float>;
        if (!exp_domain || K <= C || k > kSortK) {
          for (int64_t j0 = 0; j0 < K; j0 += C) se += block_exps(row + j0, std::min(C, K - j0), m, buf.data());
        }
        const bool selected = exp_domain && k <= kSortK && exp_domain_select<scalar_t, acc>(
            row, K, C, m, se, s, off, e0, buf.data(), u.data(), scratch.data(), topv.data(), topi.data(), k,
            cand.data(), ckey.data());
        const acc lse = m + std::log(se);
        if (!std::isfinite(lse)) {
          bad_row.store(true, std::memory_order_relaxed);
          continue;
        }
        int64_t filled = k;
        if (selected) {
          keys_to_phi(topv.data(), k, m - lse);
        } else if (k > kSortK) {
          // every perturbed value with its index, the -inf ones (zero probability) left out, then the k best first
          all.clear();
          for (int64_t j0 = 0; j0 < K; j0 += C) {
            const int64_t len = std::min(C, K - j0);
            perturbed_row<scalar_t, acc>(row + j0, len, s, off, e0 + j0, u.data(), buf.data(), scratch.data(),
                                         lse);
            for (int64_t j = 0; j < len; ++j)
              if (buf[j] != -INFINITY) all.emplace_back(buf[j], j0 + j);
          }
          filled = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
          // larger value first, ties to the smaller index (as insert_best)
          auto better = [](const std::pair<acc, int64_t>& x, const std::pair<acc, int64_t>& y) {
            return x.first > y.first || (x.first == y.first && x.second < y.second);
          };
          if (filled > 0 && filled < static_cast<int64_t>(all.size()))
            std::nth_element(all.begin(), all.begin() + (filled - 1), all.end(), better);  // the k best first
          std::sort(all.begin(), all.begin() + filled, better);                           // then in order
          for (int64_t t = 0; t < filled; ++t) {
            topv[t] = all[t].first;
            topi[t] = all[t].second;
          }
        } else {
          filled = 0;
          acc thr = -INFINITY;  // the k-th best so far once k are held
          for (int64_t j0 = 0; j0 < K; j0 += C) {
            const int64_t len = std::min(C, K - j0);
            perturbed_row<scalar_t, acc>(row + j0, len, s, off, e0 + j0, u.data(), buf.data(), scratch.data(),
                                         lse);
            for (int64_t j = 0; j < len; ++j) {
              const acc z = buf[j];
              if (!(z > thr) || z == -INFINITY) continue;  // -inf: a zero-probability category, never chosen
              insert_best(topv.data(), topi.data(), filled, k, z, j0 + j, [](acc x, acc y) { return x > y; });
              if (filled == k) thr = topv[k - 1];
            }
          }
        }
        if (filled < k) {
          too_few.store(true, std::memory_order_relaxed);
          continue;
        }
        for (int64_t t = 0; t < k; ++t) {
          ip[r * k + t] = topi[t];
          vp[r * k + t] = topv[t];
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!bad_row.load(), FG_INVALID_ROWS_MESSAGE);
  TORCH_CHECK_VALUE(!too_few.load(), "k must not exceed the number of categories with nonzero probability (finite "
                    "logits) in any row");
  return {idx, val};
}

TORCH_LIBRARY_IMPL(fastgrad_C, CPU, m) { m.impl("gumbel_topk", &gumbel_topk_cpu); }

}  // namespace fastgrad
