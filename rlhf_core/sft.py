"""Supervised fine-tuning of the policy on demonstrations, with TRL's ``SFTTrainer``.

* **What the model reads.**  Each demonstration becomes the token ids the policy
  sees and writes when it is sampled: the prompt exactly as the sampler encodes it
  (:func:`rlhf_core.generation.encode_queries`: chat template, system turn,
  assistant turn opened), then the answer and the stop token the sampler stops
  on.  The rows are handed to TRL already tokenised with a ``completion_mask``,
  from which TRL builds labels of -100 over the prompt (``completion_only_loss``):
  the loss falls on the answer tokens only.
* **What trains**: every weight, the layers above ``freeze_layers``, or LoRA
  adapters on them (``sft.mode``, named as ``ppo.mode``); adapters are merged
  before the model is saved.
* **The numeric path**: ``sft.dtype``.  TRL turns bf16 and gradient
  checkpointing on by default; here bf16 is on only when ``dtype`` says so
  (:mod:`rlhf_core.precision`), and checkpointing is off (it spends a second
  forward pass to save memory a 135M model does not need).
* **Simulated demonstrations** (``sft.source: simulated``): the gold-best of n
  base-model samples per training prompt, as rejection-sampling fine-tuning
  does (Touvron et al. 2023, Llama 2 section 3.2.3).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.config import SFTConfig
from rlhf_core.demonstrations import DemonstrationSet
from rlhf_core.errors import ConfigError, DataError
from rlhf_core.generation import chat_prompt
from rlhf_core.importers.assemble import content_id
from rlhf_core.schemas import Demonstration, Prompt

#: linear layers of a Llama-style decoder that get LoRA adapters (as in the PPO stage)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- data ----------------------------------------------------------------------------------------------------------


def encode_demonstration(tokenizer, prompt: str, completion: str) -> dict[str, list[int]]:
    """``input_ids`` and ``completion_mask`` (0 on the prompt, 1 on the answer and its stop token)."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    answer_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)}


def split_by_prompt(
    demonstrations: list[Demonstration], validation_fraction: float, seed: int
) -> tuple[list[Demonstration], list[Demonstration]]:
    """Training and validation demonstrations, whole prompts held out (at least one when there are two or more)."""
    prompt_ids = sorted({demo.prompt_id for demo in demonstrations})
    random.Random(seed).shuffle(prompt_ids)
    held = min(len(prompt_ids) - 1, max(1, round(validation_fraction * len(prompt_ids)))) if len(prompt_ids) > 1 else 0
    validation_ids = set(prompt_ids[:held])
    train = [demo for demo in demonstrations if demo.prompt_id not in validation_ids]
    validation = [demo for demo in demonstrations if demo.prompt_id in validation_ids]
    return train, validation


def best_of_n_demonstrations(
    base_model: str | Path, prompts: list[Prompt], cfg: SFTConfig
) -> tuple[DemonstrationSet, dict[str, float]]:
    """The gold-best of ``cfg.simulated.n`` base-model samples per prompt, a finished one over any cut-off one.

    Returns the demonstrations (origins ``simulated:best_of_<n>``, line = prompt
    position) and what the choice did: the gold score of the chosen samples next
    to that of a random one (the first sample), and how many of each ended.
    """
    from rlhf_core.generation import load_policy, sample_completions
    from rlhf_core.gold import gold_score

    n = cfg.simulated.n
    chosen_prompts = prompts[: cfg.simulated.prompts]
    model, tokenizer = load_policy(base_model, dtype=cfg.dtype)
    samples, _ = sample_completions(
        model, tokenizer, [p.text for p in chosen_prompts], num_samples=n, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, batch_size=cfg.sample_batch_size, seed=cfg.seed, desc="best-of-n demonstrations",
    )  # fmt: skip
    origin = f"simulated:best_of_{n}"
    out = DemonstrationSet()
    first, best = [], []
    for index, prompt in enumerate(chosen_prompts):
        pool = [s for s in samples[index * n : (index + 1) * n] if s.text.strip()]
        out.rows += 1
        if not pool:
            continue
        scored = [(s.finished, gold_score(prompt.text, s.text), s) for s in pool]
        finished, gold, sample = max(scored, key=lambda item: item[:2])
        first.append(scored[0])
        best.append((finished, gold))
        demo = Demonstration(
            id=content_id("d", prompt.id, prompt.text, sample.text), prompt_id=prompt.id, prompt=prompt.text,
            completion=sample.text, source=origin,
        )  # fmt: skip
        out.demonstrations.append(demo)
        out.origins[demo.id] = (origin, index + 1)
    if not best:
        raise DataError(f"sft.source=simulated: every base-model sample of {len(chosen_prompts)} prompts was empty")
    stats = {
        "gold_best": statistics.fmean(g for _, g in best),
        "gold_first": statistics.fmean(g for _, g, _ in first),
        "finished_best": statistics.fmean(f for f, _ in best),
        "finished_first": statistics.fmean(f for f, _, _ in first),
    }
    return out, stats


# --- model and trainer ---------------------------------------------------------------------------------------------


def prepare_policy(base_model: str | Path, cfg: SFTConfig):
    """The policy to fine-tune (fp32 weights) and the PEFT config for ``mode: lora`` (else None)."""
    from rlhf_core.base_model import frozen_layers, load_causal_lm

    model = load_causal_lm(base_model, dtype="float32")
    layers = model.model.layers
    if cfg.mode == "full":
        return model, None
    frozen_layers("sft.freeze_layers", cfg.freeze_layers, len(layers))
    if cfg.mode == "lora":
        from peft import LoraConfig

        config = LoraConfig(
            task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
            layers_to_transform=list(range(cfg.freeze_layers, len(layers))), layers_pattern="layers", bias="none",
        )  # fmt: skip
        return model, config
    # Embeddings (tied to the output head in SmolLM2) and the lower layers stay as they are: no backward pass
    # through them and no optimiser state, which is what makes a 135M model trainable on two CPU cores.
    for module in (model.get_input_embeddings(), model.get_output_embeddings(), *layers[: cfg.freeze_layers]):
        module.requires_grad_(False)
    return model, None


