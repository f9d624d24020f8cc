"""The LM head fused with the log-probability and the policy-gradient losses (plain functions over the ops of
:mod:`fastgrad.ops.linear_log_prob` and :mod:`fastgrad.ops.linear_policy_loss`)."""
from __future__ import annotations

import collections
import functools
import math
import numbers
from typing import Optional, Tuple

import torch

from ..ops import _checks
from ..ops import _lm_head
from ..ops import _vocab_parallel as _vp
from ..ops import linear_log_prob as _llp
from ..ops import linear_policy_loss as _plp
from ._validate import Baseline, check_real, expand_to
from .score_function import subtract_baseline


def _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget, index_extra: int = 0):
    """Validate and flatten: hidden [N, H] or [B, T, H] -> [N, H]; index (hidden's leading shape) -> [N]."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating torch.Tensor, got {getattr(hidden, 'dtype', type(hidden).__name__)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, H] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor of token ids, got "
                        f"{getattr(index, 'dtype', type(index).__name__)}")
    lead = tuple(hidden.shape[:-1])
    if tuple(index.shape[index_extra:]) != lead:
        raise ValueError(f"index must have shape {lead} (hidden's leading dims), got {tuple(index.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    _checks.finite(h2, "hidden")
    chunk = chunk_size or 0
    if chunk == 0 and memory_budget is not None:
        chunk = _lm_head.default_chunk(h2.shape[0], weight.shape[0], h2.device, memory_budget)
    return h2, weight.contiguous(), None if bias is None else bias.contiguous(), float(temperature), chunk


_LOG_PROB_FIELDS = ("logp", "entropy", "sum_pi_squared", "lse")


def _tp_setup(tp_group, weight, vocab_start, reduce_hidden_grad, hidden):
    if tp_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start is for a vocabulary-parallel head: pass tp_group too")
        return None
    grad_x = bool(torch.is_grad_enabled() and hidden.requires_grad)  # dX's all-reduce: every rank or none
    return _vp.setup(tp_group, weight.shape[0], vocab_start, reduce_hidden_grad, weight.device, grad_x)


def _unshard(weight, bias, tp_group, vocab_start):
    """A DTensor LM head sharded ``Shard(0)`` on a 1-D mesh: its local rows, the mesh's group and this rank's first
    id (DTensor's split: ``ceil(V / world)`` rows per rank, the last ones fewer). Anything else passes through."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch without DTensor
        return weight, bias, tp_group, vocab_start
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise TypeError("bias is a DTensor but weight is not: shard both, or neither")
        return weight, bias, tp_group, vocab_start
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"a DTensor weight must be sharded Shard(0) on a 1-D mesh (the vocabulary split), got "
                         f"{tuple(weight.placements)} on a {mesh.ndim}-D mesh")
    if tp_group is not None or vocab_start is not None:
        raise ValueError("a DTensor weight carries its group and offset: pass no tp_group or vocab_start")
    V, world, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
    per = -(-V // world)
    start = min(V, rank * per)
    if bias is not None:
        if not isinstance(bias, DTensor) or tuple(bias.placements) != (Shard(0),):
            raise ValueError("with a DTensor weight, bias must be a DTensor sharded Shard(0) on the same mesh")
        bias = bias.to_local()
    return weight.to_local(), bias, mesh.get_group(), start


def _support_args(support):
    if support is None:
        return None, None
    if not (isinstance(support, (tuple, list)) and len(support) == 2
            and all(isinstance(t, torch.Tensor) for t in support)):
        raise TypeError("support must be a pair (crow_indices, col_indices) of int64 tensors (CSR over the tokens), "
                        f"got {type(support).__name__}")
    return support[0], support[1]  # the op checks the rest


@functools.lru_cache(maxsize=None)
def _log_prob_result(fields: Tuple[str, ...]):
    return collections.namedtuple("LinearLogProb", fields)


def linear_log_prob(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                    return_entropy: bool = False, return_sum_pi_squared: bool = False, return_lse: bool = False,
                    support: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, chunk_size: Optional[int] = None,
                    memory_budget: Optional[int] = None, tp_group=None, vocab_start: Optional[int] = None,
                    reduce_hidden_grad: bool = True):
    """Log-probabilities of the given tokens under the LM head, without the ``[tokens, V]`` logits.

    ``logp[t] = log_softmax((hidden[t] @ weight.T + bias) / temperature)[index[t]]``, computed one ``[chunk, V]``
    fp32 slab at a time; differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (the backward recomputes each
    slab: 4 GEMMs). For losses written in torch on the log-probs; :func:`linear_policy_loss` is the 3-GEMM path.
    Every row works relative to its maximum logit: the log-probs are those of the float64 ``log_softmax`` of the
    same fp32 logits to ~1e-6, whatever the logits' offset.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, float32/bfloat16/float16/float64 (the weight's dtype).
        weight: ``[V, H]`` (``lm_head.weight``); bias: ``[V]`` or None.
        index: int64 token ids with hidden's leading shape; ``ignore_index`` entries give logp 0 and no gradient.
        return_entropy: also the entropy ``H = -sum_v p_v log p_v`` of each row's distribution (differentiable,
            exact gradient; one more multiply-add per logit, only when asked).
        return_sum_pi_squared: also ``sum_v p_v^2`` per row (the collision probability; verl's optimal token
            baseline and its variance metrics read it), **detached** (no gradient); one multiply-add per logit.
        return_lse: also the logsumexp of the (tempered) logits per row (differentiable, exact gradient:
            ``softmax / T``).
        support: the sampling support to renormalize over, ``(crow_indices, col_indices)``: int64 CSR over the
            tokens (flattened, ``crow_indices`` of length ``tokens + 1``), per token the vocabulary ids the
            inference engine kept (top-k / top-p), sorted and unique, as vLLM returns them. Log-probs, entropy,
            ``sum_pi_squared``, lse and gradients are those of ``softmax`` restricted to the support (the
            temperature applied first); never an ``[N, V]`` mask. A target outside its token's support is a
            ValueError; an ignored token's row may be empty.
        chunk_size: rows per slab; None chooses from ``memory_budget`` (bytes of slab), or the default
            (:func:`fastgrad.ops.linear_log_prob.default_chunk`).
        tp_group: a ``torch.distributed`` process group over which the vocabulary is split (tensor parallelism,
            Megatron's convention): ``weight`` (and ``bias``) are this rank's rows ``[vocab_start, vocab_start +
            V_local)``; ``hidden`` and the (global) token ids are the same on every rank, and so are the outputs.
            Per token and block, two all-reduces of O(1) floats (row max; sum of exponentials, target logit,
            entropy and sum_pi_squared partials), never logits. ``weight.grad`` is this rank's shard's gradient.
        vocab_start: this rank's first global id; default ``rank * V_local`` (an equal partition). When V does not
            divide, each rank passes only its real rows and its ``vocab_start``. A ``weight`` that is a DTensor
            sharded ``Shard(0)`` on a 1-D mesh needs neither: the group and the offset come from it (and
            ``weight.grad`` is a DTensor too).
        reduce_hidden_grad: under ``tp_group``, ``hidden.grad`` is the whole vocabulary's gradient on every rank
            (one all-reduce of dX); False leaves this rank's partial sum, for frameworks whose column-parallel
            layer reduces it (Megatron's ``copy_to_tensor_model_parallel_region``).

    Returns:
        fp32 (float64 for float64 inputs) ``logp`` of index's shape (``logp <= 0``) when nothing else is asked;
        otherwise a named tuple ``LinearLogProb`` whose fields are the requested outputs in the order ``logp``,
        ``entropy``, ``sum_pi_squared``, ``lse`` (each of index's shape, 0 at ignored tokens), so
        ``logp, ent = linear_log_prob(..., return_entropy=True)`` unpacks.
    """
    weight, bias, tp_group, vocab_start = _unshard(weight, bias, tp_group, vocab_start)
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget)
    lead = tuple(hidden.shape[:-1])
    crow, col = _support_args(support)
    tp = _tp_setup(tp_group, w, vocab_start, reduce_hidden_grad, hidden)
    with _vp.vocab_parallel(tp):
        logp, lse, ent, sq, _norm = _llp.linear_log_prob(h2, w, b, index.reshape(-1, 1).contiguous(), t,
                                                        int(ignore_index), bool(return_entropy), chunk,
                                                        bool(return_sum_pi_squared), crow, col)
    values = {"logp": logp.view(lead), "entropy": ent.view(lead) if return_entropy else None,
              "sum_pi_squared": sq.view(lead) if return_sum_pi_squared else None,
              "lse": lse.view(lead) if return_lse else None}
    fields = tuple(f for f in _LOG_PROB_FIELDS if values[f] is not None)
    if fields == ("logp",):
        return values["logp"]
    return _log_prob_result(fields)(*(values[f] for f in fields))


