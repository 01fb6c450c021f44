"""Our side: ``rlhf_core.ppo`` driven update by update, with the benchmark's reward model as its score function."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

from ppo_bench.flops import DecoderShape, PassSizes, ppo_training_flops
from ppo_bench.workload import Workload, limit_threads, peak_rss_bytes


def reward_score_fn(reward_model_path: str, batch_size: int):
    """The benchmark's reward model and ``score_fn(prompts, responses, finished)`` over it, read on
    ``rlhf_core.generation.conversation_text`` (through ``RewardModel.score``), in the dtype its folder
    records - as the ``ppo`` stage loads its reward model."""
    from rlhf_core.reward.model import RewardModel

    reward = RewardModel.load(reward_model_path)

    def score_fn(prompts: list[str], responses: list[str], finished: list[bool]):
        return reward.score(prompts, responses, finished, batch_size=batch_size)

    return reward, score_fn


def record_rollout_sizes(trainer) -> list[PassSizes]:
    """Wrap ``trainer.sample`` so that each update's batch shape is kept (the FLOP count needs it)."""
    from rlhf_core.generation import left_padding

    sizes: list[PassSizes] = []
    sample = trainer.sample

    def recording_sample(prompts, generator):
        rollout = sample(prompts, generator)
        rows, width = rollout.attention_mask.shape
        padding = int(left_padding(rollout.attention_mask).sum())  # which the passes cut
        old_pass = trainer.old_policy_source(rollout) == "pass"
        sizes.append(PassSizes(rows, width, rollout.n_response, rows * width - padding, old_pass))
        return rollout

    trainer.sample = recording_sample
    return sizes


def engine_source_sha256() -> str:
    """Hash of the engine's source as this run imported it (the engine may change between runs of one invocation)."""
    from rlhf_core.ppo import trainer

    digest = hashlib.sha256()
    for path in sorted(Path(trainer.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run(workload: Workload) -> dict:
    """``workload.updates`` updates of our PPO; per update its wall time, the trainer's metrics and training FLOPs."""
    limit_threads(workload.threads)
    from tqdm.auto import tqdm

    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo.trainer import build_trainer
    from rlhf_core.reward.trunk import RolloutTrunkScorer

    source = engine_source_sha256()
    cfg = PPOConfig.model_validate(workload.ppo)
    reward, score_fn = reward_score_fn(workload.reward_model, cfg.batch_size)
    trainer = build_trainer(cfg, workload.model, score_fn, workload.prompts)
    # As the ppo stage: rollouts are scored from their trunk states when the reward model shares the policy's trunk.
    trainer.score_fn = RolloutTrunkScorer.for_policy(reward, trainer.policy, cfg.batch_size) or score_fn
    policy = trainer.policy
    shape = DecoderShape.of_actor_critic(policy)
    sizes = record_rollout_sizes(trainer)

    updates = []
    for _ in tqdm(range(workload.updates), desc=workload.side, unit="update"):
        start = time.perf_counter()
        metrics = trainer.step()
        seconds = time.perf_counter() - start
        flops = ppo_training_flops(
            shape, sizes[-1], mode=policy.mode, trunk_layers=policy.trunk_layers,
            separate_value=policy.separate_value, ppo_epochs=cfg.ppo_epochs,
        )  # fmt: skip
        tokens = metrics["ppo/response_length"] * cfg.batch_size
        updates.append({
            "seconds": seconds,
            "generation_seconds": metrics["ppo/seconds_rollout"],
            "generated_tokens": tokens,
            "training_seconds": metrics["ppo/seconds_optimise"],
            "training_flops": flops,
            "sizes": asdict(sizes[-1]),
            "metrics": metrics,
        })  # fmt: skip
    return {
        "side": workload.side,
        "updates": updates,
        "peak_rss_bytes": peak_rss_bytes(),
        "bf16": policy.dtype == "bfloat16",
        "mode": policy.mode,
        "trunk_layers": policy.trunk_layers,
        "value_model": "separate" if policy.separate_value else "head",
        "trainable_parameters": sum(t.numel() for t in policy.trainable_state().values()),
        "decoder_shape": asdict(shape),
        "engine_source_sha256": source,
    }
