// One schema for the kernel library torch.ops.fastgrad_C.*; per-device implementations live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu. The user-facing ops (torch.ops.fastgrad.*, with fake and autograd
// registrations) are defined in fastgrad/ops/<op>.py and dispatch here.
#include <Python.h>
#include <torch/library.h>

#ifdef FASTGRAD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

namespace fastgrad {

bool has_cuda() {
#ifdef FASTGRAD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int64_t cuda_version() {
#ifdef FASTGRAD_WITH_CUDA
  return CUDART_VERSION;
#else
  return 0;
#endif
}

TORCH_LIBRARY(fastgrad_C, m) {
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("cuda_version() -> int", &cuda_version);
  m.def("categorical_sample(Tensor logits, int n, int seed, int offset, bool one_hot) -> (Tensor, Tensor)");
  m.def("gumbel_softmax(Tensor logits, int n, float tau, bool hard, int seed, int offset) -> Tensor");
  m.def("gumbel_softmax_backward(Tensor grad, Tensor logits, float tau, int seed, int offset) -> Tensor");
  m.def("score_surrogate(Tensor logits, Tensor index, Tensor weight) -> (Tensor, Tensor)");
  m.def("score_surrogate_backward(Tensor grad, Tensor logits, Tensor index, Tensor weight, Tensor lse) -> Tensor");
  m.def("enumerate_log_probs(Tensor logits) -> Tensor");
  m.def("enumerate_log_probs_backward(Tensor grad, Tensor logits) -> Tensor");
  m.def("gumbel_topk(Tensor logits, int k, int seed, int offset) -> (Tensor, Tensor)");
  // row passes of the fused LM-head ops over one token block's logits slab (fastgrad/ops/_lm_head.py)
  // (logp [M, S], norm [M, 2] = (row max, log-sum-exp relative to it), entropy [M] or [0], sum p^2 [M] or [0])
  m.def("linear_rows_stats(Tensor slab, Tensor index, float inv_t, bool want_entropy, bool want_sum_sq) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_rows_grad_(Tensor(a!) slab, Tensor index, Tensor coef, Tensor p_coef, Tensor g_ent, Tensor norm, "
        "Tensor ent, float inv_t) -> ()");
}

}  // namespace fastgrad
