"""The reward model: a language model with a scalar head, read on the text of one conversation.

A reward model is ``AutoModelForSequenceClassification`` with one label: the
head reads the hidden state of the last non-pad token.  It reads the prompt in
the chat template and the response (:func:`rlhf_core.generation.conversation_text`)
- the same text the PPO and evaluation stages score.

Whether it also reads the stop token after a finished response is a setting
(``reward.read_stop_token``, off by default).  Annotators see text, not stop
tokens: they judge an answer complete when it reads complete.  A reward model
that sees the stop token finds a shortcut in it instead - finished candidates
were mostly the complete ones - and PPO then earns reward by stopping early
with anything (measured on the default run: answers like ``<<Explain Offer>>``
scored +2.1 proxy, 0.005 gold).  Reading text only, the model has to judge
completeness from the text, and PPO's push to finish is the explicit
``ppo.missing_eos_penalty``.

Two details make that text work:

* The pad token must differ from the stop token.  SmolLM2 pads with its stop
  token ``<|im_end|>``; a model that reads the stop token would then read the
  token *before* a final ``<|im_end|>`` and could not tell a finished answer
  from a cut-off one.  The reward tokenizer pads with another special token
  instead (no new embedding).
* Sequences are padded on the right and shortened from the left, by whole
  dialogue turns (:func:`encode_conversation`), so positions never depend on
  the batch and the final answer - where the score is read - is always kept.

Scores are normalised so that the base model's own completions on the training
prompts score mean 0 and std 1 (Ziegler et al. 2019, OpenAI lm-human-preferences;
"N implementation details of RLHF with PPO", Huang et al. 2024); the constants
live in ``normalization.json`` beside the weights, with the dtype (``reward.dtype``)
the model was trained and normalised in: every stage scores it in that numeric
path (:mod:`rlhf_core.precision`), so the base completions score mean 0 / std 1
there too, whatever the stage's own dtype.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_core.decoder import decoder_body, decoder_parts, pad_right, shared_prefix_groups, shared_prefix_states
from rlhf_core.errors import RLHFError
from rlhf_core.precision import autocast, default_device, torch_dtype

NORMALIZATION_FILE = "normalization.json"
#: Pad tokens to try, in order, when the tokenizer's own pad token is its stop token.
PAD_CANDIDATES = ("<|endoftext|>", "<unk>", "<pad>")


def reward_tokenizer(path: str | Path, max_length: int):
    """The base tokenizer set up for scoring: a pad token that is not the stop token, right padding, left truncation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    tokenizer.model_max_length = max_length
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = _distinct_pad_token(tokenizer)
    return tokenizer


def _distinct_pad_token(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.unk_token, *PAD_CANDIDATES):
        if token and token in vocab and vocab[token] != tokenizer.eos_token_id:
            return token
    raise RLHFError(
        f"tokenizer of {tokenizer.name_or_path}: no special token other than the stop token to pad with "
        f"(tried {', '.join(PAD_CANDIDATES)})"
    )


#: where a multi-turn prompt (rlhf_core.importers.dialogue.render_prompt) starts a new human turn
_HUMAN_TURN = re.compile(r"\n\n(?=Human: )")


def prompt_turns(prompt: str) -> list[str]:
    """A rendered dialogue prompt cut before each ``Human:`` turn (one piece for a single-turn prompt)."""
    return _HUMAN_TURN.split(prompt)


def encode_conversation(tokenizer, prompt: str, response: str, finished: bool) -> tuple[list[int], int]:
    """Token ids of one (prompt, response) within ``tokenizer.model_max_length``, and its length before any cut.

    A conversation that is too long loses whole exchanges from the start of its
    prompt (each piece from a ``Human:`` turn to the next), so what the reward
    model reads still begins at a turn and ends with the final answer.  Only
    when the last human turn and the answer alone do not fit are tokens cut from
    the left, as before; the end of the answer, where the score is read, is
    always kept.
    """
    from rlhf_core.generation import conversation_text

    limit = tokenizer.model_max_length
    turns = prompt_turns(prompt)
    full = 0
    for first in range(len(turns)):
        text = conversation_text(tokenizer, "\n\n".join(turns[first:]), response, finished)
        # verbose=False: the length is checked here, transformers' over-length warning would only repeat it.
        ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        full = full or len(ids)
        if len(ids) <= limit:
            return ids, full
    return ids[-limit:], full


