"""Training the reward model with TRL's ``RewardTrainer``, one prompt's comparisons per batch element.

TRL's trainer scores each pair on its own (2·C(K,2) forward passes per ranking).
:class:`RankingRewardTrainer` keeps TRL's model set-up, PEFT wrapping, logging
and distributed plumbing, and overrides the two places where pairs are made:
the dataset (already tokenised, one example per prompt) and the loss, which
scores every distinct completion of the batch once and reads all pairs off those
scores - K forward passes for C(K,2) pairs (InstructGPT, section 3.5).

:func:`fit_reward_model` is the whole recipe: tokenise, run the frozen layers
once (:mod:`rlhf_core.reward.trunk`), start the head as a linear probe
(:mod:`rlhf_core.reward.probe`), then fine-tune the upper layers with the trainer.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer

from rlhf_core.config import RewardConfig
from rlhf_core.errors import ConfigError, DataError
from rlhf_core.precision import autocast
from rlhf_core.reward.build import build_reward_model, reward_head, trainable_parameters
from rlhf_core.reward.data import PromptComparisons, encode_groups, num_pairs
from rlhf_core.reward.model import RewardModel, pad_right, reward_tokenizer
from rlhf_core.reward.probe import fit_linear_head
from rlhf_core.reward.trunk import (
    CachedTrunkScorer,
    FeatureScorer,
    FrozenTrunk,
    States,
    StateFile,
    last_token_features,
    pad_left_states,
)


def is_main_process() -> bool:
    """True unless this is a secondary process of a distributed launch (``accelerate launch``, ``torchrun``)."""
    return int(os.environ.get("RANK", "0")) == 0


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


#: batch keys that describe the pairs; every other key is an input of the model
PAIR_KEYS = ("chosen", "rejected", "margin", "weight")


@dataclass
class TokenInputs:
    """Model inputs for completions given by index: their token ids, right-padded."""

    sequences: list[list[int]]
    pad_token_id: int

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_right([self.sequences[i] for i in indices], self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass
class TrunkStateInputs:
    """Model inputs for completions given by index: their cached frozen-trunk states (see rlhf_core.reward.trunk)."""

    states: States
    sequences: list[list[int]]

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return pad_left_states([self.states[tuple(self.sequences[i])] for i in indices])


@dataclass
class RankingCollator:
    """Stacks the completions of several prompts into one batch and shifts their pair indexes to match."""

    model_inputs: Callable[[list[int]], dict[str, torch.Tensor]]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        completions, chosen, rejected, margin, weight = [], [], [], [], []
        for example in examples:
            offset = len(completions)
            completions.extend(example["completions"])
            chosen.extend(offset + i for i in example["chosen"])
            rejected.extend(offset + i for i in example["rejected"])
            margin.extend(example["margin"])
            weight.extend(example["weight"])
        return {
            **self.model_inputs(completions),
            "chosen": torch.tensor(chosen, dtype=torch.long),
            "rejected": torch.tensor(rejected, dtype=torch.long),
            "margin": torch.tensor(margin, dtype=torch.float32),
            "weight": torch.tensor(weight, dtype=torch.float32),
        }


class RankingRewardTrainer(RewardTrainer):
    """``RewardTrainer`` whose batch elements are whole prompts (see the module docstring).

    Inputs are token ids or cached trunk states (see :class:`RankingCollator`).
    Logs, besides the loss: ``accuracy`` (share of the batch's pairs ordered as
    labelled), ``margin`` (mean r_c - r_r), ``mean_reward`` and ``completions``
    (sequences scored in the step).
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Examples are tokenised by rlhf_core.reward.data.encode_groups: one per prompt, not one per pair.
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(**{k: v for k, v in inputs.items() if k not in PAIR_KEYS}, use_cache=False)
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


class FiniteTrainingGuard(TrainerCallback):
    """Stops training at the first step whose loss or gradient norm is not finite.

    It reads the per-step log (``logging_steps=1``, and ``logging_nan_inf_filter``
    off: TRL's default would replace a NaN loss by the running mean and hide the
    divergence).  Under DDP every process logs the same gathered values, so all of
    them stop at the same step.
    """

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise ConfigError(diverged(self.learning_rate, f"{name} is {value} at step {state.global_step}"))


def diverged(learning_rate: float, what: str) -> str:
    return f"reward.learning_rate={learning_rate:g}: {what}; training stopped, no reward model saved or registered"


def check_finite_weights(model, learning_rate: float) -> None:
    """Refuse a trained model with any NaN or infinite weight (it would score NaN everywhere)."""
    state = model.state_dict()
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        what = f"{len(bad)} of {len(state)} weight tensors are not finite (first: {bad[0]})"
        raise ConfigError(diverged(learning_rate, what))