def _per_token(t: Optional[torch.Tensor], name: str, lead: Tuple[int, ...], allow_sequence: bool,
               allow_nan: bool = False) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) == lead:
        out = t
    elif allow_sequence and len(lead) == 2 and tuple(t.shape) in ((lead[0],), (lead[0], 1)):
        out = t.reshape(lead[0], 1).expand(lead)  # one value per sequence, broadcast over its tokens
    else:
        seq = f" or [{lead[0]}] (one per sequence)" if allow_sequence and len(lead) == 2 else ""
        raise ValueError(f"{name} must have shape {lead} (index's){seq}, got {tuple(t.shape)}")
    if allow_nan:  # an inference engine's missing log-prob (NaN) means "no correction"; +inf is never a log-prob
        if bool((out == math.inf).any()):
            raise ValueError(f"{name} must not contain +inf (log-probabilities are <= 0)")
    else:
        _checks.finite(out, name)
    return out.detach().reshape(-1).contiguous()


ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_SEQUENCE_LOSSES = ("ppo_clip", "cispo", "sapo")  # the losses whose ratio may be the sequence's (the shift below)


def _check_float(name: str, v, lo: Optional[float] = None, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite float, got {v!r}")
    if lo is not None and (v <= lo if strict else v < lo):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {lo}, got {v!r}")
    return float(v)


def vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                  rollout_weight: Optional[torch.Tensor] = None, k_pos: float = 2.0, lambda_pos: float = 3.0,
                  k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's sequence weight ``phi(w) = w^k exp(lambda (1 - w))`` (Shen et al. 2026, "VESPO: Variational
    Sequence-Level Soft Policy Optimization for Stable Off-Policy LLM Training", arXiv:2602.10693; TRL 1.16's
    ``get_gamma_weights``), a constant: ``w`` the product of the sequence's token ratios ``exp(logp - old)`` (each
    log-ratio clamped to [-20, 20]) times its token rollout weights (log clamped to [log 1e-8, 20]), ``log w`` clamped
    to [log 1e-8, 20]; ``(k, lambda) = (k_pos, lambda_pos)`` where ``A >= 0``, else the negative pair; NaN/inf -> 0.

    Args: ``log_ratio`` (``logp - old_logp``), ``mask``: ``[B, T]``; ``advantages``: ``[B]``, ``[B, 1]`` or
    ``[B, T]`` (its sign picks the pair); ``rollout_weight``: ``[B, T]``, the already corrected weights (e.g.
    :func:`fastgrad.ops.linear_policy_loss.rollout_weight`), 1 at masked tokens. ``lambda`` is clamped to >= 1e-4.

    Returns ``phi`` ``[B, 1]`` (``[B, T]`` for per-token advantages): a detached reweighting of REINFORCE, ``phi(1) =
    1``, biased by design (it trades bias for variance off-policy, as the paper's kernel does); O(B T), no GEMM."""
    if log_ratio.dim() != 2 or tuple(mask.shape) != tuple(log_ratio.shape):
        raise ValueError(f"log_ratio and mask must be [B, T], got {tuple(log_ratio.shape)} and {tuple(mask.shape)}")
    B = log_ratio.shape[0]
    if advantages.dim() == 1 and advantages.numel() == B:  # one per sequence
        advantages = advantages.reshape(B, 1)
    if tuple(advantages.shape) not in ((B, 1), tuple(log_ratio.shape)):
        raise ValueError(f"advantages must be [B], [B, 1] or [B, T], got {tuple(advantages.shape)}")
    if rollout_weight is not None and tuple(rollout_weight.shape) != tuple(log_ratio.shape):
        raise ValueError(f"rollout_weight must be [B, T], got {tuple(rollout_weight.shape)}")
    lo = math.log(1e-8)
    with torch.no_grad():
        m = mask.to(log_ratio.dtype)
        s = (log_ratio.clamp(-20, 20) * m).sum(-1, keepdim=True)
        if rollout_weight is not None:
            s = s + (torch.log(rollout_weight).clamp(lo, 20) * m).sum(-1, keepdim=True)
        log_w = s.clamp(lo, 20)
        nonneg = advantages >= 0
        k = torch.where(nonneg, torch.full_like(advantages, k_pos), torch.full_like(advantages, k_neg))
        lam = torch.where(nonneg, torch.full_like(advantages, lambda_pos),
                          torch.full_like(advantages, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, advantages: torch.Tensor, *,
                       mask: Optional[torch.Tensor] = None, old_logp: Optional[torch.Tensor] = None,
                       ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0, kl: str = "k3",
                       loss: str = "reinforce", importance_sampling_level: str = "token", eps_low: float = 0.2,
                       eps_high: float = 0.2, clip_ratio_c: Optional[float] = None, sapo_tau_pos: float = 1.0,
                       sapo_tau_neg: float = 1.05, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                       vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                       rollout_logp: Optional[torch.Tensor] = None, rollout_correction: Optional[str] = None,
                       rollout_cap: Optional[float] = None, rollout_cap_min: Optional[float] = None,
                       entropy_coef: float = 0.0, normalize: str = "token", num_items: Optional[float] = None,
                       max_length: Optional[int] = None, bias: Optional[torch.Tensor] = None,
                       temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                       return_sum_pi_squared: bool = False, return_lse: bool = False,
                       support: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                       ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                       ref_bias: Optional[torch.Tensor] = None,
                       chunk_size: Optional[int] = None, memory_budget: Optional[int] = None, tp_group=None,
                       vocab_start: Optional[int] = None, reduce_hidden_grad: bool = True):
    """Policy-gradient loss of sampled tokens through the LM head: the loss and its gradients in one pass over
    ``[chunk, V]`` slabs (3 GEMMs: logits, dX, dW); the logits never exist.

    ``loss = sum_t w_t l_t`` with the per-token loss ``l_t`` of :func:`fastgrad.ops.linear_policy_loss.token_loss`:

    * ``"reinforce"``: ``-A logp``.
    * ``"ppo_clip"``: PPO/GRPO's clipped ratio, ``eps_low``/``eps_high`` as in DAPO; ``clip_ratio_c``: dual clip.
    * ``"cispo"``: MiniMax-M1's clipped, detached importance weight times ``-A logp``, ``clip(r, 1 - eps_low,
      1 + eps_high)`` (verl's form; TRL's ``min(r, epsilon_high)`` is ``eps_low=1, eps_high=epsilon_high - 1``).
    * ``"sapo"``: SAPO's soft gate ``-sigmoid(tau (r - 1)) 4 / tau A`` (Gao et al. 2025, arXiv:2511.20347),
      ``tau = sapo_tau_pos`` for ``A > 0``, else ``sapo_tau_neg`` (TRL's and verl's defaults 1.0 and 1.05).
    * ``"vespo"``: ``-phi_b A logp`` with VESPO's detached sequence weight ``phi_b`` (:func:`vespo_weights`, Shen
      et al. 2026, arXiv:2602.10693; ``vespo_k_pos`` ... ``vespo_lambda_neg`` as TRL's); the rollout weights enter
      ``phi`` (token modes only), not the loss. Needs ``[B, T]`` inputs; TRL normalizes it per token.
    * ``"gspo"``: ``"ppo_clip"`` with ``importance_sampling_level="sequence"`` (Zheng et al. 2025, "Group Sequence
      Policy Optimization", the GSPO-token form).

    ``importance_sampling_level="sequence"`` (``ppo_clip``, ``cispo``, ``sapo``; TRL's option): the ratio of every
    token is its sequence's ``s_b = exp(mean_t (logp - old_logp))`` over the loss tokens, with the gradient of the
    sequence-level objective (exact when the token weights are uniform within a sequence, as every ``normalize``
    mode makes them); with ``old_logp`` one more GEMM (the ratios need every log-prob before the first gradient).
    Needs ``[B, T]``. VESPO with ``old_logp`` or ``rollout_logp``, and a ``sequence_*`` correction without
    ``old_logp``, cost that pass too.

    Rollout correction (the inference engine's log-probs ``rollout_logp`` differ from the trainer's; TRL 1.16's
    ``vllm_importance_sampling_mode``, verl's rollout correction): the ratio ``rho = exp(old_logp - rollout_logp)``
    (the current detached log-prob when ``old_logp`` is None; a NaN rollout log-prob means ratio 1), per token, or
    for ``"sequence_*"`` the product over the sequence's loss tokens. ``"*_truncate"``: weight ``clamp(rho,
    rollout_cap_min, rollout_cap)`` (truncated importance sampling, Yao et al. 2025, "Your Efficient RL Framework
    Secretly Brings You Off-Policy RL Training"); ``"*_mask"``: ``rho`` where ``rollout_cap_min <= rho <=
    rollout_cap``, else 0 (masked importance sampling, Liu et al. 2025, "When Speed Kills Stability"; verl's IcePop
    band, Ling Team 2025, arXiv:2510.18855): a ratio equal to a bound is kept, a masked token keeps its place in the
    normalizer. The weight multiplies the policy term only, not the KL or the entropy bonus. TRL's default is
    ``"sequence_mask"`` with ``rollout_cap=3``; verl's token TIS is ``"token_truncate"``, ``rollout_cap=2``.

    Plus ``beta`` times the ``kl`` estimator to ``ref_logp`` (``"k1"``, ``"k2"``, ``"k3"``: TRL's, unclamped;
    ``"low_var_kl"``: verl's clamped k3; ``"k3+"``: verl's k3 value with k2's gradient; ``"k3_is"``: k3 times the
    token's importance ratio ``exp(logp - old_logp)``, differentiable, TRL's default ``use_bias_correction_kl``,
    DeepSeek-V3.2's unbiased KL gradient; token-level ratios only), or with ``kl="full"`` the
    exact ``KL(pi || pi_ref)`` over the whole vocabulary from ``ref_hidden``/``ref_weight`` (the reference model's
    last hidden states and LM head, at the policy's temperature: one more GEMM and ``[chunk, V]`` slab per block,
    exact gradient ``pi (log pi - log pi_ref - KL) / T`` for the policy's logits, none for the reference), and
    ``-entropy_coef`` times the entropy, and token weights ``w_t = mask_t / Z``:

    * ``normalize="token"`` (DAPO, BNPO): ``Z = num_items`` (global number of loss tokens; default the local
      ``mask.sum()``);
    * ``"sequence"`` (GRPO): ``Z = len_b * num_items`` (each sequence's mean, then the mean over ``num_items``
      sequences; default B); needs ``[B, T]`` inputs;
    * ``"constant"`` (Dr. GRPO): ``Z = num_items`` if given, else ``B * max_length`` (default T).

    RLOO is ``"reinforce"`` with leave-one-out advantages (:func:`batch_average_baseline` on the rewards); GRPO's
    group baseline is ``(r - mean) / std`` on ``[B]``, outside. No collective runs inside: under DDP/FSDP pass the
    global ``num_items`` and the per-rank sum of losses is the global loss's share.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, fp32, bf16, fp16 or fp64.
        weight: the LM head's ``[V, H]``, hidden's dtype (``bias``: optional ``[V]``).
        index: the sampled tokens, int64, hidden's leading shape.
        advantages: per token (index's shape) or per sequence ``[B]``.
        loss / importance_sampling_level / sapo_tau_pos, sapo_tau_neg / vespo_k_pos ... vespo_lambda_neg: as above.
        rollout_correction: ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"``, ``"sequence_mask"``
            (or None); a sequence-level ratio with a gradient (``"gspo"``, ``"sapo"`` at sequence level) takes
            sequence corrections only, ``"vespo"`` token ones only.
        mask: loss mask (index's shape), default ``index != ignore_index``; masked tokens cost nothing (compacted
            out before the GEMMs).
        old_logp: fp32 per-token log-probs of the behaviour policy (``None``: on-policy, ratio 1).
        ref_logp: fp32 per-token log-probs of the reference policy; ``beta > 0`` requires it.
        clip_ratio_c: dual-clip PPO's bound ``c > 1`` (Ye et al. 2020; verl's ``clip_ratio_c``, typically 3): with
            ``"ppo_clip"`` or ``"gspo"``, tokens with ``A < 0`` lose at most ``-c A``. None: off.
        rollout_logp: per-token log-probs of the inference engine that sampled (index's shape); needs
            ``rollout_correction``.
        rollout_cap / rollout_cap_min: the ratio's upper (> 0) / lower (>= 0) bound, inclusive (None: none; a
            truncate mode needs one; a mask mode without bounds weights by the plain ratio).
        return_sum_pi_squared / return_lse: add ``stats["sum_pi_squared"]`` (``sum_v pi_v^2`` per token, what verl's
            optimal token baseline reads) and ``stats["lse"]`` (the tempered logits' logsumexp), detached, computed
            in the same pass.
        ref_hidden / ref_weight / ref_bias: for ``kl="full"``: the reference model's last hidden states (hidden's
            leading shape, its own width ``H_ref``) and LM head ``[V, H_ref]`` (``ref_bias`` ``[V]``); detached.
        support: the inference engine's sampling support per token, renormalized over as in
            :func:`linear_log_prob` (top-k / top-p replay: the importance ratio is biased unless the trainer's
            log-softmax is restricted to the support the tokens were drawn from); a loss token's target outside its
            support is a ValueError.
        tp_group / vocab_start / reduce_hidden_grad: a vocabulary split over a tensor-parallel group, as in
            :func:`linear_log_prob`: every option works; the loss and stats are the same on every rank. ``support``
            holds global ids; with ``kl="full"``, ``ref_weight`` (and ``ref_bias``) are this rank's rows of the
            reference head (a plain tensor; one more all-reduce of the per-token KL's partial sums).

    Returns:
        ``(loss, stats)``: the fp32 scalar loss (differentiable w.r.t. hidden, weight, bias; its backward scales the
        gradients computed in the forward) and detached stats: ``logp`` (index's shape, 0 at masked tokens),
        ``entropy`` (when computed: ``entropy_coef != 0`` or ``return_entropy``; else None), ``kl_mean``,
        ``clip_frac``, ``ratio_mean``, ``rollout_weight_mean`` (means over the loss tokens; the weight is 1 without
        a correction), ``sum_pi_squared`` / ``lse`` when asked, ``vespo_phi_mean`` for ``"vespo"``.
    """
    weight, bias, tp_group, vocab_start = _unshard(weight, bias, tp_group, vocab_start)
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, index, bias, temperature, chunk_size, memory_budget)
    lead = tuple(index.shape)
    if normalize not in ("token", "sequence", "constant"):
        raise ValueError(f"normalize must be 'token', 'sequence' or 'constant', got {normalize!r}")
    if normalize == "sequence" and len(lead) != 2:
        raise ValueError(f"normalize='sequence' needs [B, T] inputs (hidden [B, T, H]), got index {lead}")
    beta = _check_float("beta", beta, 0.0)
    eps_low = _check_float("eps_low", eps_low, 0.0)
    eps_high = _check_float("eps_high", eps_high, 0.0)
    entropy_coef = _check_float("entropy_coef", entropy_coef)
    sapo_tau_pos = _check_float("sapo_tau_pos", sapo_tau_pos, 0.0, strict=True)
    sapo_tau_neg = _check_float("sapo_tau_neg", sapo_tau_neg, 0.0, strict=True)
    vespo = tuple(_check_float(n, v, 0.0) for n, v in (("vespo_k_pos", vespo_k_pos),
                                                        ("vespo_lambda_pos", vespo_lambda_pos),
                                                        ("vespo_k_neg", vespo_k_neg),
                                                        ("vespo_lambda_neg", vespo_lambda_neg)))
    full_kl = kl == "full"
    if full_kl:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("kl='full' needs ref_hidden and ref_weight (the reference model's last hidden states "
                             "and LM head)")
        if not isinstance(ref_hidden, torch.Tensor) or tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                             f"{tuple(getattr(ref_hidden, 'shape', ()))}")
        if ref_logp is not None:
            raise ValueError("kl='full' computes the KL from ref_hidden/ref_weight: pass no ref_logp")
        _checks.finite(ref_hidden, "ref_hidden")
        _checks.finite(ref_weight, "ref_weight")
        if chunk_size is None:  # two more [chunk, V] buffers (the reference's logits, log pi): a third of the slab
            chunk = max(1, _lm_head.default_chunk(h2.shape[0], w.shape[0], h2.device, memory_budget) // 3)
    elif ref_hidden is not None or ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_hidden, ref_weight and ref_bias are for kl='full'")
    if beta > 0 and ref_logp is None and not full_kl:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's per-token log-probs)")
    names = tuple(_plp.LOSSES) + ("vespo", "gspo")
    if loss not in names:
        raise ValueError(f"loss must be one of {names}, got {loss!r}")
    if kl not in _plp.KLS and kl != "full":
        raise ValueError(f"kl must be one of {tuple(_plp.KLS) + ('full',)}, got {kl!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    op_loss = "ppo_clip" if loss == "gspo" else ("reinforce" if loss == "vespo" else loss)
    seq_ratio = loss == "gspo" or importance_sampling_level == "sequence"
    if seq_ratio and op_loss not in _SEQUENCE_LOSSES:
        raise ValueError(f"importance_sampling_level='sequence' applies to {_SEQUENCE_LOSSES} (and 'gspo'), not "
                         f"{loss!r}")
    if seq_ratio and kl == "k3_is" and beta != 0:
        raise ValueError("kl='k3_is' weights each token's k3 by its own importance ratio; with a sequence-level "
                         "ratio (importance_sampling_level='sequence' or 'gspo') use another kl")
    if (seq_ratio or loss == "vespo") and len(lead) != 2:
        what = f"loss={loss!r}" if loss in ("gspo", "vespo") else "importance_sampling_level='sequence'"
        raise ValueError(f"{what} needs [B, T] inputs (its ratio is per sequence), got index {lead}")
    if clip_ratio_c is not None:
        if isinstance(clip_ratio_c, bool) or not isinstance(clip_ratio_c, (int, float)) \
                or not math.isfinite(clip_ratio_c) or not clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be a finite float > 1 (dual-clip PPO's bound), got {clip_ratio_c!r}")
        if op_loss != "ppo_clip":
            raise ValueError(f"clip_ratio_c applies to loss='ppo_clip' or 'gspo', not {loss!r}")
    # -- rollout correction: checked whole before anything runs
    if (rollout_logp is None) != (rollout_correction is None):
        raise ValueError("rollout_logp and rollout_correction go together: pass both or neither")
    if rollout_correction is not None:
        if rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"rollout_correction must be one of {ROLLOUT_CORRECTIONS}, got {rollout_correction!r}")
        cap = None if rollout_cap is None else _check_float("rollout_cap", rollout_cap, 0.0, strict=True)
        cap_min = None if rollout_cap_min is None else _check_float("rollout_cap_min", rollout_cap_min, 0.0)
        if cap is not None and cap_min is not None and cap_min > cap:
            raise ValueError(f"rollout_cap_min must be <= rollout_cap, got {cap_min} > {cap}")
        if rollout_correction.endswith("truncate") and cap is None and cap_min is None:
            raise ValueError(f"rollout_correction={rollout_correction!r} needs rollout_cap or rollout_cap_min")
        seq_mode = rollout_correction.startswith("sequence")
        if seq_mode and len(lead) != 2:
            raise ValueError(f"rollout_correction={rollout_correction!r} needs [B, T] inputs, got index {lead}")
        if op_loss in ("ppo_clip", "sapo") and seq_ratio and not seq_mode:
            # TRL weights the sequence objective's gradient by the sequence's mean token weight, verl (GSPO-token)
            # each token's gradient by its own: they agree only when the weights are uniform in the sequence
            raise ValueError(f"loss={loss!r} with a sequence-level ratio and a token-level rollout correction is "
                             "ambiguous (TRL and verl differ on its gradient): use a 'sequence_*' correction")
        if loss == "vespo" and seq_mode:
            raise ValueError("loss='vespo' takes token-level rollout corrections only (they enter its sequence "
                             "weight, as in TRL)")
    elif rollout_cap is not None or rollout_cap_min is not None:
        raise ValueError("rollout_cap and rollout_cap_min need rollout_logp and rollout_correction")
    adv = _per_token(advantages, "advantages", lead, allow_sequence=True)
    if adv is None:
        raise TypeError("advantages must be a floating torch.Tensor, got None")
    old = _per_token(old_logp, "old_logp", lead, False)
    ref = _per_token(ref_logp, "ref_logp", lead, False)
    roll = _per_token(rollout_logp, "rollout_logp", lead, False, allow_nan=True)
    if mask is None:
        m = (index != ignore_index)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead:
            raise ValueError(f"mask must be a tensor of shape {lead} (index's), got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        m = mask.detach().bool() & (index != ignore_index)
    acc = _checks.acc_dtype(h2.dtype)
    mf = m.to(acc)
    if num_items is not None and (isinstance(num_items, bool) or not isinstance(num_items, numbers.Real)
                                  or not num_items > 0):
        raise ValueError(f"num_items must be a positive number, got {num_items!r}")
    if normalize == "token":
        tw = mf / (float(num_items) if num_items is not None else mf.sum().clamp(min=1))
    elif normalize == "sequence":
        lengths = mf.sum(1, keepdim=True).clamp(min=1)
        tw = mf / (lengths * (float(num_items) if num_items is not None else lead[0]))
    else:
        if num_items is not None:
            z = float(num_items)
        else:
            if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                           or max_length < 1):
                raise ValueError(f"max_length must be a positive int, got {max_length!r}")
            z = (lead[0] if len(lead) == 2 else 1) * (max_length or lead[-1])
        tw = mf / z

    tp = _tp_setup(tp_group, w, vocab_start, reduce_hidden_grad, hidden)
    with _vp.vocab_parallel(tp):
        return _policy_loss_call(h2, w, b, t, chunk, index, lead, m, mf, tw, adv, old, ref, roll, loss, op_loss,
                                 seq_ratio, ignore_index, support, rollout_correction,
                                 cap if roll is not None else None, cap_min if roll is not None else None, vespo,
                                 eps_low, eps_high, beta, kl, entropy_coef, return_entropy, clip_ratio_c,
                                 return_sum_pi_squared, return_lse, sapo_tau_pos, sapo_tau_neg, full_kl, ref_hidden,
                                 ref_weight, ref_bias, hidden, weight, bias)


def _policy_loss_call(h2, w, b, t, chunk, index, lead, m, mf, tw, adv, old, ref, roll, loss, op_loss, seq_ratio,
                      ignore_index, support, rollout_correction, cap, cap_min, vespo, eps_low, eps_high, beta, kl,
                      entropy_coef, return_entropy, clip_ratio_c, return_sum_pi_squared, return_lse, sapo_tau_pos,
                      sapo_tau_neg, full_kl, ref_hidden, ref_weight, ref_bias, hidden, weight, bias):
    """:func:`linear_policy_loss` after validation: the prepass (when needed), the op, the stats."""
    acc = mf.dtype
    seq_mode = rollout_correction is not None and rollout_correction.startswith("sequence")
    # -- what needs every log-prob before the fused pass (one more GEMM, no gradient): sequence ratios, sequence
    # rollout weights, and VESPO's weight off-policy or with a rollout correction
    mode = cap_arg = cap_min_arg = None
    vespo_phi = vespo_rw = None
    # (a sequence ratio on-policy is 1 with the token-level gradient: uniform token weights in a sequence make the
    # two equal, so it needs no pass; a sequence correction with old_logp needs none either)
    need_lp0 = ((seq_ratio and old is not None) or (roll is not None and seq_mode and old is None)
                or (loss == "vespo" and (old is not None or roll is not None)))
    if need_lp0:
        with torch.no_grad():
            live = torch.where(m, index, int(ignore_index)).reshape(-1, 1).contiguous()  # loss tokens only
            lp0 = _llp.linear_log_prob(h2, w, b, live, t, int(ignore_index), False, chunk, False,
                                       *_support_args(support))[0].view(-1)
        base = lp0 if old is None else old  # the rollout ratio's numerator: old_logp, else the current log-prob
        op_old = old if old is not None else lp0  # a constant equal to sg(logp): ratio 1 with its gradient
        if seq_ratio:
            # the sequence's ratio on every token: old'_t = logp_t - log s_b, so exp(logp_t - old'_t) = s_b with
            # the gradient s_b grad logp_t (GSPO-token's form)
            dl = (lp0 - op_old).view(lead) * mf
            log_s = dl.sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp(min=1)
            op_old = torch.where(m, lp0.view(lead) - log_s, 0).reshape(-1).contiguous()
    else:
        base = op_old = old
    if roll is not None:
        cap_arg = float(cap or 0.0)
        cap_min_arg = float(cap_min or 0.0)
        mode = "token_" + rollout_correction.split("_")[1]
        if seq_mode:
            d = (base - roll).view(lead) * mf
            d = torch.where(torch.isnan(d), 0, d)  # a missing rollout log-prob (NaN), or -inf at a masked token
            s_b = d.sum(1, keepdim=True)  # log of the product of the token ratios
            roll = (op_old.view(lead) - s_b).reshape(-1).contiguous()  # the op's token ratio is the sequence's
        elif op_old is not None and base is not None and op_old is not base:
            roll = roll + (op_old - base)  # the op's numerator moved (a sequence ratio): move the denominator too
    if loss == "vespo":
        log_ratio = (lp0 - op_old).view(lead) if old is not None else torch.zeros(lead, dtype=acc, device=mf.device)
        rw = None
        if roll is not None:
            rw = _plp.rollout_weight(base if base is not None else lp0, roll, mode, cap_arg, cap_min_arg).view(lead)
            rw = torch.where(m, rw, 1)
        vespo_phi = vespo_weights(log_ratio, m, adv.view(lead), rw, *vespo).expand(lead).reshape(-1)
        adv = (adv * vespo_phi).contiguous()
        roll = mode = None  # folded into phi
        op_old = old  # REINFORCE ignores it
        vespo_rw = rw
    needs = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    total, logp, ent, st, *_ = _plp.linear_policy_loss(
        h2, w, b, index.reshape(-1).contiguous(), adv, tw.reshape(-1).contiguous(), op_old, ref, t, int(ignore_index),
        op_loss, eps_low, eps_high, beta, kl, entropy_coef, bool(return_entropy), chunk, needs,
        float(clip_ratio_c or 0.0), bool(return_sum_pi_squared), bool(return_lse), sapo_tau_pos, sapo_tau_neg, roll,
        mode or "none", float(cap_arg or 0.0), float(cap_min_arg or 0.0), *_support_args(support),
        *((ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]).contiguous(), ref_weight.detach().contiguous(),
           None if ref_bias is None else ref_bias.detach().contiguous()) if full_kl else (None, None, None)))
    mflat = mf.detach().reshape(-1)  # the stats are reports: no graph (float() on them must not warn)
    count = mflat.sum().clamp(min=1)
    st = st.detach()
    stats = {
        "logp": logp.detach().view(lead),
        "entropy": ent.detach().view(lead) if ent.numel() or (return_entropy or entropy_coef != 0) else None,
        "kl_mean": (st[0] * mflat).sum() / count,
        "clip_frac": (st[1] * mflat).sum() / count,
        "ratio_mean": (st[2] * mflat).sum() / count,
        "rollout_weight_mean": (st[3] * mflat).sum() / count,
    }
    if return_sum_pi_squared:
        stats["sum_pi_squared"] = (st[4] * mflat).view(lead)
    if return_lse:
        stats["lse"] = (st[-1] * mflat).view(lead)
    if vespo_phi is not None:
        stats["vespo_phi_mean"] = (vespo_phi * mflat).sum() / count
        if vespo_rw is not None:  # the correction went into phi: report its weights all the same
            stats["rollout_weight_mean"] = (vespo_rw.reshape(-1) * mflat).sum() / count
    return total, stats


