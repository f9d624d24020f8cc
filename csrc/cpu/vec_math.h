// Array helpers for the CPU kernels: Philox for 8 counters at a time (auto-vectorized) and float log/exp over
// arrays through glibc's libmvec AVX2 variants when available (scalar libm otherwise).
#pragma once
#include <cmath>
#include <cstdint>

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

// words[4 * l + w] = word w of philox(seed, ctr + l), l < 8
inline void philox8(uint64_t seed, uint64_t ctr, uint32_t* words) {
  uint32_t c0[8], c1[8], c2[8], c3[8];
  for (int l = 0; l < 8; ++l) {
    c0[l] = static_cast<uint32_t>(ctr + l);
    c1[l] = static_cast<uint32_t>((ctr + l) >> 32);
    c2[l] = 0;
    c3[l] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    for (int l = 0; l < 8; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(p1);
      c3[l] = static_cast<uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < 8; ++l) {
    words[4 * l] = c0[l];
    words[4 * l + 1] = c1[l];
    words[4 * l + 2] = c2[l];
    words[4 * l + 3] = c3[l];
  }
}

// Scratch words needed by fill_uniform for K elements.
inline int64_t uniform_scratch(int64_t K) { return 4 * (((K + 3) / 4 + 1 + 7) / 8 * 8); }

// u[k] = uniform of stream element e0 + k, k < K
inline void fill_uniform(uint64_t seed, uint64_t offset, uint64_t e0, int64_t K, float* u, uint32_t* scratch) {
  const uint64_t first = e0 >> 2, last = (e0 + K - 1) >> 2;
  const int64_t nctr = static_cast<int64_t>(last - first + 1);
  for (int64_t c = 0; c < nctr; c += 8) philox8(seed, offset + first + c, scratch + 4 * c);
  const uint32_t* w = scratch + (e0 & 3);
  for (int64_t k = 0; k < K; ++k) u[k] = uint_to_uniform(w[k]);
}

inline void log_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef FG_MVEC
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _ZGVdN8v_logf(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::log(x[i]);
}

inline void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef FG_MVEC
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _ZGVdN8v_expf(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

}  // namespace fastgrad
