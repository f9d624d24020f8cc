#pragma once
#include <algorithm>
#include <cmath>
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

// Grain (items per task) for at::parallel_for over items of ``work`` elements each: a task gets at least
// ATen's GRAIN_SIZE elements of work, so small inputs (the seed VAE's 128 rows of 10) run inline on the calling
// thread instead of paying a thread-pool wake-up for microseconds of work.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
}

// The ValueError message of the kernels that validate logits rows (NaN, +inf, or no finite entry).
#define FG_INVALID_ROWS_MESSAGE \
  "logits must not contain NaN or +inf, and each row needs a finite entry (-inf marks a zero-probability category)"

// Large CPU outputs. A fresh anonymous mapping costs a page fault and a kernel zero-fill per page, even with 2 MB
// pages: for a 1 GB one-hot that is more than the sampling itself (benchmarks/test_vae_smoke.py counts the faults). So mappings of freed
// outputs are kept (up to a cap, FASTGRAD_CPU_CACHE_MB, default 1/8 of RAM) and handed to the next output of
// the same mapping size, as a caching allocator does on a GPU: a training loop that draws the same shapes every
// step stops faulting after its first step. fastgrad.empty_cache() returns them to the system.
void* output_cache_take(size_t len);          // a cached mapping of exactly len bytes, or nullptr
void output_cache_give(void* base, size_t len);  // keep (within the cap) or unmap
int64_t output_cache_bytes();
int64_t output_cache_release();

// A new CPU tensor for a large output. Above 4 MB it is backed by its own anonymous mapping, advised to use
// transparent huge pages (one fault per 2 MB instead of per 4 KB), reused from the cache when one of the same
// size was freed. ``zeroed`` tells whether the memory is known to be zero (a fresh mapping), so that sparse
// outputs (one-hot) write only their non-zeros; reused memory must be written whole (see write_row).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool* zeroed = nullptr) {
  if (zeroed) *zeroed = false;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  constexpr size_t kHuge = size_t(2) << 20;
  if (nbytes >= (size_t(4) << 20)) {
    const size_t len = (nbytes + 2 * kHuge - 1) / kHuge * kHuge;  // room to start on a 2 MB boundary
    void* base = output_cache_take(len);
    const bool fresh = base == nullptr;
    if (fresh) {
      base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED) return at::empty(sizes, opts);
    }
    const uintptr_t a = (reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
    void* data = reinterpret_cast<void*>(a);
    if (fresh) madvise(data, nbytes, MADV_HUGEPAGE);
    if (zeroed) *zeroed = fresh;
    return at::from_blob(data, sizes, [base, len](void*) { output_cache_give(base, len); }, opts.device(at::kCPU));
  }
#endif
  return at::empty(sizes, opts);
}
}  // namespace fastgrad
