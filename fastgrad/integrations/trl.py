"""TRL: :class:`GRPOTrainer`, TRL's GRPO trainer with its loss on fastgrad's fused LM head.

A subclass of ``trl.GRPOTrainer`` (TRL 1.16; same constructor, same ``GRPOConfig``): swap the import and the loss step
runs through :func:`fastgrad.functional.linear_policy_loss` from the model's last hidden state and its LM head (3
GEMMs, one fp32 ``[chunk, V]`` slab, the logits never stored), in place of TRL's chunked head
(``add_fused_lm_head``). The log-probs TRL computes outside the loss (old and reference policies) run through
:func:`fastgrad.functional.linear_log_prob`. Generation, rewards, advantages, logging and everything else are TRL's.

Which path a loss step takes (``trainer.fastgrad_path`` records the last one):

* ``"fused"``: every ``loss_type`` (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo), both
  ``importance_sampling_level`` values, ``epsilon``/``epsilon_high``, ``delta`` (when ``delta >= 1 +
  epsilon_high``, as TRL recommends), ``beta`` (k3 to the reference, times the token ratio with TRL's default
  ``use_bias_correction_kl``: fastgrad's ``kl="k3_is"``), a static ``entropy_coef`` under the token and
  constant normalizations, vLLM importance sampling (every ``vllm_importance_sampling_mode``, the ratio TRL computes
  weighting the policy term), ``mask_truncated_completions``, tool masks, ``cast_lm_head_to_fp32``, logit scales;
  TRL's metrics (entropy, kl, clip ratios, cispo/vespo metrics, policy_loss, entropy_coef) are logged from the
  fused pass's statistics.
* ``"log_prob"``: options whose loss needs every log-prob before it (``top_entropy_quantile < 1``,
  ``off_policy_mask_threshold``, ``use_bias_correction_kl`` at sequence level, ``use_adaptive_entropy``, an entropy bonus under
  grpo's/sapo's per-sequence normalization, ``delta < 1 + epsilon_high``, cispo with ``epsilon_high < 1``, vespo
  with vLLM importance sampling, a token-level vLLM mode under sequence-level ratios): fastgrad's log-probs and entropies (differentiable, 4 GEMMs) under TRL's own loss
  arithmetic. Same results, one GEMM more.
* ``"trl"``: what fastgrad's head cannot compute (``final_logit_softcapping``, a non-positive logit scale,
  multimodal inputs, MoE auxiliary losses): TRL's own head and loss, unchanged.

So no option is refused: each runs as TRL defines it, on the fastest path that can express it.
"""
import logging
import math
import types
from contextlib import nullcontext
from typing import Optional

import torch
import trl
from trl.trainer.utils import nanmax, nanmin

from ..functional.lm_head import linear_log_prob, linear_policy_loss, vespo_weights

__all__ = ["GRPOTrainer"]

