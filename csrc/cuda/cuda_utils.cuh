#pragma once
#include <cuda_runtime.h>

namespace fastgrad {

template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_reduce_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T shm[32];
  v = warp_reduce_sum(v);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  T r = threadIdx.x < (blockDim.x >> 5) ? shm[threadIdx.x] : T(0);
  if (wid == 0) r = warp_reduce_sum(r);
  if (threadIdx.x == 0) shm[0] = r;
  __syncthreads();
  return shm[0];
}

template <typename T>
__device__ T block_max(T v) {
  __shared__ T shm[32];
  v = warp_reduce_max(v);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  T r = threadIdx.x < (blockDim.x >> 5) ? shm[threadIdx.x] : T(-INFINITY);
  if (wid == 0) r = warp_reduce_max(r);
  if (threadIdx.x == 0) shm[0] = r;
  __syncthreads();
  return shm[0];
}

}  // namespace fastgrad
