// CUDA kernels of fastgrad_C::enumerate_log_probs and its backward.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"

namespace fastgrad {

template <typename scalar_t>
__global__ void enum_fwd_kernel(const acc_t<scalar_t>* __restrict__ lp, scalar_t* __restrict__ out, int64_t B, int64_t k,
                                int64_t K, int64_t C) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // t = c * B + b
  if (t >= C * B) return;
  const int64_t c = t / B, b = t % B;
  acc_t<scalar_t> v = 0;
  int64_t rest = c;
  for (int64_t i = k - 1; i >= 0; --i) {
    v += lp[(b * k + i) * K + rest % K];
    rest /= K;
  }
  out[t] = static_cast<scalar_t>(v);
}

template <typename scalar_t>
__global__ void enum_bwd_kernel(const scalar_t* __restrict__ g, const acc_t<scalar_t>* __restrict__ gsum,
                                const acc_t<scalar_t>* __restrict__ p, scalar_t* __restrict__ gl, int64_t B, int64_t k,
                                int64_t K, int64_t C) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // t = (b * k + i) * K + j
  if (t >= B * k * K) return;
  const int64_t j = t % K, i = (t / K) % k, b = t / (K * k);
  int64_t inner = 1;
  for (int64_t q = i + 1; q < k; ++q) inner *= K;
  const int64_t outer = C / (inner * K);
  acc_t<scalar_t> acc = 0;
  for (int64_t a = 0; a < outer; ++a)
    for (int64_t s = 0; s < inner; ++s) acc += static_cast<acc_t<scalar_t>>(g[((a * K + j) * inner + s) * B + b]);
  gl[t] = static_cast<scalar_t>(acc - p[t] * gsum[b]);
}

at::Tensor enumerate_log_probs_cuda(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous(), "logits must be a contiguous [B, k, K] tensor");
  const at::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), k = logits.size(1), K = logits.size(2);
  int64_t C = 1;
  for (int64_t i = 0; i < k; ++i) C *= K;
  auto out = at::empty({C, B}, logits.options());
  if (B == 0) return out;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lp = at::log_softmax(logits.to(acc_dtype), -1).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "enumerate_log_probs_cuda", [&] {
    const int64_t total = C * B;
    enum_fwd_kernel<scalar_t><<<(total + 255) / 256, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        lp.data_ptr<acc_t<scalar_t>>(), out.data_ptr<scalar_t>(), B, k, K, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor enumerate_log_probs_backward_cuda(const at::Tensor& grad, const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous(), "logits must be a contiguous [B, k, K] tensor");
  const at::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), k = logits.size(1), K = logits.size(2), C = grad.size(0);
  int64_t configs = 1;
  for (int64_t i = 0; i < k; ++i) configs *= K;  // K**k <= 2**62: the Python contract checked it
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && C == configs && grad.size(1) == B &&
                  grad.scalar_type() == logits.scalar_type(),
              "grad must be a contiguous [K**k, B] tensor in the logits' dtype");
  auto gl = at::empty_like(logits);
  if (B == 0) return gl;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto p = at::softmax(logits.to(acc_dtype), -1).contiguous();
  auto gsum = grad.to(acc_dtype).sum(0).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "enumerate_log_probs_bwd_cuda", [&] {
    const int64_t total = B * k * K;
    enum_bwd_kernel<scalar_t><<<(total + 255) / 256, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), gsum.data_ptr<acc_t<scalar_t>>(), p.data_ptr<acc_t<scalar_t>>(),
        gl.data_ptr<scalar_t>(), B, k, K, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gl;
}

TORCH_LIBRARY_IMPL(fastgrad_C, CUDA, m) {
  m.impl("enumerate_log_probs", &enumerate_log_probs_cuda);
  m.impl("enumerate_log_probs_backward", &enumerate_log_probs_backward_cuda);
}

}  // namespace fastgrad
