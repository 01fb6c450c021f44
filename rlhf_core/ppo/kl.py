"""KL coefficient controllers: how strongly the reward penalises drifting from the reference.

Both follow the interface of lm-human-preferences: ``value`` is the current
beta, ``update(current_kl, n_steps)`` is called once per PPO update with the
measured KL (nats per response) and the number of episodes in that update.
"""

from __future__ import annotations

from rlhf_core.config import KLConfig


class FixedKLController:
    """A constant beta."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """A fixed beta ignores the measured KL."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, section 2.2).

    ``beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n_steps / horizon)``:
    beta grows while the KL is above target and shrinks below it, by at most 20%
    of ``n_steps / horizon`` per update, so one noisy batch cannot swing it.
    """

    def __init__(self, beta: float, target: float, horizon: int):
        self.value = float(beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(cfg: KLConfig) -> FixedKLController | AdaptiveKLController:
    if cfg.controller == "fixed":
        return FixedKLController(cfg.beta)
    return AdaptiveKLController(cfg.beta, cfg.target, cfg.horizon)
