// CUDA kernels of fastgrad_C::gumbel_softmax and its backward; noise regenerated from (seed, offset).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "philox.h"

namespace fastgrad {

template <typename scalar_t, typename acc>
__device__ __forceinline__ acc perturbed(const scalar_t* row, int64_t k, uint64_t seed, uint64_t offset, uint64_t e0) {
  const acc u = static_cast<acc>(uniform_at(seed, offset, e0 + k));
  return static_cast<acc>(row[k]) - log(-log(u));
}

template <typename scalar_t>
__global__ void gumbel_fwd_kernel(const scalar_t* __restrict__ logits, scalar_t* __restrict__ out, int64_t R, int64_t K,
                                  acc_t<scalar_t> inv_tau, bool hard, uint64_t seed, uint64_t offset) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x, r = b % R;
  const scalar_t* row = logits + r * K;
  const uint64_t e0 = static_cast<uint64_t>(b) * K;
  acc m = -INFINITY;
  int64_t am = K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc z = perturbed<scalar_t, acc>(row, k, seed, offset, e0);
    if (z > m) { m = z; am = k; }
  }
  const acc mx = block_max(m);
  scalar_t* o = out + b * K;
  if (hard) {
    // first maximal index: min over threads holding the max
    const float cand = (m == mx) ? static_cast<float>(am) : static_cast<float>(K);
    const float first = -block_max(-cand);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) o[k] = scalar_t(k == static_cast<int64_t>(first) ? 1.f : 0.f);
    return;
  }
  acc s = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    s += exp((perturbed<scalar_t, acc>(row, k, seed, offset, e0) - mx) * inv_tau);
  const acc tot = block_sum(s);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    o[k] = static_cast<scalar_t>(exp((perturbed<scalar_t, acc>(row, k, seed, offset, e0) - mx) * inv_tau) / tot);
}

// The gradient is accumulated over the n samples in acc (float32 for half/bfloat16, as the CPU kernel does) in
// ``gl``, an acc-typed buffer; the caller rounds it to the logits' dtype once.
template <typename scalar_t>
__global__ void gumbel_bwd_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ logits,
                                  acc_t<scalar_t>* __restrict__ gl, int64_t R, int64_t K, int64_t n,
                                  acc_t<scalar_t> inv_tau, uint64_t seed, uint64_t offset) {
  using acc = acc_t<scalar_t>;
  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + r * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) gl[r * K + k] = acc(0);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t b = s * R + r;
    const uint64_t e0 = static_cast<uint64_t>(b) * K;
    acc m = -INFINITY;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) m = max(m, perturbed<scalar_t, acc>(row, k, seed, offset, e0));
    const acc mx = block_max(m);
    acc sm = 0, dot = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const acc e = exp((perturbed<scalar_t, acc>(row, k, seed, offset, e0) - mx) * inv_tau);
      sm += e;
      dot += e * static_cast<acc>(grad[b * K + k]);
    }
    const acc tot = block_sum(sm);
    const acc d = block_sum(dot) / tot;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const acc y = exp((perturbed<scalar_t, acc>(row, k, seed, offset, e0) - mx) * inv_tau) / tot;
      gl[r * K + k] += y * (static_cast<acc>(grad[b * K + k]) - d) * inv_tau;
    }
  }
}

at::Tensor gumbel_softmax_cuda(const at::Tensor& logits, int64_t n, double tau, bool hard, int64_t seed, int64_t offset) {
  FG_CHECK_2D(logits, "logits");
  const at::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0), K = logits.size(1);
  auto out = at::empty({n, R, K}, logits.options());
  if (R == 0 || K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_softmax_cuda", [&] {
    gumbel_fwd_kernel<scalar_t><<<n * R, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), R, K, static_cast<acc_t<scalar_t>>(1.0 / tau), hard,
        seed, offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gumbel_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, double tau, int64_t seed,
                                        int64_t offset) {
  FG_CHECK_2D(logits, "logits");
  const at::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0), K = logits.size(1), n = grad.size(0);
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous() && grad.size(1) == R && grad.size(2) == K &&
                  grad.scalar_type() == logits.scalar_type(),
              "grad must be a contiguous [n, R, K] tensor matching logits");
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gl = at::empty(logits.sizes(), logits.options().dtype(acc_type));
  if (R == 0 || K == 0) return gl.to(logits.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_softmax_bwd_cuda", [&] {
    gumbel_bwd_kernel<scalar_t><<<R, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), gl.data_ptr<acc_t<scalar_t>>(), R, K, n,
        static_cast<acc_t<scalar_t>>(1.0 / tau), seed, offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gl.to(logits.scalar_type());
}

TORCH_LIBRARY_IMPL(fastgrad_C, CUDA, m) {
  m.impl("gumbel_softmax", &gumbel_softmax_cuda);
  m.impl("gumbel_softmax_backward", &gumbel_softmax_backward_cuda);
}

}  // namespace fastgrad
