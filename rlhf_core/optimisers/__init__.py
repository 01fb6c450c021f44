"""The policy optimisers beside our PPO engine, each through TRL's own trainer (``ppo.algorithm``).

* ``rloo`` / ``grpo`` (:mod:`~rlhf_core.optimisers.online`) - TRL's RLOOTrainer and
  GRPOTrainer sample from the policy and score with *our* reward model, read as PPO
  reads it (normalisation, stop-token setting, EOS trick), with a KL penalty
  against the frozen starting policy;
* ``dpo`` (:mod:`~rlhf_core.optimisers.dpo`) - TRL's DPOTrainer on the preference
  pairs themselves (all C(K,2) of each ranking, weighted as the reward stage
  weights them), reference = the starting policy.

What they share with each other and with PPO (:mod:`~rlhf_core.optimisers.session`):
the starting policy with PPO's cost modes (``ppo.mode``: full, freeze, LoRA), one
curve row per update with the gold slice measured as PPO measures it, and a
plain causal-LM export.  The ``ppo`` stage writes their outputs exactly as it
writes PPO's, so ``evaluate`` and ``promote`` treat every optimiser alike.

TRL does the optimisation; nothing here re-implements it.
"""

#: The optimisers of this package (``ppo`` is :mod:`rlhf_core.ppo`).
ALGORITHMS = ("rloo", "grpo", "dpo")