def trainer_args(cfg: SFTConfig, output_dir: Path):
    """TRL's SFT settings from ``params.yaml``'s ``sft`` section (nothing saved by the trainer: the stage saves)."""
    import torch
    from trl import SFTConfig as TRLSFTConfig

    return TRLSFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=False,
        bf16=cfg.dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be replaced by the running mean
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        log_level="warning",
        disable_tqdm=True,
    )


@dataclass
class SFTFit:
    model: object  # the fine-tuned causal LM, adapters merged
    tokenizer: object
    losses: list[tuple[int, float]]
    heldout_loss_before: float | None
    heldout_loss_after: float | None
    train_examples: int
    heldout_examples: int
    train_answer_tokens: int
    truncated: int
    steps: int
    seconds: float
    trainable_parameters: int

    @property
    def heldout_perplexity(self) -> float | None:
        """exp of the held-out loss (mean negative log-likelihood per answer token)."""
        return math.exp(self.heldout_loss_after) if self.heldout_loss_after is not None else None


def build_trainer(base_model: str | Path, cfg: SFTConfig, train: list[Demonstration], validation: list[Demonstration], output_dir: Path):
    """TRL's ``SFTTrainer`` over the encoded demonstrations; also returns how many examples ``max_length`` cut."""
    from datasets import Dataset
    from trl import SFTTrainer

    from rlhf_core.base_model import load_tokenizer

    tokenizer = load_tokenizer(base_model)
    encode = lambda demos: [encode_demonstration(tokenizer, d.prompt, d.completion) for d in demos]  # noqa: E731
    train_rows, validation_rows = encode(train), encode(validation)
    truncated = sum(len(row["input_ids"]) > cfg.max_length for row in train_rows)
    model, peft_config = prepare_policy(base_model, cfg)
    trainer = SFTTrainer(
        model=model,
        args=trainer_args(cfg, output_dir),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(validation_rows) if validation_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return trainer, truncated


def fit_sft(base_model: str | Path, cfg: SFTConfig, train: list[Demonstration], validation: list[Demonstration], output_dir: Path) -> SFTFit:
    """Fine-tune the base model on ``train``; held-out loss on ``validation`` before and after."""
    if not train:
        raise DataError("no demonstrations to train on")
    trainer, truncated = build_trainer(base_model, cfg, train, validation, output_dir)
    evaluate = (lambda: float(trainer.evaluate()["eval_loss"])) if validation else (lambda: None)
    before = evaluate()
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    losses = [(int(row["step"]), float(row["loss"])) for row in trainer.state.log_history if "loss" in row]
    bad = [step for step, loss in losses if not math.isfinite(loss)]
    if bad:
        raise ConfigError(f"sft.learning_rate={cfg.learning_rate:g}: the loss is not finite at step {bad[0]}; no model saved")
    after = evaluate()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    model = trainer.model
    if cfg.mode == "lora":
        model = model.merge_and_unload()
    labels = trainer.train_dataset["labels"]
    return SFTFit(
        model=model,
        tokenizer=trainer.processing_class,
        losses=losses,
        heldout_loss_before=before,
        heldout_loss_after=after,
        train_examples=len(trainer.train_dataset),
        heldout_examples=len(validation),
        train_answer_tokens=sum(label != -100 for row in labels for label in row),
        truncated=truncated,
        steps=int(output.global_step),
        seconds=seconds,
        trainable_parameters=trainable,
    )


# --- gold comparison -----------------------------------------------------------------------------------------------


def gold_comparison(sft_model: str | Path, base_model: str | Path, prompts: list[str], cfg: SFTConfig) -> dict[str, float]:
    """Gold score of the SFT model's samples against the base model's on the same prompts, paired, with 95% intervals.

    ``win_rate_vs_base`` counts a tie as half a win (Wilson interval);
    ``gold_gain`` is the mean per-prompt difference (normal interval), as the
    evaluation stage reports its candidate against its reference.
    """
    from rlhf_core.evaluation.metrics import win_rate
    from rlhf_core.evaluation.overoptimisation import paired_gain
    from rlhf_core.generation import load_policy, sample_completions
    from rlhf_core.gold import gold_score

    scores, metrics = {}, {}
    for name, path in (("sft", sft_model), ("base", base_model)):
        model, tokenizer = load_policy(path, dtype=cfg.dtype)
        samples, _ = sample_completions(
            model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            batch_size=cfg.sample_batch_size, seed=cfg.seed, desc=f"{name} samples",
        )  # fmt: skip
        scores[name] = [gold_score(prompt, s.text) for prompt, s in zip(prompts, samples)]
        metrics.update({
            f"{name}_gold": statistics.fmean(scores[name]),
            f"{name}_finished_rate": statistics.fmean(s.finished for s in samples),
            f"{name}_mean_tokens": statistics.fmean(s.num_tokens for s in samples),
        })  # fmt: skip
    metrics.update(win_rate(scores["sft"], scores["base"]).as_metrics("gold_win_rate_vs_base"))
    gain = paired_gain(scores["sft"], scores["base"])
    metrics.update({"gold_gain": gain.mean, "gold_gain_low": gain.low, "gold_gain_high": gain.high})
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
