// CUDA kernel of fastgrad_C::categorical_sample (inverse CDF, same stream and rule as the CPU kernel).
// One block per row: block-wide max and float64 total, then each thread walks the CDF for its draws.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "philox.h"

namespace fastgrad {

template <typename scalar_t>
__global__ void categorical_sample_kernel(const scalar_t* __restrict__ logits, int64_t* __restrict__ idx,
                                          scalar_t* __restrict__ oh, int64_t R, int64_t K, int64_t n, uint64_t seed,
                                          uint64_t offset) {
  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + r * K;
  float m = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) m = fmaxf(m, static_cast<float>(row[k]));
  m = block_max(m);
  double t = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) t += static_cast<double>(expf(static_cast<float>(row[k]) - m));
  const double total = block_sum(t);
  for (int64_t s = threadIdx.x; s < n; s += blockDim.x) {
    const double target = static_cast<double>(uniform_at(seed, offset, static_cast<uint64_t>(s * R + r))) * total;
    double cdf = 0;
    int64_t k = 0;
    while (k < K - 1) {
      cdf += static_cast<double>(expf(static_cast<float>(row[k]) - m));
      if (cdf > target) break;
      ++k;
    }
    idx[s * R + r] = k;
  }
  if (oh != nullptr) {
    __syncthreads();
    for (int64_t s = 0; s < n; ++s) {
      const int64_t chosen = idx[s * R + r];
      scalar_t* o = oh + (s * R + r) * K;
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) o[k] = scalar_t(k == chosen ? 1.f : 0.f);
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
    categorical_sample_kernel<scalar_t><<<R, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), one_hot ? oh.data_ptr<scalar_t>() : nullptr, R, K, n,
        seed, offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {idx, oh};
}

TORCH_LIBRARY_IMPL(fastgrad_C, CUDA, m) { m.impl("categorical_sample", &categorical_sample_cuda); }

}  // namespace fastgrad
