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
import torch.nn.functional as F
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

    def prefill(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """The prompts' pass: like a step, but rows of very different lengths run in groups of similar length
        (:func:`prefill_groups`), each trimmed to its own width, and their caches are left-padded back into one
        batch - a left-padded prompt batch is otherwise mostly padding, and prefill is compute-bound."""
        groups = prefill_groups(attention_mask.sum(-1).tolist())
        if len(groups) == 1:
            return self(input_ids, attention_mask, position_ids, cache)
        width, parts, logits = input_ids.shape[1], [], []
        for rows in groups:
            index = torch.tensor(rows, device=input_ids.device)
            start = width - int(attention_mask[index].sum(-1).max())  # the group's leading all-padding columns
            part = self.new_cache()
            logits.append(self(input_ids[index, start:], attention_mask[index, start:], position_ids[index, start:], part))
            parts.append((start, part))
        if not all(type(layer).__name__ == "DynamicLayer" for _, part in parts for layer in part.layers):
            cache_type = type(parts[0][1].layers[0]).__name__
            raise RLHFError(f"grouped prefill needs a DynamicCache of full-attention layers, not {cache_type}")
        back = torch.argsort(torch.tensor([row for rows in groups for row in rows], device=input_ids.device))
        for layer in range(len(parts[0][1].layers)):
            keys = torch.cat([F.pad(part.layers[layer].keys, (0, 0, start, 0)) for start, part in parts])
            values = torch.cat([F.pad(part.layers[layer].values, (0, 0, start, 0)) for start, part in parts])
            cache.update(keys[back], values[back], layer)
        return torch.cat(logits)[back]


#: Padding share a prefill group may carry before a longer row starts a new group, and the smallest group.
PREFILL_PADDING, PREFILL_MIN_ROWS = 0.25, 8


def prefill_groups(lengths: list[int], padding: float = PREFILL_PADDING, min_rows: int = PREFILL_MIN_ROWS) -> list[list[int]]:
    """Row indexes in groups of similar length, shortest first: a group grows while its padded size (rows x its
    longest row) stays within ``1 + padding`` of its real tokens, and always to ``min_rows`` rows."""
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for row in sorted(range(len(lengths)), key=lambda r: lengths[r]):
        grown = len(current) + 1
        if len(current) >= min_rows and grown * lengths[row] > (1 + padding) * (real + lengths[row]):
            groups.append(current)
            current, real = [], 0
        current.append(row)
        real += lengths[row]
    return groups + [current] if current else groups


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
