// Array helpers for the CPU kernels: Philox for 8 counters at a time (auto-vectorized) and float log/exp over
// arrays through glibc's libmvec AVX2 variants when available (scalar libm otherwise).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "philox.h"

#if defined(__AVX2__) && defined(__x86_64__)
#include <immintrin.h>
extern "C" {
__m256 _ZGVdN8v_logf(__m256);
__m256 _ZGVdN8v_expf(__m256);
}
#define FG_MVEC 1
#endif

namespace fastgrad {

#ifdef FG_MVEC
namespace detail {
// 32x32 -> 64-bit products of the 8 lanes of a with m: (hi, lo) 32-bit halves per lane
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                          // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);    // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
}  // namespace detail

// u[32 * h + 4 * l + w] = uniform of word w of philox(seed, ctr + 8 * h + l), l < 8, h < N: 32 N stream elements,
// AVX2 throughout. The N groups' rounds are interleaved: one group's 10 rounds are a chain of dependent multiplies
// (latency-bound), two keep the multiplier busy.
template <int N>
inline void uniform32xN(uint64_t seed, uint64_t ctr, float* u) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0[N], c1[N], c2[N], c3[N];
  for (int h = 0; h < N; ++h) {
    const uint64_t base = ctr + 8 * static_cast<uint64_t>(h);
    const uint64_t base_hi = base >> 32;
    const uint32_t base_lo = static_cast<uint32_t>(base);
    c0[h] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base_lo)), lane);
    // carry into the high word where the low word wrapped
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(base_lo)),
                                                                _mm256_set1_epi32(INT32_MIN)),
                                               _mm256_xor_si256(c0[h], _mm256_set1_epi32(INT32_MIN)));
    c1[h] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base_hi))), wrapped);
    c2[h] = _mm256_setzero_si256();
    c3[h] = _mm256_setzero_si256();
  }
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int h = 0; h < N; ++h) {
      __m256i hi0, lo0, hi1, lo1;
      detail::mulhilo8(c0[h], m0, hi0, lo0);
      detail::mulhilo8(c2[h], m1, hi1, lo1);
      c0[h] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[h]), key0);
      c1[h] = lo1;
      c2[h] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[h]), key1);
      c3[h] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // uint -> float in (0, 1): ((x >> 9) * 2 + 1) * 2^-24, exact in float
  const __m256 scale = _mm256_set1_ps(5.9604644775390625e-08f);
  const __m256i one = _mm256_set1_epi32(1);
  auto to_f = [&](__m256i x) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(x, 9), 1), one)),
                         scale);
  };
  for (int h = 0; h < N; ++h) {
    const __m256 a = to_f(c0[h]), b = to_f(c1[h]), c = to_f(c2[h]), d = to_f(c3[h]);
    // transpose (word, counter) -> stream order a0 b0 c0 d0 a1 b1 c1 d1 ...
    const __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
    const __m256 cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
    const __m256 t0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));
    const __m256 t1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));
    const __m256 t2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));
    const __m256 t3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));
    float* o = u + 32 * h;
    _mm256_storeu_ps(o, _mm256_permute2f128_ps(t0, t1, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(t2, t3, 0x20));
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(t0, t1, 0x31));
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(t2, t3, 0x31));
  }
}
inline void uniform32(uint64_t seed, uint64_t ctr, float* u) { uniform32xN<1>(seed, ctr, u); }
// 64 stream elements from 16 counters: u[4 * l + w] = uniform of word w of philox(seed, ctr + l), l < 16
inline void uniform64(uint64_t seed, uint64_t ctr, float* u) { uniform32xN<2>(seed, ctr, u); }
#else
inline void uniform32(uint64_t seed, uint64_t ctr, float* u) {
  uint32_t w[4];
  for (int l = 0; l < 8; ++l) {
    philox4x32_10(seed, ctr + l, w);
    for (int j = 0; j < 4; ++j) u[4 * l + j] = uint_to_uniform(w[j]);
  }
}
inline void uniform64(uint64_t seed, uint64_t ctr, float* u) {
  uniform32(seed, ctr, u);
  uniform32(seed, ctr + 8, u + 32);
}
#endif

// Scratch floats needed by fill_uniform for K elements.
inline int64_t uniform_scratch(int64_t K) { return 4 * (((K + 3) / 4 + 1 + 7) / 8 * 8); }

// u[k] = uniform of stream element e0 + k, k < K (scratch: uniform_scratch(K) floats)
inline void fill_uniform(uint64_t seed, uint64_t offset, uint64_t e0, int64_t K, float* u, float* scratch) {
  if (K <= 0) return;
  const uint64_t first = e0 >> 2, last = (e0 + K - 1) >> 2;
  const int64_t nctr = static_cast<int64_t>(last - first + 1);
  // 16 counters at a time, then 8 (the scratch size rounds the counters up to a multiple of 8)
  float* dst = (e0 & 3) == 0 && (K & 31) == 0 ? u : scratch;  // aligned: write straight into u
  int64_t c = 0;
  for (; c + 16 <= nctr; c += 16) uniform64(seed, offset + first + c, dst + 4 * c);
  for (; c < nctr; c += 8) uniform32(seed, offset + first + c, dst + 4 * c);
  if (dst == u) return;
  const float* w = scratch + (e0 & 3);
  for (int64_t k = 0; k < K; ++k) u[k] = w[k];
}

