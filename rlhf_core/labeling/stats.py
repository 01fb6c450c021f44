"""Figures for the admin page and ``rlhf label stats``: throughput and agreement, per task.

Rankings: pairwise agreement and ordinal Krippendorff's alpha.  Ratings:
interval Krippendorff's alpha of the 1-7 scores, a unit being one completion
of one item.  Demonstrations: length in words against the guide, and how far
the answer moved from the model draft (word-level edit distance).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from statistics import fmean, median

from rlhf_core.agreement import agreement_with_gold, interval_alpha, krippendorff_alpha, pairwise_agreement
from rlhf_core.labeling.store import TASKS, DemonstrationRow, LabelRow, LabelStore, RatingRow, now_utc


@dataclass(frozen=True)
class AnnotatorStats:
    name: str
    assigned: int
    done: int
    skipped: int
    flagged: int  # completions flagged unsafe or nonsense
    last_hour: int
    per_active_hour: float | None  # labels per clock hour with at least one label
    agreement_with_others: float | None
    agreement_with_gold: float | None


@dataclass(frozen=True)
class TaskStats:
    """Throughput of one task kind."""

    task: str
    items: int
    labels: int
    skipped: int
    last_hour: int
    per_active_hour: float | None


@dataclass(frozen=True)
class RatingStats:
    ratings: int
    mean_score: float | None
    pairable_units: int  # completions scored by two or more annotators
    krippendorff_alpha_interval: float | None
    commented: int  # scores that came with a comment


@dataclass(frozen=True)
class DemonstrationStats:
    demonstrations: int
    guide_words: tuple[int, int]
    mean_words: float | None
    median_words: float | None
    within_guide: float | None  # share of answers whose word count is inside the guide
    with_draft: int
    unchanged_drafts: int  # submitted exactly as drafted
    mean_edit_distance: float | None  # words inserted, deleted or replaced, over answers that had a draft
    mean_relative_edit_distance: float | None  # the same over max(words of draft, words of answer)


@dataclass(frozen=True)
class LabelStats:
    items: int
    gold_items: int
    labels: int
    skipped: int
    labels_last_hour: int
    pairwise_agreement: float | None
    agreement_comparisons: int
    krippendorff_alpha: float | None
    annotators: list[AnnotatorStats]
    tasks: list[TaskStats]
    rating: RatingStats
    demonstration: DemonstrationStats

    def as_dict(self) -> dict:
        return asdict(self)


def label_stats(store: LabelStore, guide_words: tuple[int, int], now: datetime | None = None) -> LabelStats:
    now = now or now_utc()
    rows = store.labels()
    rankings = [row.ranking for row in rows if row.ranking is not None]
    agreement = pairwise_agreement(rankings)
    gold = agreement_with_gold(rankings, store.gold_rankings())
    by_annotator: dict[str, list[LabelRow]] = defaultdict(list)
    for row in rows:
        by_annotator[row.annotator].append(row)
    hour_ago = now - timedelta(hours=1)
    annotators = []
    for name, assigned in sorted(store.assignment_counts().items()):
        own = by_annotator.get(name, [])
        annotators.append(
            AnnotatorStats(
                name=name,
                assigned=assigned,
                done=len(own),
                skipped=sum(row.skipped for row in own),
                flagged=sum(len(row.flags) for row in own),
                last_hour=sum(row.created_at >= hour_ago for row in own),
                per_active_hour=_per_active_hour(own),
                agreement_with_others=agreement.per_annotator.get(name),
                agreement_with_gold=gold.get(name),
            )
        )
    items, gold_items = store.item_counts()
    return LabelStats(
        items=items,
        gold_items=gold_items,
        labels=len(rows),
        skipped=sum(row.skipped for row in rows),
        labels_last_hour=sum(row.created_at >= hour_ago for row in rows),
        pairwise_agreement=agreement.agreement,
        agreement_comparisons=agreement.comparisons,
        krippendorff_alpha=krippendorff_alpha(rankings),
        annotators=annotators,
        tasks=_task_stats(rows, store.items_by_task(), hour_ago),
        rating=rating_stats(store.ratings()),
        demonstration=demonstration_stats(store.demonstrations(), guide_words),
    )


def _task_stats(rows: list[LabelRow], items: dict[str, int], hour_ago: datetime) -> list[TaskStats]:
    out = []
    for task in TASKS:
        own = [row for row in rows if row.task == task]
        if items.get(task) or own:
            out.append(TaskStats(
                task, items.get(task, 0), len(own), sum(row.skipped for row in own),
                sum(row.created_at >= hour_ago for row in own), _per_active_hour(own),
            ))
    return out


def rating_stats(rows: list[RatingRow]) -> RatingStats:
    units: dict[tuple[int, str], list[float]] = defaultdict(list)
    for row in rows:
        for completion_id, score in row.scores.items():
            units[row.item_id, completion_id].append(score)
    scores = [score for row in rows for score in row.scores.values()]
    return RatingStats(
        ratings=len(rows),
        mean_score=fmean(scores) if scores else None,
        pairable_units=sum(len(values) >= 2 for values in units.values()),
        krippendorff_alpha_interval=interval_alpha(list(units.values())),
        commented=sum(len(row.comments) for row in rows),
    )


def demonstration_stats(rows: list[DemonstrationRow], guide_words: tuple[int, int]) -> DemonstrationStats:
    low, high = guide_words
    words = [len(row.text.split()) for row in rows]
    drafted = [row for row in rows if row.draft is not None]
    distances = [word_edit_distance(row.draft.text.split(), row.text.split()) for row in drafted]
    longest = [max(len(row.draft.text.split()), len(row.text.split()), 1) for row in drafted]
    return DemonstrationStats(
        demonstrations=len(rows),
        guide_words=guide_words,
        mean_words=fmean(words) if words else None,
        median_words=median(words) if words else None,
        within_guide=fmean(low <= n <= high for n in words) if words else None,
        with_draft=len(drafted),
        unchanged_drafts=sum(row.text == row.draft.text for row in drafted),
        mean_edit_distance=fmean(distances) if distances else None,
        mean_relative_edit_distance=fmean(d / n for d, n in zip(distances, longest)) if distances else None,
    )


def word_edit_distance(source: list[str], target: list[str]) -> int:
    """Levenshtein distance over words: insertions, deletions and substitutions turning ``source`` into ``target``.

    Words rather than characters: a rewritten word should count as one edit,
    and the quadratic table stays small (a 60-word answer: 3,600 cells).
    """
    previous = list(range(len(target) + 1))
    for i, word in enumerate(source, 1):
        current = [i]
        for j, other in enumerate(target, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def _per_active_hour(rows: list[LabelRow]) -> float | None:
    """Labels per clock hour in which the annotator labelled at all: a rate that ignores breaks between sessions."""
    hours = {row.created_at.replace(minute=0, second=0, microsecond=0) for row in rows}
    return len(rows) / len(hours) if hours else None
