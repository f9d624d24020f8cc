// Counter-based Philox 4x32-10, identical to fastgrad/ops/_philox.py and fastgrad/kernels/_philox.py.
// The uniform of element e of an op is word e % 4 of philox(seed, counter = offset + e / 4), mapped to the
// float32 ((x >> 9) * 2 + 1) * 2^-24, strictly inside (0, 1).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FG_HD __host__ __device__ __forceinline__
#else
#define FG_HD inline
#endif

namespace fastgrad {

FG_HD void philox4x32_10(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

FG_HD float uint_to_uniform(uint32_t x) {
  return static_cast<float>(((x >> 9) << 1) | 1u) * 5.9604644775390625e-08f;  // 2^-24
}

// Sequential reader of the stream from element e onwards (one Philox call per 4 elements).
struct PhiloxStream {
  uint64_t seed, offset, e;
  uint32_t buf[4];
  FG_HD PhiloxStream(uint64_t seed_, uint64_t offset_, uint64_t e0) : seed(seed_), offset(offset_), e(e0) {
    philox4x32_10(seed, offset + (e >> 2), buf);
  }
  FG_HD float next() {
    const float u = uint_to_uniform(buf[e & 3]);
    ++e;
    if ((e & 3) == 0) philox4x32_10(seed, offset + (e >> 2), buf);
    return u;
  }
};

FG_HD float uniform_at(uint64_t seed, uint64_t offset, uint64_t e) {
  uint32_t w[4];
  philox4x32_10(seed, offset + (e >> 2), w);
  return uint_to_uniform(w[e & 3]);
}

}  // namespace fastgrad
