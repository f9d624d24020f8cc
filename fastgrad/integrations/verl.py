"""verl: a drop-in for its fused-kernel LM head (``use_fused_kernels=True``).

verl's FSDP actor, with ``actor_rollout_ref.model.use_fused_kernels=True``, computes the response's log-probs and
entropy from the last hidden state and ``lm_head.weight`` through ``FusedLinearForPPO``
(``verl/utils/experimental/torch_functional.py``; chunks of 512 rows, each materializing its ``[512, V]`` fp32
logits, softmax, log-softmax and one-hot; 1 GEMM forward, 3 backward). :class:`FusedLinearForPPO` here has its
constructor, forward signature and outputs, on :func:`fastgrad.functional.linear_log_prob` (the same 4 GEMMs, one fp32
``[chunk, V]`` slab and nothing else of that size, the softmax statistics fused into one pass per slab), plus what verl's refuses: ``return_sum_pi_squared=True`` (the optimal token baseline's
statistic) and a vocabulary-parallel head (``tp_group=``).

Select it in a verl run with :func:`install` (verl's model code imports the class from its module at each call, so
replacing the module's attribute in every worker process is enough); see the docs page "verl" for the
configuration line.
"""
from typing import Optional

import torch

from ..functional.lm_head import linear_log_prob

__all__ = ["FusedLinearForPPO", "install", "uninstall"]

_VERL_MODULE = "verl.utils.experimental.torch_functional"
_BACKENDS = ("torch", "liger", "triton", "fastgrad")


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` on fastgrad's fused LM head: per-token log-probs and entropy of the tempered
    softmax of ``hidden_states @ vocab_weights.T``, exact gradients w.r.t. both, without the ``[tokens, V]`` logits.

    Args:
        chunk_size: rows per slab, as verl's; None (the default here) lets fastgrad choose
            (:func:`fastgrad.ops.linear_log_prob.default_chunk`). Outputs do not depend on it.
        impl_backend: accepted for verl's signature (``"torch"``, ``"liger"``, ``"triton"``, ``"fastgrad"``); fastgrad's
            kernels run in every case (the C++/CUDA/Triton backend is picked by the tensors' device).
        tp_group, vocab_start, reduce_hidden_grad: the vocabulary-parallel head of
            :func:`fastgrad.functional.linear_log_prob` (``vocab_weights`` is then this rank's rows).

    ``forward(hidden_states [T, H] or [B, T, H], vocab_weights [V, H], input_ids [T] or [B, T], temperature=1.0,
    return_sum_pi_squared=False)`` returns ``(log_probs, entropy)`` of ``input_ids``' shape, ``log_probs`` fp32 and
    ``entropy`` in ``hidden_states``' dtype (verl's dtypes), both differentiable; with
    ``return_sum_pi_squared=True`` also ``sum_pi_squared`` (fp32, detached, ``sum_v p_v^2`` per token). Exact (not an
    estimator); cost: 1 GEMM forward, 3 backward (verl's count), one ``[chunk, V]`` fp32 slab of memory.
    """

    def __init__(self, chunk_size: Optional[int] = None, impl_backend: str = "torch", *, tp_group=None,
                 vocab_start: Optional[int] = None, reduce_hidden_grad: bool = True):
        super().__init__()
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if impl_backend not in _BACKENDS:
            raise ValueError(f"impl_backend must be one of {_BACKENDS}, got {impl_backend!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend
        self.tp_group = tp_group
        self.vocab_start = vocab_start
        self.reduce_hidden_grad = reduce_hidden_grad

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0, return_sum_pi_squared: bool = False):
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() not in (2, 3):
            raise ValueError(f"hidden_states must be a 2-D or 3-D tensor, got "
                             f"{tuple(getattr(hidden_states, 'shape', ()))}")
        if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(f"input_ids must have shape {tuple(hidden_states.shape[:-1])} (hidden_states' leading "
                             f"shape), got {tuple(getattr(input_ids, 'shape', ()))}")
        out = linear_log_prob(hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=temperature,
                              return_entropy=True, return_sum_pi_squared=bool(return_sum_pi_squared),
                              chunk_size=self.chunk_size, tp_group=self.tp_group, vocab_start=self.vocab_start,
                              reduce_hidden_grad=self.reduce_hidden_grad)
        log_probs = out.logp.float()
        entropy = out.entropy.to(hidden_states.dtype)
        if return_sum_pi_squared:
            return log_probs, entropy, out.sum_pi_squared.float()
        return log_probs, entropy


_saved = {}


def install() -> None:
    """Make verl's fused-kernel path (``use_fused_kernels=True`` with ``impl_backend`` ``"torch"`` or ``"liger"``)
    use :class:`FusedLinearForPPO`: replaces ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` in this
    process (verl's model forwards import it from there at each call). Idempotent; :func:`uninstall` undoes it.
    Call it in every process that runs the actor, e.g. as Ray's ``worker_process_setup_hook`` (docs page "verl")."""
    import importlib

    mod = importlib.import_module(_VERL_MODULE)
    if mod.FusedLinearForPPO is not FusedLinearForPPO:
        _saved.setdefault("FusedLinearForPPO", mod.FusedLinearForPPO)
        mod.FusedLinearForPPO = FusedLinearForPPO


def uninstall() -> None:
    """Restore verl's own ``FusedLinearForPPO`` (a no-op when :func:`install` was not called)."""
    import sys

    mod = sys.modules.get(_VERL_MODULE)
    if mod is not None and "FusedLinearForPPO" in _saved:
        mod.FusedLinearForPPO = _saved.pop("FusedLinearForPPO")