def check_scores(scores: torch.Tensor, heldout: torch.Tensor, learning_rate: float) -> None:
    """Refuse a model whose scores are not finite, or that gives every held-out completion the same score.

    A constant model orders no pair, yet its held-out accuracy is 0.5 by the
    tie-half rule and its normalisation falls back to scale 1: nothing downstream
    would notice.
    """
    if not torch.isfinite(scores).all():
        count = int((~torch.isfinite(scores)).sum())
        raise ConfigError(diverged(learning_rate, f"{count} of {scores.numel()} scores are not finite"))
    if heldout.numel() > 1 and bool((heldout == heldout[0]).all()):
        what = f"all {heldout.numel()} held-out completions score {float(heldout[0]):g} (a constant model)"
        raise ConfigError(diverged(learning_rate, what))


def trainer_args(cfg: RewardConfig, output_dir: Path) -> TRLRewardConfig:
    """TRL settings from ``params.yaml``'s ``reward`` section.

    TRL turns bf16 and gradient (activation) checkpointing on by default: bf16
    comes from ``reward.dtype`` instead (one numeric path on every CPU, see
    :mod:`rlhf_core.precision`), and checkpointing stays off - it would spend a second
    forward pass to save memory that a reward model this size does not need.
    Nothing is saved by the trainer: the stage saves the final model itself.
    """
    return TRLRewardConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.prompts_per_batch,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        bf16=cfg.dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,  # TRL's gradient_checkpointing=True, under its new name
        max_length=None,  # sequences are truncated (from the left) when tokenised
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length",
        ddp_find_unused_parameters=False,
        logging_steps=1,  # FiniteTrainingGuard checks every step's log
        logging_nan_inf_filter=False,
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
    scorer: object  # what scores fastest right after training: cached features (none), trunk states (freeze) or the model
    losses: list[tuple[int, float]]
    seconds: float
    steps: int
    trainable_parameters: int
    pairs: int = 0
    lengths: "LengthReport | None" = None


@dataclass(frozen=True)
class LengthReport:
    """How long the training conversations are, in tokens before any cut, against ``reward.max_length``."""

    max_length: int
    conversations: int
    cut: int
    p50: int
    p90: int
    p99: int
    longest: int

    @classmethod
    def of(cls, encoded) -> "LengthReport":
        ordered = sorted(encoded.lengths)

        def at(q: float) -> int:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return cls(encoded.max_length, len(ordered), encoded.truncated, at(0.5), at(0.9), at(0.99), ordered[-1])

    def note(self) -> str | None:
        """One line for the terminal when conversations had to be cut, naming the key that sets the length."""
        if not self.cut:
            return None
        share = self.cut / self.conversations
        return (
            f"{self.cut} of {self.conversations} training conversations ({share:.0%}) exceed reward.max_length="
            f"{self.max_length} tokens (median {self.p50}, 90th percentile {self.p90}, longest {self.longest}): "
            "they lose whole turns from the start of the prompt, never the final answer"
        )


