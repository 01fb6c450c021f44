"""Preference data: bundles of prompts, completions and rankings, and their expansion into pairs.

A *bundle* is a folder with three JSONL files - ``prompts.jsonl``,
``completions.jsonl`` and ``rankings.jsonl`` - the one layout shared by the
labelling app's export, the importers and the ``collect_preferences`` stage.
:func:`validate_bundle` checks a bundle as a whole (references between records,
text lengths, duplicates) and moves every bad record to the rejects with the
file and line it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path

from rlhf_core.artifacts import BUNDLE_FILES
from rlhf_core.prompts import blank_reason
from rlhf_core.records import Reject, read_records, write_jsonl
from rlhf_core.rowfiles import iter_raw_rows
from rlhf_core.schemas import Completion, PreferencePair, Prompt, Ranking


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


#: Reject kind by a phrase of the reason, for rejects the record readers file under the generic "invalid".
REASON_KINDS = (
    ("not valid JSON", "bad_json"),
    ("expected a JSON object", "bad_json"),
    ("nested deeper", "bad_json"),
    ("holds an integer of", "bad_json"),
    ("not valid CSV", "bad_row"),
    ("cells for the header", "bad_row"),
    ("not valid UTF", "bad_encoding"),
    ("lone surrogate", "bad_encoding"),
    ("not finite", "not_finite"),
    ("finite number", "not_finite"),
    ("duplicate", "duplicate"),
    ("repeats a completion", "repeated_id"),
    ("at least 2 items", "too_few"),
    ("must not be empty", "empty"),
    ("at least 1 character", "empty"),
    ("at most", "too_long"),
    ("missing", "missing_field"),
)


def classify(reject: Reject) -> Reject:
    """Give a generic ``invalid`` reject a specific kind (duplicate, too_few, ...) so rejects can be counted by reason."""
    if reject.kind != "invalid":
        return reject
    for phrase, kind in REASON_KINDS:
        if phrase in reject.reason:
            return replace(reject, kind=kind)
    return reject


@dataclass
class _Checker:
    """Collects the rejects of one :func:`validate_bundle` call, located through the bundle's origins."""

    bundle: PreferenceBundle
    source: str
    rejects: list[Reject] = field(default_factory=list)

    def reject(self, kind: str, record, position: int, reason: str, field_name: str, reject_kind: str) -> None:
        file, line = self.bundle.origin(kind, record.id, position, self.source)
        raw = record.model_dump_json()
        self.rejects.append(Reject(file, line, reason, field_name, raw[:500] + ("…" if len(raw) > 500 else ""), reject_kind))


def _missing(what: str, record_id: str, rejected: set[str]) -> str:
    return f"{what} {record_id!r} was rejected" if record_id in rejected else f"unknown {what} {record_id!r}"


#: How many missing completions a reject names; a ranking of 100,000 unknown ids gets one short line, not a megabyte.
NAMED_MISSING = 3


def _missing_all(what: str, record_ids: list[str], rejected: set[str]) -> str:
    named = ", ".join(_missing(what, record_id, rejected) for record_id in record_ids[:NAMED_MISSING])
    more = len(record_ids) - NAMED_MISSING
    return f"{named} and {more} more" if more > 0 else named


