"""Preference data: bundles of prompts, completions and rankings, and their expansion into pairs.

A *bundle* is a folder with three JSONL files - ``prompts.jsonl``,
``completions.jsonl`` and ``rankings.jsonl`` - the one layout shared by the
labelling app's export, the importers and the ``collect_preferences`` stage.
:func:`validate_bundle` checks a bundle as a whole (references between records,
text lengths, duplicates) and moves every bad record to the rejects with the
file and line it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path

from rlhf_core.records import Reject, iter_raw_rows, read_records, write_jsonl
from rlhf_core.schemas import Completion, PreferencePair, Prompt, Ranking

BUNDLE_FILES = {"prompts": "prompts.jsonl", "completions": "completions.jsonl", "rankings": "rankings.jsonl"}


@dataclass
class PreferenceBundle:
    prompts: list[Prompt] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    rankings: list[Ranking] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    #: (kind, record id) -> (file, line) for records read from files; kind is "prompts", "completions" or "rankings".
    origins: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)

    def origin(self, kind: str, record_id: str, position: int, default_file: str) -> tuple[str, int]:
        """Where a record came from; records built in memory are located by their 1-based position instead."""
        return self.origins.get((kind, record_id), (f"{default_file} ({kind} record {position})", 0))

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        write_jsonl(folder / BUNDLE_FILES["prompts"], self.prompts)
        write_jsonl(folder / BUNDLE_FILES["completions"], self.completions)
        write_jsonl(folder / BUNDLE_FILES["rankings"], self.rankings)

    @classmethod
    def read(cls, folder: str | Path) -> "PreferenceBundle":
        """Read a bundle; invalid or duplicate records become rejects (file, line, field, reason)."""
        folder = Path(folder)
        bundle = cls()
        for name, model in (("prompts", Prompt), ("completions", Completion), ("rankings", Ranking)):
            path = folder / BUNDLE_FILES[name]
            if not path.exists():
                continue
            result = read_records(path, model)
            setattr(bundle, name, result.records)
            bundle.rejects.extend(result.rejects)
            for record, line in zip(result.records, kept_lines(path, result.rejects)):
                bundle.origins[(name, record.id)] = (str(path), line)
        return bundle

    def extend(self, other: "PreferenceBundle") -> None:
        self.prompts += other.prompts
        self.completions += other.completions
        self.rankings += other.rankings
        self.rejects += other.rejects
        self.origins.update(other.origins)


def kept_lines(path: Path, rejects: list[Reject]) -> list[int]:
    """Line numbers of the records ``read_records`` kept: every row it did not reject, in file order."""
    rejected = {r.line for r in rejects if r.file == str(path)}
    return [number for number, _ in iter_raw_rows(path) if number not in rejected]


def ranking_to_pairs(
    ranking: Ranking, prompt: Prompt, completions: dict[str, Completion], margin: str = "none"
) -> list[PreferencePair]:
    """All C(K,2) comparisons a ranking implies (tied entries give none).

    Each pair carries weight 1/(number of pairs of this ranking) so that one
    ranking counts as one example, as in InstructGPT.  ``margin`` is
    ``"none"``, ``"rank_distance"`` or ``"rating_gap"`` (needs ``ranking.ratings``).
    """
    rank = ranking.rank_of()
    ratings = dict(zip(ranking.completion_ids, ranking.ratings)) if ranking.ratings else None
    ordered = [
        (better, worse)
        for better, worse in combinations(ranking.completion_ids, 2)
        if rank[better] < rank[worse]
    ]
    pairs = []
    for better, worse in ordered:
        if margin == "rank_distance":
            value = float(rank[worse] - rank[better])
        elif margin == "rating_gap" and ratings is not None:
            value = max(0.0, float(ratings[better] - ratings[worse]))
        else:
            value = 0.0
        pairs.append(
            PreferencePair(
                prompt_id=prompt.id,
                prompt=prompt.text,
                chosen_id=better,
                chosen=completions[better].text,
                rejected_id=worse,
                rejected=completions[worse].text,
                ranking_id=ranking.id,
                annotator_id=ranking.annotator_id,
                margin=value,
                weight=1.0 / len(ordered),
            )
        )
    return pairs
