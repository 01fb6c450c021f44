"""PPO with KL control for language models (phase 3 of RLHF), as small named pieces.

* :mod:`~rlhf_core.ppo.core` - the arithmetic: KL estimators, reward shaping and the
  EOS trick, whitening, GAE, clipped policy and value losses;
* :mod:`~rlhf_core.ppo.kl` - KL coefficient controllers (fixed, adaptive);
* :mod:`~rlhf_core.ppo.policy` - policy, value function and reference around one LM,
  the cost modes (full, freeze, LoRA), export of the trained policy;
* :mod:`~rlhf_core.ppo.rollout` - batched sampling with a KV cache that keeps the
  frozen trunk's hidden states for every later pass;
* :mod:`~rlhf_core.ppo.trainer` - one PPO update (:meth:`PPOTrainer.step`);
* :mod:`~rlhf_core.ppo.checkpoint` - atomic checkpoints;
* :mod:`~rlhf_core.ppo.loop` - a whole run: resume, updates, gold measurements, checkpoints.

From a script::

    trainer = build_trainer(PPOConfig(...), "models/base", score_fn, prompts)
    metrics = trainer.step()   # {"ppo/kl": ..., "ppo/score": ..., ...}
"""

from rlhf_core.ppo.trainer import PPOTrainer, build_trainer

__all__ = ["PPOTrainer", "build_trainer"]