def linear_score_function_surrogate(hidden: torch.Tensor, weight: torch.Tensor, samples: torch.Tensor,
                                    cost: torch.Tensor, baseline: Baseline = None, *,
                                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                                    chunk_size: Optional[int] = None, tp_group=None,
                                    vocab_start: Optional[int] = None,
                                    reduce_hidden_grad: bool = True) -> torch.Tensor:
    """:func:`score_function_surrogate` with the LM head fused in: ``(cost - baseline) * log p(samples)`` ``[n, R]``
    for ``logits = hidden @ weight.T (+ bias)``, without the ``[R, V]`` logits.

    Args:
        hidden: ``[R, H]``.
        weight: ``[V, H]``.
        samples: int64 ``[n, R]``.
        cost: ``[n, R]`` (or broadcastable), a constant.
        baseline: as in :func:`score_function_surrogate` (``"batch_average"``: leave-one-out, n >= 2).

    The gradient w.r.t. the logits is ``sum_s a_s onehot(y_s) - (sum_s a_s) softmax`` per row (one slab pass for
    all n samples); the backward recomputes each slab (4 GEMMs). ``tp_group``, ``vocab_start``,
    ``reduce_hidden_grad``: a vocabulary-parallel head, as in :func:`linear_log_prob`.
    """
    if not isinstance(samples, torch.Tensor) or samples.dtype != torch.int64 or samples.dim() != 2:
        raise TypeError(f"samples must be an int64 [n, R] tensor, got "
                        f"{getattr(samples, 'dtype', type(samples).__name__)} {tuple(getattr(samples, 'shape', ()))}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be [R, H], got {tuple(getattr(hidden, 'shape', ()))}")
    weight, bias, tp_group, vocab_start = _unshard(weight, bias, tp_group, vocab_start)
    h2, w, b, t, chunk = _lm_inputs(hidden, weight, samples, bias, temperature, chunk_size, None, index_extra=1)
    cost = check_real(cost, "cost")
    acc = _checks.acc_dtype(h2.dtype)
    a = subtract_baseline(expand_to(cost.to(acc), tuple(samples.shape), "cost", "the samples' shape"), baseline)
    tp = _tp_setup(tp_group, w, vocab_start, reduce_hidden_grad, hidden)
    with _vp.vocab_parallel(tp):
        logp = _llp.linear_log_prob(h2, w, b, samples.t().contiguous(), t, -100, False, chunk)[0]
    return a * logp.t()
