"""DPO: TRL's DPOTrainer on the preference pairs, with the starting policy as its reference.

The pairs are the stage's (``<paths.preferences>/pairs.jsonl``): all C(K,2)
comparisons of each ranking, each weighted 1/(pairs of its ranking) so that one
ranking counts as one example, as the reward stage weights them.  DPOTrainer
has no per-pair weight, so the weights decide how often each pair is drawn
(:func:`weighted_pairs`, systematic resampling): with the default data every
ranking has C(4,2) pairs and every pair is drawn once per epoch.

DPO samples nothing while it trains; one *update* is one optimiser step of
``ppo.dpo.pairs_per_batch`` pairs.  Curve columns: ``beta``, ``entropy``,
``seconds_per_update`` and, on the gold slice's rows, ``gold``, ``gold_proxy``
and ``kl`` (sequence KL to the starting policy on the slice's samples);
``score`` and the sampling columns stay empty.  TRL's own log
(``rewards/margins``, ``rewards/accuracies``, ...) goes under ``dpo/trl/``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhf_core.config import PPOConfig
from rlhf_core.errors import DataError
from rlhf_core.optimisers.session import (
    GoldSlice, Row, Trained, UpdateCurve, load_start_policy, trainable_parameters, training_arguments,
)  # fmt: skip
from rlhf_core.schemas import PreferencePair


def weighted_pairs(pairs: Sequence[PreferencePair], draws: int) -> list[PreferencePair]:
    """``draws`` pairs, each drawn in proportion to its weight (systematic resampling: no randomness, no gaps).

    Equal weights give every pair once when ``draws == len(pairs)``.
    """
    total = sum(p.weight for p in pairs)
    if not pairs or total <= 0:
        raise DataError("no preference pairs with a positive weight to train DPO on")
    out, cumulative, step = [], 0.0, total / draws
    position = step / 2
    for pair in pairs:
        cumulative += pair.weight
        while position < cumulative and len(out) < draws:
            out.append(pair)
            position += step
    return out


def update_count(cfg: PPOConfig, num_pairs: int) -> int:
    """Optimiser steps of ``ppo.dpo.epochs`` passes over ``num_pairs`` pairs."""
    return max(1, math.ceil(num_pairs * cfg.dpo.epochs / cfg.dpo.pairs_per_batch))


def train_dpo(
    cfg: PPOConfig,
    start_path: str | Path,
    pairs: Sequence[PreferencePair],
    output_dir: str | Path,
    *,
    gold: GoldSlice | None = None,
    on_update: Callable[[Row], None] = lambda row: None,
) -> Trained:
    """Train the policy at ``start_path`` with DPO on ``pairs``; the trained policy and curve."""
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback

    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.generation import chat_prompt

    tokenizer = load_tokenizer(start_path)
    model, peft_config = load_start_policy(start_path, cfg)
    drawn = weighted_pairs(pairs, len(pairs))
    # TRL appends the stop token to both answers of a plain-text pair: DPO learns where an answer ends from it.
    dataset = Dataset.from_dict({
        "prompt": [chat_prompt(tokenizer, p.prompt) for p in drawn],
        "chosen": [p.chosen for p in drawn],
        "rejected": [p.rejected for p in drawn],
    })  # fmt: skip
    updates = update_count(cfg, len(drawn))
    if gold is not None and gold.reference is None:
        from rlhf_core.base_model import load_causal_lm

        gold = replace(gold, reference=load_causal_lm(start_path, dtype="float32").eval())
    args = trl.DPOConfig(
        **training_arguments(cfg, Path(output_dir), steps=updates, logging_steps=1, learning_rate=cfg.dpo.learning_rate),
        per_device_train_batch_size=cfg.dpo.pairs_per_batch,
        beta=cfg.dpo.beta,
        max_length=cfg.dpo.max_length,
        # the reference's log-probabilities in one pass before training: no second model held, no reference
        # forward per step (48 of the default pairs on a 2-core CPU: 106 s instead of 129, the pass included)
        precompute_ref_log_probs=True,
    )  # fmt: skip

    def columns(logs: dict, seconds: float) -> dict:
        return {"beta": cfg.dpo.beta, "entropy": logs.get("entropy"), "seconds_per_update": seconds}

    curve = UpdateCurve(
        "dpo", steps_per_update=1, updates=updates, beta=cfg.dpo.beta, columns=columns, gold=gold,
        gold_every=cfg.gold_eval_every, on_update=on_update,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[curve.callback(tokenizer)],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # every update goes to the curve and MLflow instead
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return Trained(policy, tokenizer, curve.history, trainable_parameters(policy))
