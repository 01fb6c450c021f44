"""Turning rankings read from a public source into bundle records with stable ids.

A format parser reads one source row and yields :class:`RankedItem` s (texts,
best first) or :class:`RecordError` s; :class:`BundleBuilder` checks the texts,
gives everything content-hash ids (so re-importing a file yields the same ids),
drops exact repeats as ``duplicate of line N`` and turns every problem into a
:class:`~rlhf_core.records.Reject`.  Each source row (each annotation, for
Label Studio) ends up as exactly one ranking or one reject.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from rlhf_core.preferences import PreferenceBundle
from rlhf_core.prompts import blank_reason, stable_id, visible
from rlhf_core.records import Reject, preview
from rlhf_core.rowfiles import UnreadableRow
from rlhf_core.schemas import Completion, Prompt, Ranking

DEFAULT_ANNOTATOR = "import"
ANNOTATOR_KEYS = ("annotator_id", "annotator")

#: Imported rows rarely say when they were labelled; a fixed time keeps re-imports byte-identical,
#: so DVC sees an unchanged input as unchanged output.
IMPORT_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)


class RecordError(Exception):
    """One problem with one source record: the field at fault, why, and a kind for counting."""

    def __init__(self, field: str | None, reason: str, kind: str = "invalid"):
        super().__init__(reason)
        self.field, self.reason, self.kind = field, reason, kind


@dataclass(frozen=True)
class RankedItem:
    """One ranking as a source gave it, before ids: a prompt and its completions, best first."""

    prompt: str
    completions: tuple[str, ...]
    fields: tuple[str, ...]
    """Where each completion came from (``chosen``, ``completions[2].response``), for reject messages."""
    prompt_field: str = "prompt"
    ranks: tuple[int, ...] | None = None
    """1-based rank per completion; equal ranks are ties.  None: strictly in the given order."""
    ratings: tuple[float, ...] | None = None
    annotator: str = DEFAULT_ANNOTATOR
    created_at: datetime | None = None


Parser = Callable[[dict], Iterable[RankedItem | RecordError]]


def annotator_of(row: dict) -> str:
    """The annotator named by an ``annotator_id`` / ``annotator`` column, else ``import``."""
    for key in ANNOTATOR_KEYS:
        value = row.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return DEFAULT_ANNOTATOR


def require_text(row: dict, key: str, where: str | None = None) -> str:
    value = row.get(key)
    field = where or key
    if value is None:
        raise RecordError(field, "missing")
    if not isinstance(value, str):
        raise RecordError(field, f"expected text, got {type(value).__name__}")
    return value


def first_text(row: dict, keys: tuple[str, ...], where: str = "") -> tuple[str, str]:
    """(key, text) of the first of ``keys`` the row holds; a reject naming them all when none is there."""
    for key in keys:
        if row.get(key) is not None:
            return key, require_text(row, key, where + key)
    raise RecordError(where + keys[0], "missing" + (f" (also looked for {', '.join(keys[1:])})" if keys[1:] else ""))


def content_id(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256(json.dumps(parts, ensure_ascii=False, default=str).encode()).hexdigest()
    return prefix + digest[:16]


class BundleBuilder:
    """Collects the rankings of one source file, with its prompts, completions and rejects."""

    def __init__(self, source: Path, max_text_chars: int):
        self.source = source
        self.policy_version = f"import:{source.name}"
        self.max_text_chars = max_text_chars
        self.prompts: dict[str, Prompt] = {}
        self.completions: dict[str, Completion] = {}
        self.rankings: list[Ranking] = []
        self.rejects: list[Reject] = []
        self.origins: dict[tuple[str, str], tuple[str, int]] = {}
        self._line_of: dict[str, int] = {}

    def consume(self, line: int, raw: object, parse: Parser) -> None:
        """Parse one source row and keep each ranking it holds; every problem becomes a reject."""
        if isinstance(raw, UnreadableRow):
            self.reject(line, RecordError(None, raw.reason), raw.text)
            return
        if not isinstance(raw, dict):
            self.reject(line, RecordError(None, f"expected an object, got {type(raw).__name__}"), raw)
            return
        try:
            units = list(parse(raw))
        except RecordError as error:
            self.reject(line, error, raw)
            return
        for unit in units:
            try:
                if isinstance(unit, RecordError):
                    raise unit
                self.add(line, unit)
            except RecordError as error:
                self.reject(line, error, raw)

    def add(self, line: int, item: RankedItem) -> None:
        """Check one ranking's texts, give it content ids and keep it; raise RecordError otherwise."""
        prompt_text = self._checked(item.prompt_field, item.prompt)
        texts = [self._checked(field, text, answer=True) for field, text in zip(item.fields, item.completions)]
        first_field: dict[str, str] = {}
        for field, text in zip(item.fields, texts):
            shown = visible(text)  # texts that differ only in zero-width characters look identical to an annotator
            if shown in first_field:
                raise RecordError(field, f"identical to {first_field[shown]}", "identical")
            first_field[shown] = field
        prompt_id = stable_id(prompt_text)
        completion_ids = [content_id("c", prompt_id, text) for text in texts]
        # A strict order needs no ranks; leaving them out gives one id whichever format spelt it.
        ranks = None if item.ranks == tuple(range(1, len(texts) + 1)) else item.ranks
        ranking_id = content_id("r", prompt_id, completion_ids, ranks, item.ratings, item.annotator)
        if ranking_id in self._line_of:
            raise RecordError(None, f"duplicate of line {self._line_of[ranking_id]}", "duplicate")
        try:
            prompt = Prompt(id=prompt_id, text=prompt_text, source=self.policy_version)
            completions = [
                Completion(id=cid, prompt_id=prompt_id, text=text, policy_version=self.policy_version)
                for cid, text in zip(completion_ids, texts)
            ]
            ranking = Ranking(
                id=ranking_id,
                prompt_id=prompt_id,
                completion_ids=completion_ids,
                ranks=list(ranks) if ranks is not None else None,
                ratings=list(item.ratings) if item.ratings is not None else None,
                annotator_id=item.annotator,
                created_at=item.created_at or IMPORT_TIME,
                source="import",
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            raise RecordError(".".join(map(str, error["loc"])) or None, error["msg"]) from None
        self._line_of[ranking_id] = line
        where = (str(self.source), line)
        self.prompts.setdefault(prompt_id, prompt)
        self.origins.setdefault(("prompts", prompt_id), where)
        for completion in completions:
            self.completions.setdefault(completion.id, completion)
            self.origins.setdefault(("completions", completion.id), where)
        self.rankings.append(ranking)
        self.origins[("rankings", ranking_id)] = where

    def reject(self, line: int, error: RecordError, raw: object) -> None:
        self.rejects.append(Reject(str(self.source), line, error.reason, error.field, preview(raw), error.kind))

    def bundle(self) -> PreferenceBundle:
        return PreferenceBundle(
            prompts=list(self.prompts.values()),
            completions=list(self.completions.values()),
            rankings=self.rankings,
            rejects=self.rejects,
            origins=self.origins,
        )

    def _checked(self, field: str, text: str, answer: bool = False) -> str:
        text = text.strip()
        # An empty answer is a judgement too: HH-RLHF raters sometimes prefer saying nothing to the other answer.
        blank = None if answer and not text else blank_reason(text)
        if blank:
            raise RecordError(field, blank, "empty")
        if len(text) > self.max_text_chars:
            raise RecordError(field, f"too long: {len(text)} characters > {self.max_text_chars}", "too_long")
        return text
