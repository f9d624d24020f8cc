// The cache of freed large-output mappings behind new_output (common.h).
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

namespace fastgrad {
namespace {
struct Block {
  void* base;
  size_t len;
};

struct OutputCache {
  std::mutex mu;
  std::vector<Block> blocks;
  size_t bytes = 0;
  size_t cap = 0;

  OutputCache() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    cap = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) / 8 : 0;
    // digits only (else the default; fastgrad's Python layer warns about such a value when it loads the
    // extension: a TORCH_WARN here is raised from inside whichever op allocates first, and only some torch
    // versions turn it into a Python warning there)
    const char* env = std::getenv("FASTGRAD_CPU_CACHE_MB");
    if (env && *env) {
      bool digits = true;
      for (const char* q = env; *q; ++q) digits = digits && *q >= '0' && *q <= '9';
      if (digits) {
        const unsigned long long mb = std::strtoull(env, nullptr, 10);  // saturates on overflow
        cap = mb > (SIZE_MAX >> 20) ? SIZE_MAX : static_cast<size_t>(mb) << 20;
      }
    }
  }
};

// never destroyed: tensors freed during interpreter shutdown may still give their mapping back
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}
}  // namespace

void* output_cache_take(size_t len) {
  auto& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  for (size_t i = c.blocks.size(); i-- > 0;) {  // most recently freed first: its pages are likeliest resident
    if (c.blocks[i].len == len) {
      void* base = c.blocks[i].base;
      c.blocks.erase(c.blocks.begin() + static_cast<std::ptrdiff_t>(i));
      c.bytes -= len;
      return base;
    }
  }
  return nullptr;
}

void output_cache_give(void* base, size_t len) {
  auto& c = cache();
  {
    std::lock_guard<std::mutex> g(c.mu);
    if (c.bytes + len <= c.cap) {
      c.blocks.push_back({base, len});
      c.bytes += len;
      return;
    }
  }
  munmap(base, len);
}

int64_t output_cache_bytes() {
  auto& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return static_cast<int64_t>(c.bytes);
}

int64_t output_cache_release() {
  std::vector<Block> blocks;
  {
    auto& c = cache();
    std::lock_guard<std::mutex> g(c.mu);
    blocks.swap(c.blocks);
    c.bytes = 0;
  }
  int64_t freed = 0;
  for (const auto& b : blocks) {
    munmap(b.base, b.len);
    freed += static_cast<int64_t>(b.len);
  }
  return freed;
}

TORCH_LIBRARY_FRAGMENT(fastgrad_C, m) {
  m.def("cpu_cache_bytes() -> int", &output_cache_bytes);
  m.def("cpu_cache_release() -> int", &output_cache_release);
}

}  // namespace fastgrad