def probe_pairs(examples: list[dict], features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(chosen features, rejected features, margins, weights) of every pair of ``examples``."""
    chosen, rejected, margin, weight = [], [], [], []
    for example in examples:
        completions = example["completions"]
        chosen += [completions[i] for i in example["chosen"]]
        rejected += [completions[i] for i in example["rejected"]]
        margin += example["margin"]
        weight += example["weight"]
    return features[chosen], features[rejected], torch.tensor(margin), torch.tensor(weight)


def init_head_as_probe(model, features: torch.Tensor, examples: list[dict], l2: float) -> list[tuple[int, float]]:
    """Set the head to the linear probe fitted on the training pairs' final features (LP-FT); returns its loss curve."""
    chosen, rejected, margin, weight = probe_pairs(examples, features)
    losses: list[float] = []
    with torch.no_grad():
        reward_head(model).weight.copy_(fit_linear_head(chosen, rejected, margin, weight, l2, losses)[None])
    return list(enumerate(losses, start=1))


def fit_reward_model(base_model: str | Path, cfg: RewardConfig, groups: list[PromptComparisons], output_dir: Path) -> FitResult:
    """Train a reward model on ``groups`` (every process of a distributed launch calls this).

    ``mode: none`` fits the head alone, as a linear probe on streamed last-token
    features; ``freeze`` runs the frozen layers once per completion into a
    :class:`~rlhf_core.reward.trunk.StateFile` on disk and trains the layers above
    on it (:mod:`rlhf_core.reward.trunk`); with ``head_init: probe`` the head
    starts as a linear probe (:mod:`rlhf_core.reward.probe`).  Under DDP each
    process runs that one-off pass over all training completions (it is not
    sharded); the training steps are.
    """
    tokenizer = reward_tokenizer(base_model, cfg.max_length)
    model, peft_config = build_reward_model(base_model, tokenizer, cfg)
    encoded = encode_groups(tokenizer, [g for g in groups if g.comparisons], cfg.read_stop_token)
    sequences, examples = encoded.sequences, encoded.examples
    if not examples:
        raise DataError("no training pairs")
    args = trainer_args(cfg, output_dir)
    model.to(args.device)  # the trunk pass and the probe run before the trainer would move the model
    fit = fit_head_only if cfg.mode == "none" else fit_with_trainer
    result = fit(model, peft_config, tokenizer, cfg, args, sequences, examples)
    result.pairs, result.lengths = num_pairs(groups), LengthReport.of(encoded)
    return result


def fit_head_only(model, peft_config, tokenizer, cfg: RewardConfig, args, sequences, examples) -> FitResult:
    """``mode: none``: the head as a linear probe on the model's last-token features; no trainer steps."""
    start = time.perf_counter()
    batch = cfg.score_batch_size
    with autocast(cfg.dtype, args.device):
        features = last_token_features(model, sequences, tokenizer.pad_token_id, batch, desc="features")
    losses = init_head_as_probe(model, features, examples, cfg.probe_l2)
    check_finite_weights(model, cfg.learning_rate)
    cache = {tuple(seq): feature for seq, feature in zip(sequences, features)}
    scorer = FeatureScorer(model, tokenizer, cache, cfg.read_stop_token)
    return FitResult(model, tokenizer, scorer, losses, time.perf_counter() - start, 0, reward_head(model).weight.numel())


def fit_with_trainer(model, peft_config, tokenizer, cfg: RewardConfig, args, sequences, examples) -> FitResult:
    """``mode: full | freeze | lora``: TRL's trainer on whole prompts, after the trunk pass and the probe."""
    from datasets import Dataset

    batch = cfg.score_batch_size
    frozen = cfg.mode == "freeze"
    # Without frozen layers the trunk is the embeddings alone: states for the probe, not for training.
    trunk = FrozenTrunk(model, cfg.freeze_layers if frozen else 0)
    states = StateFile(args.output_dir, model.config.hidden_size)
    probe_losses: list[tuple[int, float]] = []
    # The trainer autocasts its own passes; these run before it, in the same path, so cached states match a full pass.
    with autocast(cfg.dtype, args.device):
        if frozen or cfg.head_init == "probe":
            trunk.states(sequences, tokenizer.pad_token_id, batch, into=states, desc="frozen layers")
        if cfg.head_init == "probe":
            features = trunk.final_features(states, sequences, batch)
            probe_losses = init_head_as_probe(model, features, examples, cfg.probe_l2)
    inputs = TrunkStateInputs(states, sequences) if frozen else TokenInputs(sequences, tokenizer.pad_token_id)
    trainer = RankingRewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        data_collator=RankingCollator(inputs),
        peft_config=peft_config,
        callbacks=[FiniteTrainingGuard(cfg.learning_rate)],
    )
    trainable = trainable_parameters(trainer.model)
    with trunk.upper() if frozen else nullcontext():
        output = trainer.train()
    model = trainer.model
    if peft_config is not None:
        model = model.merge_and_unload()
    check_finite_weights(model, cfg.learning_rate)
    if frozen:
        scorer = CachedTrunkScorer(trunk, tokenizer, states, cfg.read_stop_token)
    else:
        states.close()
        scorer = RewardModel(model, tokenizer, reads_stop_token=cfg.read_stop_token, dtype=cfg.dtype)
    losses = [(int(row["step"]), float(row["loss"])) for row in trainer.state.log_history if "loss" in row]
    return FitResult(
        model=model,
        tokenizer=tokenizer,
        scorer=scorer,
        losses=losses or probe_losses,
        seconds=float(output.metrics["train_runtime"]),
        steps=int(output.global_step),
        trainable_parameters=trainable,
    )


def loss_window(losses: list[tuple[int, float]]) -> int:
    """Steps averaged for the first and last loss: a tenth of the curve, between 1 and 50 steps.

    One step's loss on four prompts is noise (0.48 then 0.58 on a curve whose
    60-step means fall); a window shows the trend.
    """
    return max(1, min(50, len(losses) // 10))


def loss_first_last(losses: list[tuple[int, float]]) -> tuple[float | None, float | None]:
    """Mean loss over the first and over the last :func:`loss_window` steps."""
    if not losses:
        return None, None
    window = loss_window(losses)
    values = [loss for _, loss in losses]
    return sum(values[:window]) / window, sum(values[-window:]) / window