// Horizontal reduction of x[0..n) with an op that has a float and (with AVX2) an __m256 overload:
// 8 lanes accumulate, then the lanes fold left to right, then the tail.
template <typename Op>
inline float reduce_f32(const float* x, int64_t n, float init, Op op) {
  int64_t i = 0;
  float r = init;
#ifdef FG_MVEC
  if (n >= 8) {
    __m256 v = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) v = op(v, _mm256_loadu_ps(x + i));
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int j = 0; j < 8; ++j) r = op(r, t[j]);
  }
#endif
  for (; i < n; ++i) r = op(r, x[i]);
  return r;
}

struct MaxOp {
  float operator()(float a, float b) const { return std::max(a, b); }
#ifdef FG_MVEC
  __m256 operator()(__m256 a, __m256 b) const { return _mm256_max_ps(a, b); }
#endif
};

struct AddOp {
  float operator()(float a, float b) const { return a + b; }
#ifdef FG_MVEC
  __m256 operator()(__m256 a, __m256 b) const { return _mm256_add_ps(a, b); }
#endif
};

// max of x[0..n) (no NaN; -inf for n = 0)
inline float max_of(const float* x, int64_t n) { return reduce_f32(x, n, -INFINITY, MaxOp{}); }

// sum of x[0..n) with 8 partial sums
inline float sum_of(const float* x, int64_t n) { return reduce_f32(x, n, 0.0f, AddOp{}); }

// first index k in [0, n) with c[k] > t, or n (std::upper_bound), without data-dependent branches
inline int64_t upper_bound_branchless(const double* c, int64_t n, double t) {
  if (n <= 0) return 0;
  const double* b = c;
  while (n > 1) {
    const int64_t half = n / 2;
    b = (b[half] <= t) ? b + half : b;
    n -= half;
  }
  return (b - c) + (*b <= t);
}

// x[i] = op(x[i]) for i < n, 8 lanes at a time through the op's __m256 overload (libmvec) where available
template <typename Op>
inline void map_inplace(float* x, int64_t n, Op op) {
  int64_t i = 0;
#ifdef FG_MVEC
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, op(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = op(x[i]);
}

struct LogOp {
  float operator()(float v) const { return std::log(v); }
#ifdef FG_MVEC
  __m256 operator()(__m256 v) const { return _ZGVdN8v_logf(v); }
#endif
};

struct ExpOp {
  float operator()(float v) const { return std::exp(v); }
#ifdef FG_MVEC
  __m256 operator()(__m256 v) const { return _ZGVdN8v_expf(v); }
#endif
};

inline void log_inplace(float* x, int64_t n) { map_inplace(x, n, LogOp{}); }

inline void exp_inplace(float* x, int64_t n) { map_inplace(x, n, ExpOp{}); }

// Copy a row built in cache to output memory. With ``stream`` (outputs far larger than the caches, written
// whole), 32-byte-aligned chunks go out as streaming (non-temporal) stores, so the destination's old contents
// are never read in first (a normal store to a line not in cache reads it from memory: twice the traffic of
// the write). Small outputs take normal stores: the next op reads them from cache. Call stream_fence() before
// the written memory is read by another thread (end of a parallel_for chunk).
inline void write_row(void* dst, const void* src, size_t nbytes, bool stream) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
#ifdef FG_MVEC
  if (!stream) {
    std::memcpy(d, s, nbytes);
    return;
  }
  const size_t head = std::min(nbytes, (32 - reinterpret_cast<uintptr_t>(d) % 32) % 32);
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + 32 <= nbytes; i += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
  std::memcpy(d + i, s + i, nbytes - i);
#else
  (void)stream;
  std::memcpy(d, s, nbytes);
#endif
}

// outputs at least this large are written with streaming stores
constexpr size_t kStreamBytes = size_t(4) << 20;

// Row o[0..K) = one_hot(k). Memory known to be zero gets only its one; otherwise the row is written whole from
// ``zero_row`` (K zeros, borrowed and restored), with streaming stores when ``stream``.
template <typename T>
inline void write_one_hot(T* o, int64_t K, int64_t k, bool zeroed, T* zero_row, bool stream) {
  if (zeroed) {
    o[k] = T(1);
    return;
  }
  zero_row[k] = T(1);
  write_row(o, zero_row, static_cast<size_t>(K) * sizeof(T), stream);
  zero_row[k] = T(0);
}

inline void stream_fence() {
#ifdef FG_MVEC
  _mm_sfence();
#endif
}

// z[k] = (l[k] - shift) - log(-log(u_k)) for the row starting at stream element e0: the Gumbel-perturbed logits
// of Gumbel-softmax (shift 0) and Gumbel-top-k (shift = the row's logsumexp). u: K floats of scratch in acc.
template <typename scalar_t, typename acc>
inline void perturbed_row(const scalar_t* l, int64_t K, uint64_t seed, uint64_t offset, uint64_t e0, acc* u,
                          acc* z, float* scratch, acc shift = 0) {
  if constexpr (std::is_same_v<acc, float>) {
    // float path: Philox 8 counters at a time, vector log twice
    fill_uniform(seed, offset, e0, K, u, scratch);
    log_inplace(u, K);
    for (int64_t k = 0; k < K; ++k) u[k] = -u[k];
    log_inplace(u, K);
    for (int64_t k = 0; k < K; ++k) z[k] = (static_cast<float>(l[k]) - shift) - u[k];
  } else {
    PhiloxStream st(seed, offset, e0);
    for (int64_t k = 0; k < K; ++k) u[k] = static_cast<acc>(st.next());
    for (int64_t k = 0; k < K; ++k) z[k] = (static_cast<acc>(l[k]) - shift) - std::log(-std::log(u[k]));
  }
}

}  // namespace fastgrad
