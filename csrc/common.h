#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#define FG_CHECK_2D(x, name) \
  TORCH_CHECK((x).dim() == 2 && (x).is_contiguous(), name " must be a contiguous 2-D tensor, got shape ", (x).sizes())

namespace fastgrad {
// float for half/bfloat16/float, double for double
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

// A new CPU tensor for a large output. Above 4 MB it is backed by fresh anonymous pages, which the kernel
// hands out zero-filled, advised to use transparent huge pages (one page fault per 2 MB instead of per 4 KB:
// page faults, not arithmetic, bound a fresh 1 GB output on the CPU). ``zeroed`` tells whether the memory is
// known to be zero, so that sparse outputs (one-hot) write only their non-zeros.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool* zeroed = nullptr) {
  if (zeroed) *zeroed = false;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  constexpr size_t kHuge = size_t(2) << 20;
  if (nbytes >= (size_t(4) << 20)) {
    const size_t len = nbytes + kHuge;  // room to start on a 2 MB boundary
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const uintptr_t a = (reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
      void* data = reinterpret_cast<void*>(a);
      madvise(data, nbytes, MADV_HUGEPAGE);
      if (zeroed) *zeroed = true;
      return at::from_blob(data, sizes, [base, len](void*) { munmap(base, len); }, opts.device(at::kCPU));
    }
  }
#endif
  return at::empty(sizes, opts);
}
}  // namespace fastgrad
