// CUDA kernel of fastgrad_C::categorical_sample (inverse CDF, same stream and rule as the CPU kernel).
// One block per row, O(K + n log K) work per row, as the CPU kernel:
//   1. block-wide row max (in the logits' precision: double for double) and float64 total of exp(l - max);
//   2. one sweep over the row in tiles of kThreads categories: a block-wide inclusive scan gives the tile's CDF in
//      shared memory; each draw whose target u * total falls inside the tile binary-searches it (log2 kThreads
//      steps). A thread holds up to kDrawsPerThread targets in registers, so n <= kThreads * kDrawsPerThread
//      draws share one sweep (more draws: one sweep per chunk).
// A draw whose target lies past the scanned total (rounding between the two float64 sums) takes the last
// category of positive probability, never a zero-probability one.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "philox.h"

namespace fastgrad {

namespace {
constexpr int kThreads = 256;
constexpr int kDrawsPerThread = 8;

// inclusive prefix sum over the block (kThreads threads); every thread also gets the block total
__device__ double block_inclusive_scan(double v, double* warp_sums, double* total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffff, v, o);
    if (lane >= o) v += y;
  }
  if (lane == 31) warp_sums[wid] = v;
  __syncthreads();
  if (wid == 0) {
    double w = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffff, w, o);
      if (lane >= o) w += y;
    }
    if (lane < kThreads / 32) warp_sums[lane] = w;
  }
  __syncthreads();
  if (wid > 0) v += warp_sums[wid - 1];
  *total = warp_sums[kThreads / 32 - 1];
  __syncthreads();  // warp_sums is reused by the next tile
  return v;
}
}  // namespace

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) categorical_sample_kernel(
    const scalar_t* __restrict__ logits, int64_t* __restrict__ idx, scalar_t* __restrict__ oh, int64_t R, int64_t K,
    int64_t n, uint64_t seed, uint64_t offset) {
  using acc = acc_t<scalar_t>;
  __shared__ double cdf[kThreads];
  __shared__ double warp_sums[32];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* row = logits + r * K;
  acc m = -INFINITY;
  for (int64_t k = tid; k < K; k += kThreads) m = max(m, static_cast<acc>(row[k]));
  m = block_max(m);
  double t = 0;
  int64_t last = -1;
  for (int64_t k = tid; k < K; k += kThreads) {
    const float p = expf(static_cast<float>(static_cast<acc>(row[k]) - m));
    t += static_cast<double>(p);
    if (p > 0.f) last = k;
  }
  const double total = block_sum(t);
  last = block_reduce(last, int64_t(-1), MaxOp{});
  const int64_t fallback = last >= 0 ? last : K - 1;

  constexpr int64_t kChunk = int64_t(kThreads) * kDrawsPerThread;
  for (int64_t s0 = 0; s0 < n; s0 += kChunk) {
    double target[kDrawsPerThread];
    int64_t found[kDrawsPerThread];
#pragma unroll
    for (int j = 0; j < kDrawsPerThread; ++j) {
      const int64_t s = s0 + tid + int64_t(j) * kThreads;
      target[j] = s < n ? static_cast<double>(uniform_at(seed, offset, static_cast<uint64_t>(s * R + r))) * total
                        : -1.0;
      found[j] = s < n ? -1 : 0;  // slots past n count as done
    }
    double running = 0;
    for (int64_t k0 = 0; k0 < K; k0 += kThreads) {
      const int64_t k = k0 + tid;
      const double p = k < K ? static_cast<double>(expf(static_cast<float>(static_cast<acc>(row[k]) - m))) : 0.0;
      double tile_total;
      cdf[tid] = running + block_inclusive_scan(p, warp_sums, &tile_total);
      __syncthreads();
      const double end = cdf[kThreads - 1];
#pragma unroll
      for (int j = 0; j < kDrawsPerThread; ++j) {
        if (found[j] < 0 && target[j] < end) {  // first category of this tile with cdf > target
          int lo = 0, hi = kThreads - 1;
          while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (cdf[mid] > target[j]) hi = mid; else lo = mid + 1;
          }
          found[j] = k0 + lo;
        }
      }
      running = end;
      __syncthreads();  // cdf is rewritten by the next tile
    }
#pragma unroll
    for (int j = 0; j < kDrawsPerThread; ++j) {
      const int64_t s = s0 + tid + int64_t(j) * kThreads;
      if (s < n) idx[s * R + r] = found[j] >= 0 && found[j] < K ? found[j] : fallback;
    }
  }
  if (oh != nullptr) {
    __syncthreads();  // indices were written by other threads of the block
    for (int64_t s = 0; s < n; ++s) {
      const int64_t chosen = idx[s * R + r];
      scalar_t* o = oh + (s * R + r) * K;
      for (int64_t k = tid; k < K; k += kThreads) o[k] = scalar_t(k == chosen ? 1.f : 0.f);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> categorical_sample_cuda(const at::Tensor& logits, int64_t n, int64_t seed,
                                                           int64_t offset, bool one_hot) {
  FG_CHECK_2D(logits, "logits");
  const at::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0), K = logits.size(1);
  auto idx = at::empty({n, R}, logits.options().dtype(at::kLong));
  auto oh = one_hot ? at::empty({n, R, K}, logits.options()) : at::empty({0}, logits.options());
  if (R == 0) return {idx, oh};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "categorical_sample_cuda", [&] {
    categorical_sample_kernel<scalar_t><<<R, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), one_hot ? oh.data_ptr<scalar_t>() : nullptr, R, K, n,
        seed, offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {idx, oh};
}

TORCH_LIBRARY_IMPL(fastgrad_C, CUDA, m) { m.impl("categorical_sample", &categorical_sample_cuda); }

}  // namespace fastgrad
