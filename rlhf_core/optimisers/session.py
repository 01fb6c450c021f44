"""What every TRL-backed optimiser shares: the starting policy, TRL's arguments, a curve row per update, the export.

A run here is one TRL ``train()``.  :class:`UpdateCurve` (a TRL callback) turns
each logging step - set to one update - into a row like PPO's: ``update`` and
``<algorithm>/<column>`` for the curve columns the algorithm has a value for,
plus TRL's own log under ``<algorithm>/trl/<name>``.  The gold slice
(:class:`GoldSlice`) is PPO's: the same fixed eval prompts and sampling seed
before training, every ``ppo.gold_eval_every`` updates and at the end.

KL in the curve is nats per response, as PPO's: TRL logs the mean per token,
and mean per token x mean completion length = total KL / responses.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_core.config import PPOConfig
from rlhf_core.precision import default_device

#: score_fn(prompts, responses, finished) -> one proxy score per response (the reward model, normalised)
ScoreFn = Callable[[list[str], list[str], list[bool]], torch.Tensor]
#: one curve row: {"update": n, "<algorithm>/<name>": value, ...}
Row = dict[str, float]


# --------------------------------------------------------------------------- the starting policy


def load_start_policy(path: str | Path, cfg: PPOConfig):
    """The starting policy (fp32) with ``ppo.mode`` applied: (model, peft LoraConfig or None for TRL to wrap it).

    ``freeze``: embeddings, the lower ``freeze_layers`` layers and the LM head stay
    fixed, as in PPO; ``lora``: TRL wraps the model in adapters on the layers
    above them, and its reference is the model with the adapters switched off.
    """
    from rlhf_core.base_model import frozen_layers, load_causal_lm
    from rlhf_core.decoder import decoder_parts

    model = load_causal_lm(path, dtype="float32")
    parts = decoder_parts(model)
    layers = len(parts.layers)
    if cfg.mode != "full":
        frozen_layers("ppo.freeze_layers", cfg.freeze_layers, layers)
    if cfg.mode == "freeze":
        model.requires_grad_(False)
        parts.layers[cfg.freeze_layers :].requires_grad_(True)
        parts.norm.requires_grad_(True)
    return model, lora_config(cfg, layers) if cfg.mode == "lora" else None


def lora_config(cfg: PPOConfig, layers: int):
    from peft import LoraConfig

    from rlhf_core.ppo.policy import LORA_TARGETS

    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
        layers_to_transform=list(range(cfg.freeze_layers, layers)), layers_pattern="layers", bias="none",
        task_type="CAUSAL_LM",
    )  # fmt: skip


def training_arguments(cfg: PPOConfig, output_dir: Path, *, steps: int, logging_steps: int, learning_rate: float) -> dict:
    """The TrainingArguments every optimiser takes from ``ppo:`` (TRL's own defaults differ: bf16 on, lr 1e-6)."""
    return dict(
        output_dir=str(output_dir),
        max_steps=steps,
        logging_steps=logging_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_epsilon=cfg.adam_eps,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.dtype == "bfloat16",  # the dtype rule (rlhf_core/precision.py): fp32 weights, bf16 autocast
        use_cpu=default_device().type == "cpu",
        gradient_checkpointing=False,  # PPO does not trade compute for memory either
        disable_dropout=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def export_policy(model, tokenizer, out_dir: str | Path) -> None:
    """Save the trained policy as a plain causal LM (LoRA merged) through the project's model-folder writer."""
    from rlhf_core.base_model import save_model_folder

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    save_model_folder(model, tokenizer, out_dir)


# --------------------------------------------------------------------------- gold slice


@dataclass
class GoldSlice:
    """Mean gold and proxy score of the policy's responses on a fixed prompt slice (PPO's GoldProbe, for an HF model).

    With a ``reference`` model it also measures the sequence KL(policy || reference)
    on those samples (log p - log p_ref of each response, as evaluate does): the
    KL of an algorithm that samples nothing while it trains (DPO).
    """

    prompts: Sequence[str]
    gold_fn: Callable[[str, str], float]
    proxy_fn: ScoreFn
    seed: int
    max_new_tokens: int
    temperature: float
    reference: object | None = None

    def measure(self, model, tokenizer) -> dict[str, float]:
        from rlhf_core.generation import sample_completions

        was_training = model.training
        model.eval()
        try:
            samples, _ = sample_completions(
                model, tokenizer, list(self.prompts), max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                batch_size=len(self.prompts), seed=self.seed,
            )  # fmt: skip
        finally:
            model.train(was_training)
        samples = sorted(samples, key=lambda s: s.prompt_index)  # the slice's order: per-prompt values pair up
        prompts = [self.prompts[s.prompt_index] for s in samples]
        texts = [s.text for s in samples]
        gold = [self.gold_fn(p, t) for p, t in zip(prompts, texts)]
        proxy = torch.as_tensor(self.proxy_fn(prompts, texts, [s.finished for s in samples])).reshape(-1).tolist()
        out = {
            "gold": statistics.fmean(gold), "gold_proxy": statistics.fmean(proxy),
            "gold_per_prompt": gold, "gold_proxy_per_prompt": proxy,
        }  # fmt: skip
        if self.reference is not None:
            out["kl"] = statistics.fmean(self._kl(model, tokenizer, prompts, [s.token_ids for s in samples]))
        return out

    def _kl(self, model, tokenizer, prompts: list[str], responses: list[list[int]]) -> list[float]:
        from rlhf_core.evaluation.likelihood import response_logprobs

        options = dict(temperature=self.temperature, batch_size=len(prompts))
        own = response_logprobs(model, tokenizer, prompts, responses, **options)
        ref = response_logprobs(self.reference, tokenizer, prompts, responses, **options)
        return [a - b for a, b in zip(own, ref)]


# --------------------------------------------------------------------------- the curve


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass
class UpdateCurve:
    """Builds the curve of a TRL run: a row 0 (gold before training), then one row per update.

    ``columns(logs, seconds)`` maps one update's TRL log to curve values (None
    where the algorithm has none).  ``callback()`` is the TRL callback that feeds it.
    """

    algorithm: str
    steps_per_update: int
    updates: int
    beta: float
    columns: Callable[[dict, float], dict[str, float | None]]
    gold: GoldSlice | None = None
    gold_every: int = 1
    on_update: Callable[[Row], None] = lambda row: None
    history: list[Row] = field(default_factory=list)

    def _row(self, update: int, values: dict) -> Row:
        return {"update": update, **{f"{self.algorithm}/{k}": float(v) for k, v in values.items() if _numeric(v)}}

    def _add(self, row: Row) -> None:
        self.history.append(row)
        self.on_update(row)

    def begin(self, model, tokenizer) -> None:
        if self.gold is not None:
            # Before any update the policy is the reference: KL 0 by definition, the gold baseline of the run.
            row = self._row(0, {"kl": 0.0, "beta": self.beta})
            row.update({f"{self.algorithm}/{k}": v for k, v in self.gold.measure(model, tokenizer).items()})
            self._add(row)

    def logged(self, step: int, logs: dict, seconds: float, model, tokenizer) -> None:
        if step % self.steps_per_update or "loss" not in logs:  # the summary TRL logs after training has no loss
            return
        update = step // self.steps_per_update
        row = self._row(update, self.columns(logs, seconds))
        row.update({f"{self.algorithm}/trl/{k}": float(v) for k, v in logs.items() if _numeric(v)})
        if self.gold is not None and (update % self.gold_every == 0 or update == self.updates):
            row.update({f"{self.algorithm}/{k}": v for k, v in self.gold.measure(model, tokenizer).items()})
        self._add(row)

    def callback(self, tokenizer):
        from transformers import TrainerCallback

        curve = self

        class Recorder(TrainerCallback):
            """Hands each logged update (and the start) to the curve; times updates without the gold slice."""

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                curve.begin(model, tokenizer)
                self.tick = time.perf_counter()

            def on_log(self, args, state, control, logs=None, model=None, **kwargs):
                seconds = time.perf_counter() - self.tick
                curve.logged(state.global_step, logs or {}, seconds, model, tokenizer)
                self.tick = time.perf_counter()

        return Recorder()


def per_response_kl(logs: dict) -> float | None:
    """TRL's mean KL per token x mean completion length: the mean KL per response, in nats."""
    if "kl" not in logs or "completions/mean_length" not in logs:
        return None
    return logs["kl"] * logs["completions/mean_length"]


def summary(algorithm: str, history: list[Row]) -> dict[str, float]:
    """Final and median figures of a TRL run for ``metrics/ppo.json`` (under ``<algorithm>/``)."""
    a = algorithm
    updates = [row for row in history if row["update"] > 0]
    gold = [row for row in history if f"{a}/gold" in row]
    out: dict[str, float] = {f"{a}/updates": updates[-1]["update"] if updates else 0}
    for name in ("kl", "beta", "score", "rlhf_reward", "entropy", "response_length"):
        if updates and f"{a}/{name}" in updates[-1]:
            out[f"{a}/final_{name}"] = updates[-1][f"{a}/{name}"]
    for name in ("seconds_per_update", "tokens_per_second"):
        values = [row[f"{a}/{name}"] for row in updates if f"{a}/{name}" in row]
        if values:
            out[f"{a}/{name}_median"] = statistics.median(values)
    if gold:
        out.update({
            f"{a}/gold_start": gold[0][f"{a}/gold"], f"{a}/gold_end": gold[-1][f"{a}/gold"],
            f"{a}/gold_proxy_start": gold[0][f"{a}/gold_proxy"], f"{a}/gold_proxy_end": gold[-1][f"{a}/gold_proxy"],
        })  # fmt: skip
    return out


@dataclass
class Trained:
    """What a run hands back to the stage: the policy (ready to export), its tokenizer and the curve."""

    model: object
    tokenizer: object
    history: list[Row]
    trainable_parameters: int
