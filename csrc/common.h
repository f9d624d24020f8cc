#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#define FG_CHECK_2D(x, name) \
  TORCH_CHECK((x).dim() == 2 && (x).is_contiguous(), name " must be a contiguous 2-D tensor, got shape ", (x).sizes())

namespace fastgrad {
// float for half/bfloat16/float, double for double
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;
}  // namespace fastgrad
