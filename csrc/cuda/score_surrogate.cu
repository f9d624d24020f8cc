// CUDA kernels of fastgrad_C::score_surrogate: one read of each logits row forward, one write backward.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "cuda_utils.cuh"

namespace fastgrad {

template <typename scalar_t, typename wt>
__global__ void score_fwd_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ idx,
                                 const wt* __restrict__ w, wt* __restrict__ out, acc_t<scalar_t>* __restrict__ lse,
                                 int64_t R, int64_t K, int64_t n) {
  using acc = acc_t<scalar_t>;
  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + r * K;
  acc m = -INFINITY, s = 0;  // online max / sum-exp per thread
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc x = static_cast<acc>(row[k]);
    if (x > m) { s = s * exp(m - x) + 1; m = x; }
    else if (x > -INFINITY) s += exp(x - m);
  }
  const acc mx = block_max(m);
  const acc tot = block_sum(m == -INFINITY ? acc(0) : s * exp(m - mx));
  const acc l = mx + log(tot);
  if (threadIdx.x == 0) lse[r] = l;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    out[j * R + r] = static_cast<wt>(static_cast<acc>(w[j * R + r]) * (static_cast<acc>(row[idx[j * R + r]]) - l));
}

template <typename scalar_t>
__global__ void score_bwd_kernel(const acc_t<scalar_t>* __restrict__ a, const scalar_t* __restrict__ logits,
                                 const int64_t* __restrict__ idx, const acc_t<scalar_t>* __restrict__ lse,
                                 scalar_t* __restrict__ gl, int64_t R, int64_t K, int64_t n) {
  using acc = acc_t<scalar_t>;
  const int64_t r = blockIdx.x;
  acc asum = 0;
  for (int64_t j = 0; j < n; ++j) asum += a[j * R + r];
  const acc l = lse[r];
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    acc v = -asum * exp(static_cast<acc>(logits[r * K + k]) - l);
    for (int64_t j = 0; j < n; ++j)
      if (idx[j * R + r] == k) v += a[j * R + r];
    gl[r * K + k] = static_cast<scalar_t>(v);
  }
}

std::tuple<at::Tensor, at::Tensor> score_surrogate_cuda(const at::Tensor& logits, const at::Tensor& index,
                                                        const at::Tensor& weight) {
  FG_CHECK_2D(logits, "logits");
  const at::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0), K = logits.size(1), n = index.size(0);
  const bool dbl = logits.scalar_type() == at::kDouble;
  auto lse = at::empty({R}, logits.options().dtype(dbl ? at::kDouble : at::kFloat));
  auto out = at::empty_like(weight);
  if (R == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "score_surrogate_cuda", [&] {
    using lt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "score_surrogate_cuda_w", [&] {
      score_fwd_kernel<lt, scalar_t><<<R, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          logits.data_ptr<lt>(), index.data_ptr<int64_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          lse.data_ptr<acc_t<lt>>(), R, K, n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

at::Tensor score_surrogate_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& index,
                                         const at::Tensor& weight, const at::Tensor& lse) {
  FG_CHECK_2D(logits, "logits");
  const at::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0), K = logits.size(1), n = index.size(0);
  auto gl = at::empty_like(logits);
  if (R == 0) return gl;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto a = (grad.to(acc_dtype) * weight.to(acc_dtype)).contiguous();
  auto lse_acc = lse.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "score_surrogate_bwd_cuda", [&] {
    score_bwd_kernel<scalar_t><<<R, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<acc_t<scalar_t>>(), logits.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        lse_acc.data_ptr<acc_t<scalar_t>>(), gl.data_ptr<scalar_t>(), R, K, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gl;
}

TORCH_LIBRARY_IMPL(fastgrad_C, CUDA, m) {
  m.impl("score_surrogate", &score_surrogate_cuda);
  m.impl("score_surrogate_backward", &score_surrogate_backward_cuda);
}

}  // namespace fastgrad
