"""Records that flow between stages.  Every file the pipeline writes holds one of these per line."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TEXT_CHARS = 20_000


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Record(BaseModel):
    # allow_inf_nan: a NaN rating or weight would train on garbage, and pydantic writes it as null,
    # which no reader accepts back.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class Prompt(Record):
    id: str = Field(min_length=1)
    text: str = Field(max_length=MAX_TEXT_CHARS)
    source: str = "shipped"
    category: str | None = None

    _text_not_blank = field_validator("text")(_not_blank)


class Completion(Record):
    id: str = Field(min_length=1)
    prompt_id: str = Field(min_length=1)
    text: str = Field(max_length=MAX_TEXT_CHARS)
    policy_version: str = Field(description="Registry version or content hash of the policy that wrote it.")
    seed: int | None = None
    num_tokens: int | None = Field(None, ge=0)
    finished: bool | None = Field(None, description="True when the policy emitted its stop token.")


class Ranking(Record):
    """One annotator's ranking of a prompt's completions, best first; equal ``ranks`` are ties."""

    id: str = Field(min_length=1)
    prompt_id: str = Field(min_length=1)
    completion_ids: list[str] = Field(min_length=2, description="Best to worst.")
    ranks: list[int] | None = Field(None, description="1-based rank per entry of completion_ids; equal = tie.")
    ratings: list[float] | None = Field(None, description="Optional scores per completion (for rating-gap margins).")
    annotator_id: str = Field(min_length=1)
    created_at: datetime = Field(default_factory=utc_now)
    source: Literal["simulated", "human", "import"] = "human"
    flags: dict[str, str] = Field(default_factory=dict, description="completion id -> flag (unsafe, nonsense).")

    @model_validator(mode="after")
    def _consistent(self) -> "Ranking":
        ids = self.completion_ids
        if len(set(ids)) != len(ids):
            raise ValueError("completion_ids repeats a completion")
        for name in ("ranks", "ratings"):
            values = getattr(self, name)
            if values is not None and len(values) != len(ids):
                raise ValueError(f"{name} has {len(values)} entries for {len(ids)} completions")
        if self.ranks is not None and any(b < a for a, b in zip(self.ranks, self.ranks[1:])):
            raise ValueError("ranks must be non-decreasing (completion_ids are listed best first)")
        return self

    def rank_of(self) -> dict[str, int]:
        """Completion id -> rank (1 = best); ties share a rank."""
        ranks = self.ranks or list(range(1, len(self.completion_ids) + 1))
        return dict(zip(self.completion_ids, ranks))


class PreferencePair(Record):
    """One comparison derived from a ranking: ``chosen`` was preferred over ``rejected``."""

    prompt_id: str
    prompt: str
    chosen_id: str
    chosen: str
    rejected_id: str
    rejected: str
    ranking_id: str
    annotator_id: str
    margin: float = Field(0.0, ge=0, description="Rank distance or rating gap, per the reward.margin setting.")
    weight: float = Field(1.0, gt=0, description="1/C(K,2): the pairs of one ranking count as one example.")


class ChatTurn(Record):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


class Demonstration(Record):
    """An answer written for a prompt, for supervised fine-tuning: the loss falls on ``completion`` only.

    One row is TRL's prompt-completion form (``prompt``, ``completion``) with the
    prompt's id and provenance beside it.
    """

    id: str = Field(min_length=1)
    prompt_id: str = Field(min_length=1)
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    completion: str = Field(max_length=MAX_TEXT_CHARS)
    prompt_messages: list[ChatTurn] | None = Field(
        None,
        description="The conversation before the answer when it is more than one user turn (a system turn, earlier "
        "exchanges); ``prompt`` is then its Human:/Assistant: rendering (rlhf_core/importers/dialogue.py).",
    )
    source: str = Field("import", description="Who wrote it: written (shipped), human (labelling app), a file name.")
    annotator_id: str | None = None

    _texts_not_blank = field_validator("prompt", "completion")(_not_blank)