def validate_bundle(bundle: PreferenceBundle, *, max_text_chars: int, source: str) -> PreferenceBundle:
    """The records of ``bundle`` that are usable together, with every reject (the bundle's own and new ones).

    Prompts: duplicate ids, texts that show nothing (empty, or zero-width characters
    only) or are over ``max_text_chars``.  Completions: duplicate ids, unknown or
    rejected prompts, texts that show nothing or are over-long.  Rankings:
    duplicate ids, unknown or rejected prompts and completions, completions of
    another prompt, ratings too far apart for their difference to be a number
    (a rating-gap margin of infinity), and the same ranking given twice by one annotator.  (Fewer
    than two completions or a repeated completion are refused by the schema when
    a ranking is read.)  The first of two records with one id is kept.
    """
    check = _Checker(bundle, source)
    clean = PreferenceBundle(origins=dict(bundle.origins))
    prompts: dict[str, Prompt] = {}
    for position, prompt in enumerate(bundle.prompts, start=1):
        if prompt.id in prompts:
            check.reject("prompts", prompt, position, f"duplicate id {prompt.id!r}", "id", "duplicate")
        elif blank_reason(prompt.text):
            check.reject("prompts", prompt, position, blank_reason(prompt.text), "text", "empty")
        elif len(prompt.text) > max_text_chars:
            check.reject("prompts", prompt, position, f"text too long: {len(prompt.text)} > {max_text_chars} characters", "text", "too_long")
        else:
            prompts[prompt.id] = prompt
    rejected_prompts = {p.id for p in bundle.prompts} - prompts.keys()

    completions: dict[str, Completion] = {}
    for position, completion in enumerate(bundle.completions, start=1):
        if completion.id in completions:
            check.reject("completions", completion, position, f"duplicate id {completion.id!r}", "id", "duplicate")
        elif completion.prompt_id not in prompts:
            reason = _missing("prompt", completion.prompt_id, rejected_prompts)
            check.reject("completions", completion, position, reason, "prompt_id", "unknown_id")
        elif completion.text and blank_reason(completion.text):  # an empty answer is valid: it can be preferred
            check.reject("completions", completion, position, blank_reason(completion.text), "text", "empty")
        elif len(completion.text) > max_text_chars:
            reason = f"text too long: {len(completion.text)} > {max_text_chars} characters"
            check.reject("completions", completion, position, reason, "text", "too_long")
        else:
            completions[completion.id] = completion
    rejected_completions = {c.id for c in bundle.completions} - completions.keys()

    rankings: dict[str, Ranking] = {}
    given: dict[tuple, str] = {}
    for position, ranking in enumerate(bundle.rankings, start=1):
        same = (ranking.annotator_id, ranking.prompt_id, frozenset(ranking.rank_of().items()))
        unknown = [cid for cid in ranking.completion_ids if cid not in completions]
        foreign = [cid for cid in ranking.completion_ids if cid in completions and completions[cid].prompt_id != ranking.prompt_id]
        if ranking.id in rankings:
            check.reject("rankings", ranking, position, f"duplicate id {ranking.id!r}", "id", "duplicate")
        elif ranking.prompt_id not in prompts:
            reason = _missing("prompt", ranking.prompt_id, rejected_prompts)
            check.reject("rankings", ranking, position, reason, "prompt_id", "unknown_id")
        elif unknown:
            reason = _missing_all("completion", unknown, rejected_completions)
            check.reject("rankings", ranking, position, reason, "completion_ids", "unknown_id")
        elif foreign:
            cid = foreign[0]
            reason = f"completion {cid!r} belongs to prompt {completions[cid].prompt_id!r}, not {ranking.prompt_id!r}"
            check.reject("rankings", ranking, position, reason, "completion_ids", "mismatch")
        elif ranking.ratings and not math.isfinite(max(ranking.ratings) - min(ranking.ratings)):
            reason = f"ratings from {min(ranking.ratings):g} to {max(ranking.ratings):g} differ by more than a number can hold"
            check.reject("rankings", ranking, position, reason, "ratings", "not_finite")
        elif same in given:
            reason = f"same ranking as {given[same]!r} by the same annotator"
            check.reject("rankings", ranking, position, reason, None, "duplicate")
        else:
            rankings[ranking.id] = ranking
            given[same] = ranking.id
    clean.prompts = list(prompts.values())
    clean.completions = list(completions.values())
    clean.rankings = list(rankings.values())
    clean.rejects = [classify(r) for r in bundle.rejects] + check.rejects
    return clean


def bundle_pairs(bundle: PreferenceBundle, margin: str = "rank_distance") -> list[PreferencePair]:
    """Every ranking of a validated bundle expanded to its pairs."""
    prompts = {p.id: p for p in bundle.prompts}
    completions = {c.id: c for c in bundle.completions}
    pairs = []
    for ranking in bundle.rankings:
        pairs.extend(ranking_to_pairs(ranking, prompts[ranking.prompt_id], completions, margin))
    return pairs


def referenced(bundle: PreferenceBundle) -> PreferenceBundle:
    """The bundle cut down to its rankings and the prompts and completions they name."""
    prompt_ids = {r.prompt_id for r in bundle.rankings}
    completion_ids = {cid for r in bundle.rankings for cid in r.completion_ids}
    return PreferenceBundle(
        prompts=[p for p in bundle.prompts if p.id in prompt_ids],
        completions=[c for c in bundle.completions if c.id in completion_ids],
        rankings=list(bundle.rankings),
        rejects=list(bundle.rejects),
        origins=dict(bundle.origins),
    )


def tie_rate(rankings: list[Ranking]) -> float | None:
    """Share of all C(K,2) completion pairs of the rankings that were ranked equal."""
    tied = total = 0
    for ranking in rankings:
        ranks = list(ranking.rank_of().values())
        for a, b in combinations(ranks, 2):
            tied += a == b
            total += 1
    return tied / total if total else None


def length_stats(pairs: list[PreferencePair]) -> dict[str, float]:
    """Mean words of chosen and rejected responses and how often the longer one was chosen (a length-bias check)."""
    if not pairs:
        return {}
    chosen = [len(p.chosen.split()) for p in pairs]
    rejected = [len(p.rejected.split()) for p in pairs]
    return {
        "chosen_words_mean": sum(chosen) / len(pairs),
        "rejected_words_mean": sum(rejected) / len(pairs),
        "longer_chosen_rate": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs),
    }
