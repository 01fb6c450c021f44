"""A reward model to train: the base LM with a fresh scalar head, and the part of it that learns.

``reward.mode`` chooses what trains:

* ``full`` - every weight;
* ``freeze`` - all but the embeddings and the lower ``reward.freeze_layers``
  decoder layers.  The frozen part needs no backward pass and no optimiser
  state, which is what makes a 135M model trainable on two CPU cores;
* ``lora`` - low-rank adapters on every linear layer plus the head (PEFT),
  merged back into the weights before saving;
* ``none`` - the head alone, fitted as a linear probe on the frozen features.

``reward.read_layer`` cuts the model at a lower layer first.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf_core.config import RewardConfig
from rlhf_core.decoder import decoder_parts
from rlhf_core.errors import RLHFError


def load_sequence_classifier(base_model: str | Path, pad_token_id: int):
    """The base causal LM as ``AutoModelForSequenceClassification`` with one label (its LM head is dropped)."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    # The new head is missing from the checkpoint and its LM head is unused: both expected, so not reported.
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model, num_labels=1, use_safetensors=True, dtype=torch.float32
        )
    model.config.pad_token_id = pad_token_id
    return model


def reward_head(model) -> torch.nn.Linear:
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise RLHFError(f"{type(model).__name__}: expected a decoder model with a linear `score` head")
    return head


def init_reward_head(model, seed: int) -> None:
    """Head weights ~ N(0, 1/sqrt(d_model + 1)), as OpenAI's lm-human-preferences (Huang et al. 2024, detail 1).

    Initial rewards then have roughly unit scale whatever the width of the model.
    """
    head = reward_head(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        std = 1.0 / math.sqrt(head.in_features + 1)
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        if head.bias is not None:
            head.bias.zero_()


def freeze_lower_layers(model, count: int) -> int:
    """Freeze the input embeddings and the lower ``count`` decoder layers (at least one must stay above them)."""
    from rlhf_core.base_model import frozen_layers

    layers = decoder_parts(model).layers
    count = frozen_layers("reward.freeze_layers", count, len(layers))
    for module in (model.get_input_embeddings(), *layers[:count]):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return count


def lora_config(cfg: RewardConfig):
    """LoRA on every linear layer; the task type makes PEFT train and save the ``score`` head in full."""
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear")


def keep_lower_layers(model, count: int) -> None:
    """Drop the decoder layers above the lower ``count``: the head then reads layer ``count`` through the final norm.

    Mid-depth features of a small LM order human preferences better than its last
    layer, which is tuned to predict the next token (bench/README.md, reward_real);
    the saved model is that much cheaper to run in every later stage.
    """
    layers = decoder_parts(model).layers
    if count > len(layers):
        raise RLHFError(f"reward.read_layer={count}, but the base model has {len(layers)} decoder layers")
    model.model.layers = layers[:count]
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]


def build_reward_model(base_model: str | Path, tokenizer, cfg: RewardConfig):
    """(model, peft_config or None): the base LM with a fresh head, its trainable part set per ``cfg.mode``."""
    model = load_sequence_classifier(base_model, tokenizer.pad_token_id)
    if cfg.read_layer is not None:
        keep_lower_layers(model, cfg.read_layer)
    init_reward_head(model, cfg.seed)
    if cfg.mode == "freeze":
        freeze_lower_layers(model, cfg.freeze_layers)
    elif cfg.mode == "none":
        model.requires_grad_(False)
        reward_head(model).requires_grad_(True)
    return model, (lora_config(cfg) if cfg.mode == "lora" else None)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
