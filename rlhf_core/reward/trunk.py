"""The frozen lower part of the reward model, run once per completion.

With ``reward.finetune: freeze`` the embeddings and the lower N decoder layers
never change, so their output for a completion is the same in every epoch and
in the scoring that follows: :class:`FrozenTrunk` computes it once, without
gradients, and training runs only the upper layers on the cached states.  On
SmolLM2-135M with 24 of 30 layers frozen that is a fifth of a forward pass
per completion and step instead of a whole one.

The split is done by swapping the decoder's layer list, so the model that
trains (and that DDP wraps) is the same ``AutoModelForSequenceClassification``
object - with the lower layers held out - fed ``inputs_embeds``.  The upper
part reads left-padded states with explicit position ids: the sequence head
then finds every sequence's last token at the last position, and positions are
those the full model would use, so scores equal the full model's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rlhf_core.reward.build import decoder_layers
from rlhf_core.reward.model import encode_conversations, finished_flags, pad_right, scores_in_length_order


class _InputsEmbedsPaddingNote(logging.Filter):
    """transformers warns that ``inputs_embeds`` hide padding from the head; left padding makes that moot here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not detect padding tokens in `inputs_embeds`" not in record.getMessage()


logging.getLogger("transformers.modeling_layers").addFilter(_InputsEmbedsPaddingNote())


def pad_left_states(states: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs_embeds`` (B, T, d) left-padded with zeros, its attention mask and the position ids of the real tokens."""
    width = max(s.shape[0] for s in states)
    embeds = states[0].new_zeros((len(states), width, states[0].shape[1]))
    mask = torch.zeros((len(states), width), dtype=torch.long)
    for row, state in enumerate(states):
        embeds[row, width - state.shape[0] :] = state
        mask[row, width - state.shape[0] :] = 1
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


class FrozenTrunk:
    """Embeddings plus the lower ``num_layers`` decoder layers of ``model``, with helpers to run either part alone."""

    def __init__(self, model, num_layers: int):
        self.model = model
        self.layers = decoder_layers(model)
        self.num_layers = min(num_layers, len(self.layers))
        self.norm = model.model.norm

    @contextmanager
    def _view(self, layers: list, norm) -> Iterator[None]:
        decoder = self.model.model
        decoder.layers, decoder.norm = torch.nn.ModuleList(layers), norm
        try:
            yield
        finally:
            decoder.layers, decoder.norm = self.layers, self.norm

    @contextmanager
    def upper(self) -> Iterator[None]:
        """The model without its frozen lower layers: it reads :meth:`states` through ``inputs_embeds``."""
        with self._view(list(self.layers)[self.num_layers :], self.norm):
            yield

    @torch.no_grad()
    def states(self, sequences: list[list[int]], pad_token_id: int, batch_size: int, desc: str | None = None) -> list[torch.Tensor]:
        """Hidden state after the frozen layers for every token of each sequence, (length, d) each, on the CPU."""
        from tqdm.auto import tqdm

        device = next(self.model.parameters()).device
        out: list[torch.Tensor | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        was_training = self.model.training
        self.model.eval()
        # The final norm belongs to the upper part: the lower view ends at the last frozen layer's output.
        with self._view(list(self.layers)[: self.num_layers], torch.nn.Identity()):
            for first in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=desc is None):
                rows = order[first : first + batch_size]
                input_ids, mask = pad_right([sequences[i] for i in rows], pad_token_id)
                hidden = self.model.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
                for row, index in enumerate(rows):
                    out[index] = hidden.last_hidden_state[row, : len(sequences[index])].float().cpu()
        self.model.train(was_training)
        return out

    @torch.no_grad()
    def final_features(self, states: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """The normalised last-token hidden state that the head reads, (N, d), from cached :meth:`states`."""
        device = next(self.model.parameters()).device
        features = []
        was_training = self.model.training
        self.model.eval()
        with self.upper():
            for first in range(0, len(states), batch_size):
                inputs = {k: v.to(device) for k, v in pad_left_states(states[first : first + batch_size]).items()}
                hidden = self.model.model(**inputs, use_cache=False).last_hidden_state
                features.append(hidden[:, -1].float().cpu())
        self.model.train(was_training)
        return torch.cat(features)


class CachedTrunkScorer:
    """Raw rewards of a model trained with a :class:`FrozenTrunk`, reusing the trunk states computed for training.

    Scoring right after training (normalisation, held-out pairs) mostly meets
    completions the trunk has already seen: they cost only the upper layers.
    ``raw_scores`` matches :meth:`rlhf_core.reward.RewardModel.raw_scores`.
    """

    def __init__(self, trunk: FrozenTrunk, tokenizer, cache: dict[tuple[int, ...], torch.Tensor], reads_stop_token: bool):
        self.trunk = trunk
        self.tokenizer = tokenizer
        self.cache = cache
        self.reads_stop_token = reads_stop_token

    @torch.no_grad()
    def raw_scores(
        self,
        prompts: list[str],
        responses: list[str],
        finished: list[bool] | None = None,
        batch_size: int = 16,
        desc: str | None = None,
    ) -> torch.Tensor:
        flags = finished_flags(prompts, finished, self.reads_stop_token)
        encoded, _ = encode_conversations(self.tokenizer, prompts, responses, flags)
        keys = [tuple(seq) for seq in encoded]
        missing = list(dict.fromkeys(key for key in keys if key not in self.cache))
        if missing:
            states = self.trunk.states([list(key) for key in missing], self.tokenizer.pad_token_id, batch_size, desc=desc)
            self.cache.update(zip(missing, states))
        with self.trunk.upper():
            lengths = [len(key) for key in keys]
            return scores_in_length_order(
                self.trunk.model, lengths, lambda rows: pad_left_states([self.cache[keys[i]] for i in rows]), batch_size
            )
