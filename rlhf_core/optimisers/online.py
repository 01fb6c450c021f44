"""RLOO and GRPO: TRL's RLOOTrainer / GRPOTrainer against our reward model, with a KL penalty to the reference.

The reward is :class:`ProxyReward`, a TRL reward function that reads each
completion as PPO does: ``RewardModel.score`` on (prompt, completion) with its
normalisation and ``reward.read_stop_token`` setting, then the EOS trick
(``ppo.missing_eos_penalty`` replaces the score of a completion that never
stopped).  The reference is the starting policy, frozen: TRL loads a copy of it
from its folder (``freeze``, ``full``) or switches the LoRA adapters off.

One *update* is one TRL generation batch: ``ppo.batch_size`` samples
(``batch_size / num_generations`` prompts, ``num_generations`` samples each),
used for ``ppo.ppo_epochs`` iterations of ``ppo.minibatches`` optimiser steps,
clipped at ``ppo.cliprange`` - PPO's budget of sampled tokens and steps.

Curve columns (nats per response for KL): ``kl`` (RLOO: k1 of the sampling
policy, as in its reward; GRPO: k3 of the current policy, as in its loss),
``beta``, ``score`` (reward model, before the EOS trick), ``rlhf_reward``
(RLOO: score after the EOS trick minus beta*KL, what it maximises; GRPO has
none: its KL is in the loss), ``entropy``, ``clipfrac``, ``response_length``,
``tokens_per_second``, ``seconds_per_update``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlhf_core.config import PPOConfig
from rlhf_core.optimisers.session import (
    GoldSlice, Row, ScoreFn, Trained, UpdateCurve, load_start_policy, per_response_kl, trainable_parameters,
    training_arguments,
)  # fmt: skip


class ProxyReward:
    """TRL reward function: our reward model's normalised score of (prompt, completion), then the EOS trick.

    TRL passes the chat-formatted prompts; the raw prompt text comes from the
    dataset's ``prompt_text`` column, which the reward model formats itself.
    """

    __name__ = "proxy"  # TRL logs rewards/<name>/mean

    def __init__(self, score_fn: ScoreFn, eos_token_ids: Sequence[int], missing_eos_penalty: float | None):
        self.score_fn, self.eos_token_ids, self.penalty = score_fn, set(eos_token_ids), missing_eos_penalty

    def __call__(self, prompts, completions, completion_ids, prompt_text, log_metric=None, **_) -> list[float]:
        from rlhf_core.ppo.core import apply_missing_eos_penalty

        finished = [bool(ids) and ids[-1] in self.eos_token_ids for ids in completion_ids]
        scores = torch.as_tensor(self.score_fn(list(prompt_text), list(completions), finished), dtype=torch.float32)
        scores = scores.reshape(-1)
        if log_metric is not None:
            log_metric("score", float(scores.mean()))
            log_metric("finished_fraction", sum(finished) / len(finished))
        return apply_missing_eos_penalty(scores, torch.tensor(finished), self.penalty).tolist()


def _columns(algorithm: str, beta: float, batch_size: int) -> Callable[[dict, float], dict]:
    def columns(logs: dict, seconds: float) -> dict:
        kl = per_response_kl(logs)
        length = logs.get("completions/mean_length")
        reward = logs.get("rewards/proxy/mean")
        return {
            "kl": kl,
            "beta": beta,
            "score": logs.get("score"),
            "rlhf_reward": reward - beta * kl if algorithm == "rloo" and None not in (reward, kl) else None,
            "entropy": logs.get("entropy"),
            "clipfrac": logs.get("clip_ratio/region_mean"),
            "response_length": length,
            "finished_fraction": logs.get("finished_fraction"),
            "tokens_per_second": length * batch_size / seconds if length is not None and seconds > 0 else None,
            "seconds_per_update": seconds,
        }

    return columns


def trl_config(algorithm: str, cfg: PPOConfig, output_dir: Path):
    """TRL's RLOOConfig or GRPOConfig from ``ppo:`` (and ``ppo.<algorithm>``)."""
    import trl

    settings = getattr(cfg, algorithm)
    steps_per_update = cfg.minibatches * cfg.ppo_epochs
    micro_steps = cfg.minibatches * cfg.gradient_accumulation
    kind = {"rloo": trl.RLOOConfig, "grpo": trl.GRPOConfig}[algorithm]
    return kind(
        **training_arguments(
            cfg, output_dir, steps=cfg.updates * steps_per_update, logging_steps=steps_per_update,
            learning_rate=cfg.learning_rate,
        ),
        per_device_train_batch_size=cfg.batch_size // micro_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        steps_per_generation=micro_steps,
        num_iterations=cfg.ppo_epochs,
        num_generations=settings.num_generations,
        beta=settings.beta,
        epsilon=cfg.cliprange,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=0,  # pure sampling, as PPO's rollouts
    )  # fmt: skip


def train_online(
    algorithm: str,
    cfg: PPOConfig,
    start_path: str | Path,
    score_fn: ScoreFn,
    prompts: Sequence[str],
    output_dir: str | Path,
    *,
    gold: GoldSlice | None = None,
    on_update: Callable[[Row], None] = lambda row: None,
) -> Trained:
    """Train the policy at ``start_path`` with RLOO or GRPO for ``ppo.updates`` updates; the trained policy and curve."""
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback

    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.generation import chat_prompt

    tokenizer = load_tokenizer(start_path)
    model, peft_config = load_start_policy(start_path, cfg)
    args = trl_config(algorithm, cfg, Path(output_dir))
    dataset = Dataset.from_dict({"prompt": [chat_prompt(tokenizer, p) for p in prompts], "prompt_text": list(prompts)})
    settings = getattr(cfg, algorithm)
    curve = UpdateCurve(
        algorithm, steps_per_update=cfg.minibatches * cfg.ppo_epochs, updates=cfg.updates, beta=settings.beta,
        columns=_columns(algorithm, settings.beta, cfg.batch_size), gold=gold, gold_every=cfg.gold_eval_every,
        on_update=on_update,
    )  # fmt: skip
    reward = ProxyReward(score_fn, [tokenizer.eos_token_id], cfg.missing_eos_penalty)
    kind = {"rloo": trl.RLOOTrainer, "grpo": trl.GRPOTrainer}[algorithm]
    trainer = kind(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[curve.callback(tokenizer)],
    )  # fmt: skip
    reward.eos_token_ids = set(trainer.eos_token_ids)  # TRL ends a completion at every stop token the model declares
    trainer.remove_callback(PrinterCallback)  # every update goes to the curve and MLflow instead
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return Trained(policy, tokenizer, curve.history, trainable_parameters(policy))
