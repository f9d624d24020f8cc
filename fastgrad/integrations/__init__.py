"""Adapters that put fastgrad's fused LM-head losses inside the RL trainers users already run.

- :mod:`fastgrad.integrations.verl`: a drop-in for verl's ``FusedLinearForPPO`` (its ``use_fused_kernels`` path),
  with :func:`fastgrad.integrations.verl.install` to select it in a verl run.
- :mod:`fastgrad.integrations.trl`: ``GRPOTrainer``, TRL's trainer with its loss on
  :func:`fastgrad.functional.linear_policy_loss`.

Neither module imports its trainer until used: ``import fastgrad`` never needs verl or TRL.
"""