def encode_conversations(
    tokenizer, prompts: list[str], responses: list[str], finished: list[bool]
) -> tuple[list[list[int]], int]:
    """Token ids of each (prompt, response) as the reward model reads them (:func:`encode_conversation`), and how
    many were cut to fit ``tokenizer.model_max_length``."""
    if not len(prompts) == len(responses) == len(finished):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(finished)} finished flags")
    encoded = [encode_conversation(tokenizer, p, r, f) for p, r, f in zip(prompts, responses, finished)]
    return [ids for ids, _ in encoded], sum(full > tokenizer.model_max_length for _, full in encoded)


def finished_flags(prompts: list[str], finished: list[bool] | None, reads_stop_token: bool) -> list[bool]:
    """Whether the reward model reads a stop token after each response.

    A reward model that reads it sees it where the policy emitted it (after
    every response when nobody says otherwise); one that does not never sees it.
    """
    if not reads_stop_token:
        return [False] * len(prompts)
    return [True] * len(prompts) if finished is None else [bool(f) for f in finished]


@torch.no_grad()
def rows_in_length_order(
    module,
    lengths: list[int],
    batch: Callable[[list[int]], dict],
    batch_size: int,
    read: Callable[[object, dict], torch.Tensor],
    desc: str | None = None,
) -> torch.Tensor:
    """``read(module(**inputs), inputs)`` for every row, float32 on the CPU, in input order.

    Rows are batched by length (padding is wasted compute); ``batch(rows)``
    builds the module's keyword arguments for the rows it is given.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: torch.Tensor | None = None
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        for first in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=desc is None):
            rows = order[first : first + batch_size]
            inputs = {key: value.to(device) for key, value in batch(rows).items()}
            values = read(module(**inputs, use_cache=False), inputs).float().cpu()
            if out is None:
                out = torch.zeros((len(lengths), *values.shape[1:]), dtype=torch.float32)
            out[rows] = values
    finally:
        module.train(was_training)
    return torch.zeros(0) if out is None else out


def scores_in_length_order(
    model, lengths: list[int], batch: Callable[[list[int]], dict], batch_size: int, desc: str | None = None
) -> torch.Tensor:
    """The scalar head's output for every row, float32 on the CPU, in input order (see :func:`rows_in_length_order`)."""
    return rows_in_length_order(model, lengths, batch, batch_size, lambda out, _: out.logits.squeeze(-1), desc)


