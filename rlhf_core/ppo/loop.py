"""A whole PPO run: resume from the last checkpoint, update, measure gold now and then, checkpoint.

The stage (``rlhf_core/stages/ppo.py``) and scripts share this; what happens to
each update's metrics (MLflow, a CSV) is the caller's ``on_update``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf_core.config import PPOConfig
from rlhf_core.ppo.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from rlhf_core.ppo.trainer import NonFiniteError, PPOTrainer

#: PPO settings that do not change the trajectory of the weights: a checkpoint written under other values
#: still resumes (so a run can be extended by raising ``updates``).
TRAJECTORY_NEUTRAL = {"updates", "checkpoint_every", "gold_eval_every", "gold_eval_prompts"}


def run_fingerprint(cfg: PPOConfig, **identities: object) -> str:
    """Hash of everything that determines the weights after N updates: settings, starting policy, data, reward."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in TRAJECTORY_NEUTRAL}
    payload = json.dumps({"ppo": settings, **{k: str(v) for k, v in identities.items()}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class GoldProbe:
    """Mean gold score and proxy (reward model) score of the policy's responses on a fixed prompt slice.

    The slice and the sampling seed never change, so successive measurements
    differ only through the policy (Gao et al. 2022 measure over-optimisation so).
    The proxy is the trainer's own scorer (:meth:`PPOTrainer.score`), which reads
    the rollout's trunk states where the reward model shares the policy's trunk.
    """

    prompts: Sequence[str]
    gold_fn: Callable[[str, str], float]
    seed: int

    def measure(self, trainer: PPOTrainer) -> dict[str, float]:
        generator = torch.Generator(device=trainer.accelerator.device).manual_seed(self.seed)
        gold, proxy = [], []
        for first in range(0, len(self.prompts), trainer.local_batch):
            prompts = list(self.prompts[first : first + trainer.local_batch])
            rollout = trainer.sample(prompts, generator)
            responses = trainer.decode(rollout)
            gold += [self.gold_fn(p, r) for p, r in zip(prompts, responses)]
            proxy += trainer.score(prompts, responses, rollout.finished, rollout).tolist()
        return {
            "ppo/gold": sum(gold) / len(gold), "ppo/gold_proxy": sum(proxy) / len(proxy),
            # per prompt, in the slice's order: the evaluation's paired test of a fall along the run
            "ppo/gold_per_prompt": gold, "ppo/gold_proxy_per_prompt": proxy,
        }  # fmt: skip


def resume(trainer: PPOTrainer, checkpoint_dir: str | Path, fingerprint: str, updates: int) -> tuple[list[dict], Path | None]:
    """Restore the newest checkpoint of this same run, if any; returns (metrics history, checkpoint)."""
    found = latest_checkpoint(checkpoint_dir)
    if found is None:
        return [], None
    state = read_state(found)
    same_run = state["config_hash"] == fingerprint and state["processes"] == trainer.accelerator.num_processes
    if not same_run or state["update"] > updates:
        return [], None
    return load_checkpoint(found, trainer), found


def train(
    trainer: PPOTrainer,
    *,
    updates: int,
    checkpoint_dir: str | Path,
    checkpoint_every: int,
    fingerprint: str,
    history: list[dict],
    on_update: Callable[[dict], None] = lambda row: None,
    gold: GoldProbe | None = None,
    gold_every: int = 1,
) -> list[dict]:
    """Run updates until ``updates`` are done; returns the full history (one row per update, plus row 0 for gold).

    Rows carry ``update`` and the ``ppo/...`` metrics.  Every process must call
    this (checkpoints synchronise them); only the main process measures gold.
    """
    history = list(history)
    measure_gold = gold is not None and trainer.accelerator.is_main_process
    if not history and measure_gold:
        # Before any update the policy is the reference: KL 0 by definition, the gold baseline of the run.
        row = {"update": 0, "ppo/kl": 0.0, "ppo/beta": trainer.kl_ctl.value, **gold.measure(trainer)}
        history.append(row)
        on_update(row)
    last_checkpoint = latest_checkpoint(checkpoint_dir) if trainer.update else None
    progress = tqdm(total=updates, initial=trainer.update, desc="ppo", unit="update", disable=not trainer.accelerator.is_main_process)
    while trainer.update < updates:
        try:
            metrics = trainer.step()
        except NonFiniteError as exc:
            kept = f"last good checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint written yet"
            raise NonFiniteError(f"{exc}; {kept}") from None
        done = trainer.update
        if measure_gold and (done % gold_every == 0 or done == updates):
            metrics.update(gold.measure(trainer))
        row = {"update": done, **metrics}
        history.append(row)
        on_update(row)
        progress.update(1)
        progress.set_postfix(kl=f"{metrics['ppo/kl']:.2f}", score=f"{metrics['ppo/score']:.2f}")
        if done % checkpoint_every == 0 or done == updates:
            last_checkpoint = save_checkpoint(checkpoint_dir, trainer, history, fingerprint)
    progress.close()
    return history
