"""The reward model: a scalar head on the base LM, trained on ranking pairs and normalised on base completions.

``from rlhf_core.reward import RewardModel`` is all the PPO and evaluation
stages need; training lives in :mod:`rlhf_core.reward.trainer` and the stage
``rlhf_core.stages.train_reward``.
"""

from rlhf_core.reward.model import RewardModel

__all__ = ["RewardModel"]