class RewardModel:
    """A trained reward model: ``.model`` (sequence classification, one label), ``.tokenizer``, ``.shift``, ``.scale``.

    :meth:`score` returns ``(raw - shift) / scale``; :meth:`raw_scores` the head's output.
    ``reads_stop_token`` says whether the text it scores ends with the stop
    token of finished responses (``reward.read_stop_token``); ``dtype`` is the
    numeric path it scores in (fp32 weights, bf16 autocast for ``bfloat16``).
    Both are saved with the normalisation, so every stage reads conversations
    the way training did, in the path the normalisation was fitted in.
    """

    def __init__(
        self, model, tokenizer, shift: float = 0.0, scale: float = 1.0, reads_stop_token: bool = False,
        dtype: str = "float32",
    ):  # fmt: skip
        torch_dtype(dtype)  # a misspelt dtype fails here, not at the first score
        self.model = model
        self.tokenizer = tokenizer
        self.shift = float(shift)
        self.scale = float(scale)
        self.reads_stop_token = bool(reads_stop_token)
        self.dtype = dtype

    @classmethod
    def load(cls, path: str | Path) -> "RewardModel":
        """Load a saved reward model (safetensors only, fp32 weights) onto the default device, in eval mode."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        norm_file = path / NORMALIZATION_FILE
        if not norm_file.exists():
            raise RLHFError(f"{path}: not a reward model folder (no {NORMALIZATION_FILE}; run `rlhf train-reward`)")
        from rlhf_core.base_model import refuse_pickled_weights

        refuse_pickled_weights(path, "reward model folder")
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        norm = json.loads(norm_file.read_text())
        # Folders written before these settings existed read the stop token and scored in fp32.
        reads, dtype = norm.get("reads_stop_token", True), norm.get("dtype", "float32")
        return cls(model.to(default_device()).eval(), tokenizer, norm["shift"], norm["scale"], reads, dtype)

    def save(self, path: str | Path) -> None:
        """Write safetensors weights, tokenizer, normalisation and scoring dtype to ``path`` (replaced atomically)."""
        from rlhf_core.base_model import save_model_folder

        norm = {"shift": self.shift, "scale": self.scale, "reads_stop_token": self.reads_stop_token, "dtype": self.dtype}
        norm = json.dumps(norm, indent=2) + "\n"
        save_model_folder(self.model, self.tokenizer, path, {NORMALIZATION_FILE: norm})

    @torch.no_grad()
    def raw_scores(
        self,
        prompts: list[str],
        responses: list[str],
        finished: list[bool] | None = None,
        batch_size: int = 16,
        desc: str | None = None,
    ) -> torch.Tensor:
        """The head's output for each (prompt, response), float32 on the CPU, in input order."""
        flags = finished_flags(prompts, finished, self.reads_stop_token)
        sequences, _ = encode_conversations(self.tokenizer, prompts, responses, flags)
        groups = shared_prefix_groups(sequences)
        alone = [rows[0] for prefix, rows in groups if not prefix]

        def batch(rows: list[int]) -> dict[str, torch.Tensor]:
            input_ids, attention_mask = pad_right([sequences[alone[i]] for i in rows], self.tokenizer.pad_token_id)
            return {"input_ids": input_ids, "attention_mask": attention_mask}

        out = torch.zeros(len(sequences), dtype=torch.float32)
        with autocast(self.dtype, next(self.model.parameters()).device):
            if alone:
                out[alone] = scores_in_length_order(self.model, [len(sequences[i]) for i in alone], batch, batch_size, desc)
            if len(alone) < len(sequences):
                rows, scores = self._shared_prefix_scores(sequences, groups, batch_size, desc)
                out[rows] = scores
        return out

    @torch.no_grad()
    def _shared_prefix_scores(self, sequences, groups, batch_size: int, desc: str | None) -> tuple[list[int], torch.Tensor]:
        """``(rows, scores)`` of the rows of ``groups`` that share a prefix: several responses to one prompt read
        the prompt once (:func:`rlhf_core.decoder.shared_prefix_states`)."""
        from tqdm.auto import tqdm

        rows, last = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            total = sum(len(r) for p, r in groups if p)
            states = shared_prefix_states(decoder_body(self.model), sequences, groups, self.tokenizer.pad_token_id, batch_size)
            for row, hidden in tqdm(states, total=total, desc=desc, unit="row", disable=desc is None):
                rows.append(row)
                last.append(hidden[-1])
            head = decoder_parts(self.model).lm_head
            scores = head(torch.stack(last)).squeeze(-1).float().cpu()
        finally:
            self.model.train(was_training)
        return rows, scores

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        finished: list[bool] | None = None,
        batch_size: int = 16,
        desc: str | None = None,
    ) -> torch.Tensor:
        """Normalised rewards: the base model's own completions score mean 0, std 1."""
        return (self.raw_scores(prompts, responses, finished, batch_size, desc) - self.shift) / self.scale

    def fit_normalization(self, raw_scores: torch.Tensor) -> None:
        """Set shift and scale so that ``raw_scores`` (of the base model's completions) become mean 0, std 1."""
        if raw_scores.numel() < 2:
            raise RLHFError(f"normalisation needs at least 2 base-model completions, got {raw_scores.numel()}")
        if not torch.isfinite(raw_scores).all():
            bad = int((~torch.isfinite(raw_scores)).sum())
            raise RLHFError(f"normalisation: {bad} of {raw_scores.numel()} base-model completions score NaN or infinity")
        std = float(raw_scores.std(unbiased=False))
        self.shift = float(raw_scores.mean())
        # A reward model that gives every base completion the same score cannot be rescaled; leave its scale alone.
        self.scale = std if std > 1e-8 and math.isfinite(std) else 1.0
