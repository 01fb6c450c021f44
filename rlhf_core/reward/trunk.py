"""The frozen lower part of the reward model, run once per completion.

With ``reward.mode: freeze`` the embeddings and the lower N decoder layers
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
import tempfile
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf_core.decoder import DecoderParts, decoder_parts, shared_prefix_groups, shared_prefix_states
from rlhf_core.reward.model import (
    encode_conversations,
    finished_flags,
    pad_right,
    rows_in_length_order,
    scores_in_length_order,
)


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


class StateFile:
    """Frozen-trunk states kept on disk, one (length, d) float32 block per distinct token sequence.

    Training reads them back a batch at a time (:class:`TrunkStateInputs`), so
    the process holds one batch of states whatever the number of pairs: 1,800
    HH-RLHF pairs at 384 tokens are ~3 GB of states, 10,000 pairs ~15 GB.  The
    file is anonymous (deleted when closed or when the process ends); the
    operating system's page cache, not the process, keeps the hot part in memory.
    """

    def __init__(self, folder: str | Path, width: int):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder, prefix="trunk-states-")
        self.width = width
        self._spans: dict[tuple[int, ...], tuple[int, int]] = {}  # key -> (byte offset, rows)
        self._end = 0

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._spans

    def __len__(self) -> int:
        return len(self._spans)

    def __setitem__(self, key: tuple[int, ...], state: torch.Tensor) -> None:
        data = state.detach().to(torch.float32).contiguous().numpy().tobytes()
        self._file.seek(self._end)
        self._file.write(data)
        self._spans[key] = (self._end, state.shape[0])
        self._end += len(data)

    def __getitem__(self, key: tuple[int, ...]) -> torch.Tensor:
        offset, rows = self._spans[key]
        self._file.seek(offset)
        data = bytearray(self._file.read(rows * self.width * 4))
        return torch.frombuffer(data, dtype=torch.float32).view(rows, self.width)

    def update(self, items) -> None:
        for key, state in items:
            self[key] = state

    def close(self) -> None:
        self._file.close()


#: where frozen-trunk states live: a dict in memory (tests, tiny data) or a :class:`StateFile`, keyed by token ids
States = MutableMapping[tuple[int, ...], torch.Tensor] | StateFile


class FrozenTrunk:
    """Embeddings plus the lower ``num_layers`` decoder layers of ``model``, with helpers to run either part alone."""

    def __init__(self, model, num_layers: int):
        self.model = model
        parts = decoder_parts(model)  # the split PPO's policy makes too (rlhf_core.decoder)
        self.layers, self.norm = parts.layers, parts.norm
        self.num_layers = num_layers  # checked against the model's layers where they were frozen (reward.build)

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
    def states(
        self, sequences: list[list[int]], pad_token_id: int, batch_size: int, into: States | None = None,
        desc: str | None = None,
    ) -> States:  # fmt: skip
        """Hidden state after the frozen layers for every token of each distinct sequence, (length, d) each.

        They are written into ``into`` (keyed by the sequence's token ids; a new dict
        when None) one batch at a time, so with a :class:`StateFile` only one
        batch is ever held in memory.  Sequences already there are not recomputed.
        """
        from tqdm.auto import tqdm

        into = {} if into is None else into
        device = next(self.model.parameters()).device
        todo = sorted({tuple(seq) for seq in sequences if tuple(seq) not in into}, key=len)
        was_training = self.model.training
        self.model.eval()
        # The final norm belongs to the upper part: the lower view ends at the last frozen layer's output.
        as_lists = [list(key) for key in todo]
        groups = shared_prefix_groups(as_lists)
        alone = sorted((todo[rows[0]] for prefix, rows in groups if not prefix), key=len)
        with self._view(list(self.layers)[: self.num_layers], torch.nn.Identity()):
            # Several completions of one prompt run the prompt once, the others in length-sorted batches.
            shared = shared_prefix_states(self.model.model, as_lists, groups, pad_token_id, batch_size)
            total = sum(len(rows) for prefix, rows in groups if prefix)
            for row, hidden in tqdm(shared, total=total, desc=desc, unit="row", disable=desc is None or not total):
                into[todo[row]] = hidden.float().cpu().clone()
            for first in tqdm(range(0, len(alone), batch_size), desc=desc, unit="batch", disable=desc is None):
                rows = alone[first : first + batch_size]
                input_ids, mask = pad_right([list(key) for key in rows], pad_token_id)
                hidden = self.model.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
                for row, key in enumerate(rows):
                    # A copy: a view would keep the whole padded batch alive in memory.
                    into[key] = hidden.last_hidden_state[row, : len(key)].float().cpu().clone()
        self.model.train(was_training)
        return into

    @torch.no_grad()
    def final_features(self, states: States, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
        """The normalised last-token hidden state that the head reads, (N, d), from the cached :meth:`states`."""
        device = next(self.model.parameters()).device
        features = []
        was_training = self.model.training
        self.model.eval()
        with self.upper():
            for first in range(0, len(sequences), batch_size):
                batch = [states[tuple(seq)] for seq in sequences[first : first + batch_size]]
                inputs = {k: v.to(device) for k, v in pad_left_states(batch).items()}
                hidden = self.model.model(**inputs, use_cache=False).last_hidden_state
                features.append(hidden[:, -1].float().cpu().clone())  # not a view of the whole batch
        self.model.train(was_training)
        return torch.cat(features)


@torch.no_grad()
def last_token_features(model, sequences: list[list[int]], pad_token_id: int, batch_size: int, desc: str | None = None) -> torch.Tensor:
    """What the head of ``model`` reads for each sequence - the final-norm hidden state of its last token - (N, d).

    Computed a length-sorted batch at a time and kept as d floats per sequence:
    the memory a linear probe needs grows by 2 KB per completion (d = 576), not
    by its length.
    """
    lengths = [len(seq) for seq in sequences]

    def batch(rows: list[int]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_right([sequences[i] for i in rows], pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    return rows_in_length_order(
        model.model, lengths, batch, batch_size, lambda out, inputs: _last_real_token(out.last_hidden_state, inputs), desc
    )


def _last_real_token(hidden: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    last = inputs["attention_mask"].sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class CachedTrunkScorer:
    """Raw rewards of a model trained with a :class:`FrozenTrunk`, reusing the trunk states computed for training.

    Scoring right after training (normalisation, held-out pairs) mostly meets
    completions the trunk has already seen: they cost only the upper layers.
    ``raw_scores`` matches :meth:`rlhf_core.reward.RewardModel.raw_scores`.
    """

    def __init__(self, trunk: FrozenTrunk, tokenizer, cache: States, reads_stop_token: bool):
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
        return self.encoded_scores(encoded, batch_size, desc)

    @torch.no_grad()
    def encoded_scores(self, encoded: list[list[int]], batch_size: int = 16, desc: str | None = None) -> torch.Tensor:
        """:meth:`raw_scores` of conversations already encoded as the reward model reads them."""
        keys = [tuple(seq) for seq in encoded]
        self.trunk.states(encoded, self.tokenizer.pad_token_id, batch_size, into=self.cache, desc=desc)
        with self.trunk.upper():
            lengths = [len(key) for key in keys]
            return scores_in_length_order(
                self.trunk.model, lengths, lambda rows: pad_left_states([self.cache[keys[i]] for i in rows]), batch_size
            )


class FeatureScorer:
    """Raw rewards of a head-only model (``reward.mode: none``): the head on cached last-token features.

    The features of every completion seen in training are kept (d floats each),
    so normalisation and held-out scoring run the model only on new completions.
    ``raw_scores`` matches :meth:`rlhf_core.reward.RewardModel.raw_scores`.
    """

    def __init__(self, model, tokenizer, cache: dict[tuple[int, ...], torch.Tensor], reads_stop_token: bool):
        self.model = model
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
        missing = list(dict.fromkeys(tuple(seq) for seq in encoded if tuple(seq) not in self.cache))
        if missing:
            found = last_token_features(self.model, [list(k) for k in missing], self.tokenizer.pad_token_id, batch_size, desc)
            self.cache.update(zip(missing, found))
        features = torch.stack([self.cache[tuple(seq)] for seq in encoded])
        head = self.model.score
        return head(features.to(head.weight.device, head.weight.dtype)).squeeze(-1).float().cpu()


#: config fields that shape what a decoder's embeddings and layers compute besides their weights
TRUNK_CONFIG_FIELDS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act",
    "attention_bias", "mlp_bias", "rope_theta", "rope_scaling", "rope_parameters",
)  # fmt: skip


def _same_weights(one: torch.nn.Module, other: torch.nn.Module) -> bool:
    mine, theirs = one.state_dict(), other.state_dict()
    if mine.keys() != theirs.keys():
        return False
    return all(
        t.shape == theirs[n].shape and t.dtype == theirs[n].dtype and torch.equal(t, theirs[n].to(t.device))
        for n, t in mine.items()
    )


def shared_layers(a: DecoderParts, b: DecoderParts, limit: int | None = None) -> int:
    """How many leading decoder layers ``a`` and ``b`` share with their embeddings - the same weights, rotary
    frequencies and layer settings, so the same hidden states (0 when the embeddings or settings differ); counted up
    to ``limit``."""
    if any(getattr(a.config, key, None) != getattr(b.config, key, None) for key in TRUNK_CONFIG_FIELDS):
        return 0
    freqs = [getattr(parts.rotary, "inv_freq", None) for parts in (a, b)]
    if any(f is None for f in freqs) or freqs[0].shape != freqs[1].shape or not torch.equal(freqs[0], freqs[1].to(freqs[0].device)):
        return 0
    if getattr(a.rotary, "attention_scaling", 1.0) != getattr(b.rotary, "attention_scaling", 1.0):
        return 0
    if not _same_weights(a.embed, b.embed):
        return 0
    count = 0
    for one, other in zip(a.layers, b.layers):
        if (limit is not None and count >= limit) or not _same_weights(one, other):
            break
        count += 1
    return count


def same_trunk(a: DecoderParts, b: DecoderParts, layers: int) -> bool:
    """Whether the embeddings and first ``layers`` decoder layers of ``a`` and ``b`` compute the same function."""
    return layers >= 1 and shared_layers(a, b, limit=layers) == layers


class RolloutTrunkScorer:
    """Normalised rewards of a policy's responses that start from the trunk states its rollout already computed.

    PPO's policy and the reward model both start from the SFT model, and with
    ``ppo.mode`` and ``reward.mode`` at ``freeze`` both keep its embeddings and
    lower layers (24 of 30 by default): the hidden states the sampler computed
    for a response after those layers are then exactly what the reward model's
    own lower layers would compute, so scoring the rollout needs only the
    reward model's upper layers (6 of 30).  :meth:`for_policy` checks that the
    weights really are the same (and that both compute in fp32) and gives None
    otherwise.  A row whose conversation the reward model reads as other tokens
    than the sampled ones (a sampled token sequence that tokenises differently,
    a conversation cut to ``reward.max_length``) is computed in full.  Scores
    agree with :meth:`rlhf_core.reward.RewardModel.score` to float rounding;
    ``rows_read`` / ``rows_scored`` count how many rows read the rollout's states.
    """

    reads_rollout_trunk = True  # rlhf_core.ppo.trainer passes ``sampled`` (PolicyRollout.sampled_sequences)

    def __init__(self, reward, layers: int, batch_size: int):
        self.reward, self.batch_size = reward, batch_size
        self.trunk = FrozenTrunk(reward.model, layers)
        self.rows_read = self.rows_scored = 0

    @staticmethod
    def trunk_of(reward) -> DecoderParts | None:
        """The reward model's decoder, whose lower layers a sampler may share, or None when it scores in another dtype
        than fp32 (a sampler's states are fp32)."""
        return decoder_parts(reward.model) if reward.dtype == "float32" else None

    @classmethod
    def for_policy(cls, reward, policy, batch_size: int) -> "RolloutTrunkScorer | None":
        """A scorer for the rollouts of ``policy`` (:class:`rlhf_core.ppo.policy.ActorCritic`), or None when its trunk
        trains, the reward model's trunk holds other weights, or either side does not compute in fp32."""
        trunk = cls.trunk_of(reward)
        if trunk is None or policy.trunk_trainable or policy.dtype != "float32":
            return None
        layers = policy.trunk_layers
        return cls(reward, layers, batch_size) if same_trunk(trunk, policy.parts, layers) else None

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], responses: list[str], finished: list[bool] | None = None,
        sampled: list[tuple[list[int], torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Scores of ``(prompts, responses)``; ``sampled`` holds each row's sampled tokens and their trunk states
        (None for a row that has none)."""
        reward = self.reward
        flags = finished_flags(prompts, finished, reward.reads_stop_token)
        encoded, _ = encode_conversations(reward.tokenizer, prompts, responses, flags)
        cache: dict[tuple[int, ...], torch.Tensor] = {}
        for seq, (ids, states) in zip(encoded, [s or ([], torch.zeros(0)) for s in sampled or []]):
            if len(seq) <= states.shape[0] and ids[: len(seq)] == seq:
                cache[tuple(seq)] = states[: len(seq)].float().cpu()
        self.rows_read += sum(tuple(seq) in cache for seq in encoded)
        self.rows_scored += len(encoded)
        scorer = CachedTrunkScorer(self.trunk, reward.tokenizer, cache, reward.reads_stop_token)
        return (scorer.encoded_scores(encoded, self.batch_size) - reward.shift) / reward.scale
