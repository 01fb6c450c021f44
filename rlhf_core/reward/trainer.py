"""Training the reward model with TRL's ``RewardTrainer``, one prompt's comparisons per batch element.

TRL's trainer scores each pair on its own (2·C(K,2) forward passes per ranking).
:class:`RankingRewardTrainer` keeps TRL's model set-up, PEFT wrapping, logging
and distributed plumbing, and overrides the two places where pairs are made:
the dataset (already tokenised, one example per prompt) and the loss, which
scores every distinct completion of the batch once and reads all pairs off those
scores - K forward passes for C(K,2) pairs (InstructGPT, section 3.5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer

from rlhf_core.config import RewardConfig
from rlhf_core.errors import DataError
from rlhf_core.reward.build import build_reward_model, trainable_parameters
from rlhf_core.reward.data import PromptComparisons, encode_group, num_pairs
from rlhf_core.reward.model import pad_right, reward_tokenizer


def is_main_process() -> bool:
    """True unless this is a secondary process of a distributed launch (``accelerate launch``, ``torchrun``)."""
    return int(os.environ.get("RANK", "0")) == 0


def use_bf16(setting: str) -> bool:
    """``reward.bf16``: 'auto' means bf16 where the hardware is fast at it (see rlhf_core.generation.resolve_dtype)."""
    from rlhf_core.generation import resolve_dtype

    if setting == "auto":
        return resolve_dtype("auto") == torch.bfloat16
    return setting == "on"


def ranking_loss(
    rewards: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor,
    weight: torch.Tensor,
    center_coefficient: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Bradley-Terry loss over pairs indexing into ``rewards``; returns (loss, r_chosen - r_rejected).

    ``-log sigmoid(r_c - r_r - margin)`` per pair (Llama 2's margin), averaged
    with the pair weights 1/C(K,2) so that every ranking counts once.  With
    ``center_coefficient`` the loss adds ``coef * (r_c + r_r)^2`` to keep rewards
    centred (Eisenstein et al. 2023, eq. 2; TRL's ``center_rewards_coefficient``).
    """
    diff = rewards[chosen] - rewards[rejected]
    total = weight.sum()
    loss = -(weight * F.logsigmoid(diff - margin)).sum() / total
    if center_coefficient:
        loss = loss + center_coefficient * (weight * (rewards[chosen] + rewards[rejected]) ** 2).sum() / total
    return loss, diff


@dataclass
class RankingCollator:
    """Stacks the completions of several prompts into one right-padded batch and shifts their pair indexes."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        sequences, chosen, rejected, margin, weight = [], [], [], [], []
        for example in examples:
            offset = len(sequences)
            sequences.extend(example["input_ids"])
            chosen.extend(offset + i for i in example["chosen"])
            rejected.extend(offset + i for i in example["rejected"])
            margin.extend(example["margin"])
            weight.extend(example["weight"])
        input_ids, attention_mask = pad_right(sequences, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "chosen": torch.tensor(chosen, dtype=torch.long),
            "rejected": torch.tensor(rejected, dtype=torch.long),
            "margin": torch.tensor(margin, dtype=torch.float32),
            "weight": torch.tensor(weight, dtype=torch.float32),
        }


class RankingRewardTrainer(RewardTrainer):
    """``RewardTrainer`` whose batch elements are whole prompts (see the module docstring).

    Logs, besides the loss: ``accuracy`` (share of the batch's pairs ordered as
    labelled), ``margin`` (mean r_c - r_r), ``mean_reward`` and ``completions``
    (forward passes in the step).
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Examples are tokenised by rlhf_core.reward.data.encode_group: one per prompt, not one per pair.
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1).float()
        loss, diff = ranking_loss(
            rewards, inputs["chosen"], inputs["rejected"], inputs["margin"], inputs["weight"],
            self.args.center_rewards_coefficient,
        )
        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            self._metrics[mode]["accuracy"].append(gather((diff > 0).float().mean()).mean().item())
            self._metrics[mode]["margin"].append(gather(diff.mean()).mean().item())
            self._metrics[mode]["mean_reward"].append(gather(rewards.mean()).mean().item())
            self._metrics[mode]["completions"].append(float(rewards.numel()))
        return (loss, outputs) if return_outputs else loss


def trainer_args(cfg: RewardConfig, output_dir: Path) -> TRLRewardConfig:
    """TRL settings from ``params.yaml``'s ``reward`` section.

    TRL turns bf16 and gradient (activation) checkpointing on by default: bf16
    comes from our params instead (a CPU without bf16 instructions runs it
    slower than fp32), and checkpointing stays off - it would spend a second
    forward pass to save memory that a reward model this size does not need.
    Nothing is saved by the trainer: the stage saves the final model itself.
    """
    return TRLRewardConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.prompts_per_batch,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        bf16=use_bf16(cfg.bf16),
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,  # TRL's gradient_checkpointing=True, under its new name
        max_length=None,  # sequences are truncated (from the left) when tokenised
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length",
        ddp_find_unused_parameters=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        log_level="warning",
    )


@dataclass
class FitResult:
    model: object
    tokenizer: object
    losses: list[tuple[int, float]]
    seconds: float
    steps: int
    pairs: int
    truncated: int
    trainable_parameters: int


def fit_reward_model(base_model: str | Path, cfg: RewardConfig, groups: list[PromptComparisons], output_dir: Path) -> FitResult:
    """Train a reward model on ``groups`` (every process of a distributed launch calls this)."""
    from datasets import Dataset

    tokenizer = reward_tokenizer(base_model, cfg.max_length)
    model, peft_config = build_reward_model(base_model, tokenizer, cfg)
    encoded = [encode_group(tokenizer, group) for group in groups if group.comparisons]
    if not encoded:
        raise DataError("no training pairs")
    trainer = RankingRewardTrainer(
        model=model,
        args=trainer_args(cfg, output_dir),
        train_dataset=Dataset.from_list([example for example, _ in encoded]),
        processing_class=tokenizer,
        data_collator=RankingCollator(tokenizer.pad_token_id),
        peft_config=peft_config,
    )
    trainable = trainable_parameters(trainer.model)
    output = trainer.train()
    model = trainer.model
    if peft_config is not None:
        model = model.merge_and_unload()
    losses = [(int(row["step"]), float(row["loss"])) for row in trainer.state.log_history if "loss" in row]
    return FitResult(
        model=model,
        tokenizer=tokenizer,
        losses=losses,
        seconds=float(output.metrics["train_runtime"]),
        steps=int(output.global_step),
        pairs=num_pairs(groups),
        truncated=sum(truncated for _, truncated in encoded),
        trainable_parameters=trainable,
    )
