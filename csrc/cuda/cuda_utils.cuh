#pragma once
#include <cuda_runtime.h>

namespace fastgrad {

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return max(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// Block-wide reduction (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename T, typename Op>
__device__ T block_reduce(T v, T identity, Op op) {
  __shared__ T shm[32];
  v = warp_reduce(v, op);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  T r = threadIdx.x < (blockDim.x >> 5) ? shm[threadIdx.x] : identity;
  if (wid == 0) r = warp_reduce(r, op);
  if (threadIdx.x == 0) shm[0] = r;
  __syncthreads();
  return shm[0];
}

template <typename T>
__device__ T block_sum(T v) {
  return block_reduce(v, T(0), SumOp{});
}

template <typename T>
__device__ T block_max(T v) {
  return block_reduce(v, T(-INFINITY), MaxOp{});
}

}  // namespace fastgrad
