"""Figures for the admin page and ``rlhf label stats``: throughput and agreement."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from rlhf_core.agreement import agreement_with_gold, krippendorff_alpha, pairwise_agreement
from rlhf_core.labeling.store import LabelRow, LabelStore, now_utc


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

    def as_dict(self) -> dict:
        return asdict(self)


def label_stats(store: LabelStore, now: datetime | None = None) -> LabelStats:
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
    )


def _per_active_hour(rows: list[LabelRow]) -> float | None:
    """Labels per clock hour in which the annotator labelled at all: a rate that ignores breaks between sessions."""
    hours = {row.created_at.replace(minute=0, second=0, microsecond=0) for row in rows}
    return len(rows) / len(hours) if hours else None
