"""The layout of a decoder-only LM, its decode step, and a copy of its weights for sampling.

:func:`decoder_parts` is the one place that knows where a Llama-style causal LM
keeps its embeddings, decoder layers, final norm, rotary embedding and LM head
(Llama, Mistral, Qwen2 and SmolLM share it); PPO and the reward model split
off their frozen lower layers through it.  :class:`DecodeStep` is one step of
the project's sampling loop (:func:`rlhf_core.generation.sample_tokens`), and
:class:`SamplingCopy` the bf16 weights that PPO's rollouts sample from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_core.errors import RLHFError


@dataclass
class DecoderParts:
    """Handles on the modules of a Llama-style causal LM (Llama, Mistral, Qwen2 and SmolLM share the layout)."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Module  # a causal LM's LM head, or a sequence classifier's ``score``
    config: object


def decoder_parts(model) -> DecoderParts:
    """The parts of a causal LM or a sequence classifier on one (peft-wrapped or not); an :class:`RLHFError`
    naming the model if it has another layout."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None)
    head = getattr(inner, "lm_head", None)
    head = getattr(inner, "score", None) if head is None else head
    names = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or not all(hasattr(body, n) for n in names) or head is None:
        raise RLHFError(
            f"{type(inner).__name__}: needs a decoder-only LM laid out like Llama "
            "(model.embed_tokens, model.layers, model.norm, model.rotary_emb, and lm_head or score)"
        )
    return DecoderParts(body.embed_tokens, body.layers, body.norm, body.rotary_emb, head, inner.config)


class DecodeStep:
    """One step of a causal LM over a KV cache: ``step(input_ids, attention_mask, position_ids, cache)`` gives the
    next-token logits of every row and appends the new positions to ``cache``.

    This one runs the model's own forward over a ``DynamicCache``, logits of the
    last position only.
    """

    def __init__(self, model, config=None):
        self.model, self.config = model, config if config is not None else model.config

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1]


class SamplingCopy:
    """The decoder's weights in another dtype, for sampling only, kept in step with the trained weights.

    ``copy.parts`` are the embeddings, layers, final norm and LM head of ``parts``
    cast to ``dtype`` (the rotary embedding is shared: its frequencies stay
    fp32).  Frozen weights are cast once; :meth:`refresh` copies the trainable
    ones (and LoRA adapters) into the copy, one cast per rollout instead of one
    per weight and decode step as autocast would do.  Not an ``nn.Module``: the
    copy never shows up among the policy's parameters or in a checkpoint.
    """

    def __init__(self, parts: DecoderParts, dtype: torch.dtype):
        import copy

        source = nn.ModuleDict({"embed": parts.embed, "layers": parts.layers, "norm": parts.norm, "lm_head": parts.lm_head})
        target = copy.deepcopy(source).to(dtype)  # one deepcopy: a tied embedding and LM head stay tied
        target.requires_grad_(False)
        self.parts = DecoderParts(target["embed"], target["layers"], target["norm"], parts.rotary, target["lm_head"], parts.config)
        pairs = zip(source.named_parameters(), target.named_parameters(), strict=True)
        self._trained = [(src, dst) for (_, src), (_, dst) in pairs if src.requires_grad]

    @torch.no_grad()
    def refresh(self) -> None:
        for src, dst in self._trained:
            dst.copy_(src)
