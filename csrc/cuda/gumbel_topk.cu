// CUDA kernel of fastgrad_C::gumbel_topk (Gumbel-top-k, same stream and rule as the CPU and Triton kernels).
// One block per row: a block-wide logsumexp, then k selection passes over the row, each recomputing the perturbed
// values phi_i = log_softmax(l)_i + G_i (G_i = -log(-log u), u the uniform of stream element r * K + i) and taking
// the largest one below the previous pick (ties broken by the smaller index), so nothing [R, K] is stored. k passes
// cost k reads of the row: meant for the small k of the estimators. The input contract (finite rows, at least k
// categories of nonzero probability) is checked before the launch (fastgrad/ops/gumbel_topk.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "philox.h"

namespace fastgrad {

namespace {
constexpr int kThreads = 256;

// (value, index) of the block's best candidate: the larger value, the smaller index on ties
template <typename acc>
__device__ void block_argmax(acc& v, int64_t& i) {
  __shared__ acc sv[32];
  __shared__ int64_t si[32];
  for (int o = 16; o > 0; o >>= 1) {
    const acc ov = __shfl_xor_sync(0xffffffff, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffff, i, o);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) { sv[wid] = v; si[wid] = i; }
  __syncthreads();
  if (wid == 0) {
    v = lane < (kThreads >> 5) ? sv[lane] : acc(-INFINITY);
    i = lane < (kThreads >> 5) ? si[lane] : INT64_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const acc ov = __shfl_xor_sync(0xffffffff, v, o);
      const int64_t oi = __shfl_xor_sync(0xffffffff, i, o);
      if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    if (lane == 0) { sv[0] = v; si[0] = i; }
  }
  __syncthreads();
  v = sv[0];
  i = si[0];
}
}  // namespace

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gumbel_topk_kernel(const scalar_t* __restrict__ logits,
                                                               int64_t* __restrict__ idx, acc_t<scalar_t>* __restrict__ val,
                                                               int64_t K, int64_t k, uint64_t seed, uint64_t offset) {
  using acc = acc_t<scalar_t>;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* row = logits + r * K;
  acc m = -INFINITY;
  for (int64_t c = tid; c < K; c += kThreads) m = max(m, static_cast<acc>(row[c]));
  m = block_max(m);
  acc s = 0;
  for (int64_t c = tid; c < K; c += kThreads) s += exp(static_cast<acc>(row[c]) - m);
  const acc lse = m + log(block_sum(s));
  acc prev_v = INFINITY;
  int64_t prev_i = -1;
  for (int64_t j = 0; j < k; ++j) {
    acc best_v = -INFINITY;
    int64_t best_i = INT64_MAX;
    for (int64_t c = tid; c < K; c += kThreads) {
      const acc u = static_cast<acc>(uniform_at(seed, offset, static_cast<uint64_t>(r * K + c)));
      const acc z = (static_cast<acc>(row[c]) - lse) - log(-log(u));
      const bool ok = z < prev_v || (z == prev_v && c > prev_i);
      if (ok && (z > best_v || (z == best_v && c < best_i))) { best_v = z; best_i = c; }
    }
    block_argmax(best_v, best_i);
    if (tid == 0) {
      idx[r * k + j] = best_i;
      val[r * k + j] = best_v;
    }
    prev_v = best_v;
    prev_i = best_i;
  }
}

std::tuple<at::Tensor, at::Tensor> gumbel_topk_cuda(const at::Tensor& logits, int64_t k, int64_t seed,
                                                    int64_t offset) {
  FG_CHECK_2D(logits, "logits");
  const at::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0), K = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= K, "k must lie in [1, K] = [1, ", K, "], got ", k);
  const bool dbl = logits.scalar_type() == at::kDouble;
  auto idx = at::empty({R, k}, logits.options().dtype(at::kLong));
  auto val = at::empty({R, k}, logits.options().dtype(dbl ? at::kDouble : at::kFloat));
  if (R == 0) return {idx, val};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_topk_cuda", [&] {
    gumbel_topk_kernel<scalar_t><<<R, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), val.data_ptr<acc_t<scalar_t>>(), K, k,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {idx, val};
}

TORCH_LIBRARY_IMPL(fastgrad_C, CUDA, m) { m.impl("gumbel_topk", &gumbel_topk_cuda); }

}  // namespace fastgrad