logger = logging.getLogger(__name__)

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_PPO = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _head_scale(model) -> Optional[float]:
    """The factor the model multiplies its logits by before the softmax (read from the config attributes the
    architectures use), or None when fastgrad's head cannot reproduce the model's logits (soft-capping, a
    non-positive factor)."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return None
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(cfg, name, None) is not None:
            scale = float(getattr(cfg, name))
            break
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:  # a divisor, except HyperCLOVA X's
        s = float(cfg.logits_scaling)
        scale = s if cfg.model_type == "hyperclovax" else 1.0 / s
    scale = 1.0 if scale is None else scale
    return scale if scale > 0 and math.isfinite(scale) else None


def _patch_forward(model) -> None:
    """Give ``model.forward`` a ``fastgrad_head=`` keyword: run the backbone, then ``fastgrad_head(hidden[:, :-1],
    weight, bias)`` on the next-token hidden states and the LM head, inside the forward (so DDP and FSDP see the
    head's parameters used there), and return what it returns. Without the keyword, the forward is unchanged."""
    if getattr(model, "_fastgrad_head_patched", False):
        return
    inner = model.forward

    def forward(self, *args, fastgrad_head=None, **kwargs):
        if fastgrad_head is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if type(weight).__name__ == "DTensor":  # FSDP2's sharded head, outside its own forward: gather it
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        return fastgrad_head(hidden.to(weight.device), weight, bias)

    model.forward = types.MethodType(forward, model)
    model._fastgrad_head_patched = True


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` with its loss on :func:`fastgrad.functional.linear_policy_loss` (module docstring: what
    runs where). Same constructor and ``GRPOConfig`` as ``trl.GRPOTrainer``; exact, not an estimator of TRL's loss:
    the losses, gradients and logged metrics are TRL's (tested to 1e-5 in fp32). Cost: 3 GEMMs of the completion
    tokens' hidden states with the LM head for the loss step (4 on the ``"log_prob"`` path), one ``[chunk, V]``
    fp32 slab of memory, the ``[tokens, V]`` logits never stored; TRL's shipped head takes up to 32768 rows of
    logits per chunk.

    The mapping of each TRL option to fastgrad's arguments is in the docs ("TRL") and in
    :meth:`_fastgrad_loss_kwargs`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fastgrad_path = None
        models = [self.model] + ([self.ref_model] if getattr(self, "ref_model", None) is not None else [])
        self._fastgrad_scale = {}
        for m in models:
            target = m.get_base_model() if hasattr(m, "get_base_model") else m
            scale = _head_scale(target)
            self._fastgrad_scale[id(target)] = scale
            if scale is not None:
                _patch_forward(target)
        self._fastgrad_head_ok = all(s is not None for s in self._fastgrad_scale.values())

    # -- log-probs outside the loss (old and reference policies; the "log_prob" path's loss) ----------------------
    def _fastgrad_temperature(self, model) -> float:
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        target = getattr(target, "module", target)  # DDP / accelerate wrappers
        scale = self._fastgrad_scale.get(id(target))
        if scale is None:  # a model seen through another wrapper: the policy's (the reference shares its config)
            scale = next(iter(self._fastgrad_scale.values()))
        return self.temperature / scale

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        if compute_aux_loss or not self._fastgrad_head_ok or any(v is not None for v in extra.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        K = logits_to_keep
        t = self._fastgrad_temperature(model)
        batch_size = batch_size or input_ids.size(0)
        logps, ents = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            index = ids[:, -K:].masked_fill(am[:, -K:] == 0, -100)

            def head(hidden, weight, bias, index=index):
                h, ctx = self._head_input(hidden[:, -K:])
                with ctx:
                    return linear_log_prob(h, weight.to(h.dtype), index, bias=None if bias is None else
                                           bias.to(h.dtype), temperature=t, return_entropy=True)

            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=am, fastgrad_head=head)
            logps.append(out.logp)
            ents.append(out.entropy)
        return torch.cat(logps), (torch.cat(ents) if compute_entropy else None), None

    def _head_input(self, h):
        if self.args.cast_lm_head_to_fp32:  # TRL's option: the head's projection in fp32, outside autocast
            return h.float(), torch.autocast(h.device.type, enabled=False)
        return h, nullcontext()

    # -- the loss step -------------------------------------------------------------------------------------------
    def _fastgrad_fallback(self, inputs) -> Optional[str]:
        """Why this loss step cannot run fused: ``"trl"`` or ``"log_prob"`` (the path to take), or None."""
        if (self.aux_loss_enabled or not self._fastgrad_head_ok
                or any(inputs.get(k) is not None for k in _MULTIMODAL)):
            return "trl"
        a = self.args
        token_norm = self.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo")
        vllm_is = self.use_vllm and self.vllm_importance_sampling_correction
        if (self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None
                or (self.beta != 0.0 and a.use_bias_correction_kl and self.importance_sampling_level == "sequence")
                or self.use_adaptive_entropy
                or (self._entropy_bonus_enabled and not token_norm)
                or (self.loss_type in _PPO and a.delta is not None
                    and not (a.delta >= 1 + self.epsilon_high and a.delta > 1))
                # a per-token vLLM ratio under a sequence-level ratio: TRL's gradient averages the token ratios over
                # the sequence, which a per-token advantage weight cannot express
                or (vllm_is and self.importance_sampling_level == "sequence" and self.loss_type != "vespo"
                    and inputs.get("importance_sampling_ratio") is not None
                    and inputs["importance_sampling_ratio"].shape[-1] > 1)
                or (self.loss_type == "cispo" and self.epsilon_high < 1)
                or (self.loss_type == "vespo" and vllm_is)):
            return "log_prob"
        return None

    def _fastgrad_loss_kwargs(self, inputs, mode: str, batch_size: int, n_tokens: float) -> dict:
        """The arguments of :func:`fastgrad.functional.linear_policy_loss` that reproduce this trainer's
        ``loss_type``, ``importance_sampling_level``, clipping and normalization for one micro-batch of
        ``batch_size`` sequences with ``n_tokens`` loss tokens (``mode``: ``"train"`` or ``"eval"``)."""
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        lt = self.loss_type
        kw = {"importance_sampling_level": self.importance_sampling_level}
        if lt in _PPO:
            kw.update(loss="ppo_clip", eps_low=self.epsilon_low, eps_high=self.epsilon_high,
                      clip_ratio_c=self.args.delta)
        elif lt == "cispo":  # TRL's weight is min(r, epsilon_high): fastgrad's clip(r, 0, 1 + (epsilon_high - 1))
            kw.update(loss="cispo", eps_low=1.0, eps_high=self.epsilon_high - 1.0)
        elif lt == "sapo":
            kw.update(loss="sapo", sapo_tau_pos=self.args.sapo_temperature_pos,
                      sapo_tau_neg=self.args.sapo_temperature_neg)
        elif lt == "vespo":
            a = self.args
            kw.update(loss="vespo", vespo_k_pos=a.vespo_k_pos, vespo_lambda_pos=a.vespo_lambda_pos,
                      vespo_k_neg=a.vespo_k_neg, vespo_lambda_neg=a.vespo_lambda_neg)
            kw.pop("importance_sampling_level")
        else:
            raise ValueError(f"loss_type {lt!r} is not one fastgrad.integrations.trl knows")
        if lt in ("grpo", "sapo"):  # each sequence's token mean, the mean over sequences, / accumulation steps
            kw.update(normalize="sequence", num_items=batch_size * ga)
        elif lt == "bnpo":
            kw.update(normalize="token", num_items=n_tokens * ga)
        elif lt == "dr_grpo":
            kw.update(normalize="constant", num_items=batch_size * self.max_completion_length * ga)
        elif lt == "luspo":
            kw.update(normalize="constant", num_items=batch_size * ga)
        else:  # dapo, cispo, vespo: TRL's num_items_in_batch spans the generation batch, rescaled to one window
            z = float(inputs["num_items_in_batch"].clamp(min=1.0)) / self.accelerator.num_processes
            if mode == "train":
                z = z * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            kw.update(normalize="constant", num_items=z)
        return kw

    def _compute_loss(self, model, inputs):
        path = self._fastgrad_fallback(inputs)
        if path is not None:
            self.fastgrad_path = path  # TRL's loss; its log-probs from the override above unless path == "trl"
            return super()._compute_loss(model, inputs)
        self.fastgrad_path = "fused"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        K = completion_ids.size(1)
        B = completion_ids.size(0)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        index = completion_ids.masked_fill(completion_mask == 0, -100)
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        n_tokens = float(mask.sum().clamp(min=1.0))
        kw = self._fastgrad_loss_kwargs(inputs, mode, B, n_tokens)

        adv = inputs["advantages"]
        adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
        policy_adv = adv
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies the policy term by the ratio it computed at generation: every loss here is linear in
            # the advantage with the ratio's sign (>= 0), so the ratio enters as a per-token advantage weight
            policy_adv = adv * inputs["importance_sampling_ratio"]
        policy_adv = policy_adv.expand(B, K) if policy_adv.shape[1] != K else policy_adv
        old = inputs.get("old_per_token_logps")
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        # TRL's entropy bonus is a token mean whatever the loss's normalization: under the token and constant
        # normalizations (w_t = mask_t / Z) that is entropy_coef * Z / (tokens * accumulation steps)
        entropy_coef = 0.0
        if self._entropy_bonus_enabled:
            entropy_coef = self.entropy_coef * kw["num_items"] / (n_tokens * ga)
        t = self._fastgrad_temperature(model)
        # TRL's default use_bias_correction_kl multiplies k3 by the (differentiable) token ratio
        kl = "k3_is" if self.args.use_bias_correction_kl else "k3"

        def head(hidden, weight, bias):
            h, ctx = self._head_input(hidden[:, -K:])
            with ctx:
                return linear_policy_loss(h, weight.to(h.dtype), index, policy_adv.contiguous(), mask=mask.bool(),
                                          old_logp=old, ref_logp=ref, beta=self.beta, kl=kl,
                                          entropy_coef=entropy_coef, bias=None if bias is None else bias.to(h.dtype),
                                          temperature=t, return_entropy=True, **kw)

        with self.accelerator.autocast():
            loss, stats = model(input_ids=input_ids, attention_mask=attention_mask, fastgrad_head=head)
        self._fastgrad_metrics(mode, stats, mask, adv, old, ref, kw, loss, entropy_coef, ga)
        return loss

    # -- TRL's metrics, from the fused pass's statistics ----------------------------------------------------------
    def _fastgrad_metrics(self, mode, stats, mask, adv, old, ref, kw, loss, entropy_coef, ga):
        m = mask.to(torch.float32)
        logp = stats["logp"]
        metrics = self._metrics[mode]

        def global_mean(x):  # the mean over every rank's loss tokens ((B, 1): over sequences)
            if x.shape[1] == 1:
                s, n = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                s, n = (x * m).sum(), m.sum()
            tot = self.accelerator.reduce(torch.stack([s.float(), n.float()]), reduction="sum")
            return (tot[0] / tot[1].clamp(min=1.0)).item()

        def seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

        log_ratio = (logp - old) if old is not None else torch.zeros_like(logp)
        if self.importance_sampling_level == "sequence" and self.loss_type != "vespo":
            r = torch.exp((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))
        else:
            r = torch.exp(log_ratio)
        if self._entropy_bonus_enabled:
            z = kw["num_items"]
            ent_term = entropy_coef * float((stats["entropy"] * m).sum()) / z
            policy = float(loss.detach()) + ent_term
            if self.loss_type not in ("dapo", "cispo", "vespo"):
                policy *= ga  # TRL logs the policy loss before the accumulation division
            pl = self.accelerator.gather(torch.tensor(policy, device=logp.device)).nanmean()
            metrics["policy_loss"].append(pl.item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        if self.beta != 0.0:
            d = ref - logp
            k3 = torch.exp(d) - d - 1
            metrics["kl"].append(global_mean(k3 * r if self.args.use_bias_correction_kl else k3))
        metrics["entropy"].append(global_mean(stats["entropy"]))
        if self.loss_type in _PPO:
            if self.args.delta is not None:  # TRL counts the clipped tokens on the delta-capped ratio
                r = r.clamp(max=self.args.delta)
            low = ((r < 1 - self.epsilon_low) & (adv < 0)).float()
            high = ((r > 1 + self.epsilon_high) & (adv > 0)).float()
            metrics["clip_ratio/low_mean"].append(global_mean(low))
            metrics["clip_ratio/high_mean"].append(global_mean(high))
            metrics["clip_ratio/region_mean"].append(global_mean(((low + high) > 0).float()))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low)))
                                                 .item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high)))
                                                  .item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean(((r > self.epsilon_high) & (adv > 0)).float()))
        elif self.loss_type == "vespo":
            phi = vespo_weights(log_ratio, mask.bool(), adv, None, self.args.vespo_k_pos, self.args.vespo_lambda_pos,
                                self.args.vespo_k_neg, self.args.vespo_lambda_neg)
            metrics["vespo/phi_seq_mean"].append(global_mean(phi))
