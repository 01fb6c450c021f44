"""Preference pairs regrouped by prompt, split by prompt, tokenised once per distinct completion.

InstructGPT (Ouyang et al. 2022, section 3.5): the C(K,2) comparisons of one
ranking are strongly correlated, and shuffling them as independent examples
over-fits - each completion is seen K-1 times per epoch.  They put all
comparisons of a prompt in one batch element instead: K forward passes score
all C(K,2) pairs.  A :class:`PromptComparisons` is that batch element here; it
also gathers the rankings of several annotators of the same prompt, which then
share the K forward passes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_core.artifacts import PreferenceFolder
from rlhf_core.errors import DataError
from rlhf_core.preferences import PreferenceBundle
from rlhf_core.records import read_jsonl
from rlhf_core.schemas import PreferencePair, Ranking

@dataclass(frozen=True)
class Comparison:
    """One preference pair of a prompt: indexes into its completions, with loss margin and weight."""

    chosen: int
    rejected: int
    margin: float
    weight: float
    rank_distance: int | None
    pair: PreferencePair


@dataclass
class PromptComparisons:
    """Every comparison made on one prompt, and the distinct completions they involve."""

    prompt_id: str
    prompt: str
    completion_ids: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    def index_of(self, completion_id: str, text: str, finished: bool) -> int:
        if completion_id not in self.completion_ids:
            self.completion_ids.append(completion_id)
            self.responses.append(text)
            self.finished.append(finished)
        return self.completion_ids.index(completion_id)


def rank_distance(pair: PreferencePair, ranking: Ranking | None) -> int | None:
    """How many ranks apart the two completions were; the pair's own margin is the rank distance otherwise."""
    if ranking is not None:
        rank = ranking.rank_of()
        if pair.chosen_id in rank and pair.rejected_id in rank:
            return rank[pair.rejected_id] - rank[pair.chosen_id]
    return int(pair.margin) if pair.margin > 0 else None


def rating_gap(pair: PreferencePair, ranking: Ranking | None) -> float | None:
    if ranking is None or ranking.ratings is None:
        return None
    ratings = dict(zip(ranking.completion_ids, ranking.ratings))
    if pair.chosen_id not in ratings or pair.rejected_id not in ratings:
        return None
    return max(0.0, ratings[pair.chosen_id] - ratings[pair.rejected_id])


def load_prompt_comparisons(folder: str | Path, margin: str) -> list[PromptComparisons]:
    """The pairs of a preferences folder grouped by prompt, with margins per ``reward.margin``.

    ``margin``: ``none``; ``rank_distance`` (from the ranking); ``rating_gap``
    (from the ranking's ratings; pairs of rankings without ratings get 0).
    Completions count as finished unless the bundle's ``completions.jsonl`` says otherwise.
    """
    folder = Path(folder)
    pairs_file = PreferenceFolder(folder).pairs
    if not pairs_file.exists():
        raise DataError(f"{pairs_file}: not found (run `rlhf collect-preferences` first)")
    pairs = read_jsonl(pairs_file, PreferencePair)
    if not pairs:
        raise DataError(f"{pairs_file}: no preference pairs")
    return group_pairs(pairs, PreferenceBundle.read(folder), margin, PreferenceFolder(folder).rankings)


def group_pairs(
    pairs: list[PreferencePair], bundle: PreferenceBundle, margin: str, where: str | Path = "the bundle"
) -> list[PromptComparisons]:
    """``pairs`` of ``bundle`` grouped by prompt (see :func:`load_prompt_comparisons`)."""
    finished = {c.id: c.finished is not False for c in bundle.completions}
    rankings = {r.id: r for r in bundle.rankings}
    if margin == "rating_gap" and not any(rating_gap(p, rankings.get(p.ranking_id)) is not None for p in pairs):
        raise DataError(f"reward.margin is rating_gap, but no ranking in {where} has ratings")

    groups: dict[str, PromptComparisons] = {}
    for pair in pairs:
        ranking = rankings.get(pair.ranking_id)
        group = groups.setdefault(pair.prompt_id, PromptComparisons(pair.prompt_id, pair.prompt))
        chosen = group.index_of(pair.chosen_id, pair.chosen, finished.get(pair.chosen_id, True))
        rejected = group.index_of(pair.rejected_id, pair.rejected, finished.get(pair.rejected_id, True))
        distance = rank_distance(pair, ranking)
        value = {"none": 0.0, "rank_distance": float(distance or 0), "rating_gap": rating_gap(pair, ranking) or 0.0}[margin]
        group.comparisons.append(Comparison(chosen, rejected, value, pair.weight, distance, pair))
    return list(groups.values())


def _split_key(seed: int, prompt_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()


def split_by_prompt(
    groups: list[PromptComparisons], validation_fraction: float, seed: int
) -> tuple[list[PromptComparisons], list[PromptComparisons]]:
    """(train, validation): whole prompts go to one side, chosen by a hash of (seed, prompt id).

    The prompts with the smallest hashes - ``round(fraction * n)`` of them, at least
    one and never all - are held out, so no prompt's pairs straddle the split.
    """
    if len(groups) < 2:
        raise DataError(f"preferences cover {len(groups)} prompt(s); at least 2 are needed to hold one out for validation")
    ordered = sorted(groups, key=lambda g: _split_key(seed, g.prompt_id))
    held_out = min(len(groups) - 1, max(1, round(validation_fraction * len(groups))))
    validation = {g.prompt_id for g in ordered[:held_out]}
    return [g for g in groups if g.prompt_id not in validation], [g for g in groups if g.prompt_id in validation]


@dataclass
class EncodedGroups:
    """Token ids of every distinct completion, one training example per prompt, and the conversations' lengths.

    An example names its completions by their index in ``sequences``, and its
    pairs by indexes into its own completions.  ``lengths`` are the token
    counts before any cut to ``reward.max_length``.
    """

    sequences: list[list[int]]
    examples: list[dict]
    lengths: list[int]
    max_length: int

    @property
    def truncated(self) -> int:
        return sum(length > self.max_length for length in self.lengths)


def encode_groups(tokenizer, groups: list[PromptComparisons], reads_stop_token: bool) -> EncodedGroups:
    """Tokenise each prompt's completions once (:func:`rlhf_core.reward.model.encode_conversation`)."""
    from rlhf_core.reward.model import encode_conversation, finished_flags

    sequences, examples, lengths = [], [], []
    for group in groups:
        flags = finished_flags([group.prompt] * len(group.responses), group.finished, reads_stop_token)
        encoded = [encode_conversation(tokenizer, group.prompt, r, f) for r, f in zip(group.responses, flags)]
        ids = [seq for seq, _ in encoded]
        examples.append(
            {
                "completions": list(range(len(sequences), len(sequences) + len(ids))),
                "chosen": [c.chosen for c in group.comparisons],
                "rejected": [c.rejected for c in group.comparisons],
                "margin": [c.margin for c in group.comparisons],
                "weight": [c.weight for c in group.comparisons],
                # The trainer batches examples of similar length together: less compute is wasted on padding.
                "length": max(len(seq) for seq in ids),
            }
        )
        sequences.extend(ids)
        lengths.extend(full for _, full in encoded)
    return EncodedGroups(sequences, examples, lengths, tokenizer.model_max_length)


def num_pairs(groups: list[PromptComparisons]) -> int:
    return sum(len(g.comparisons) for g in groups)
