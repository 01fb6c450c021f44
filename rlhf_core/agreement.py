"""Inter-annotator agreement on rankings.

Two measures, both computed over annotators who ranked the same prompt:

* **Pairwise agreement** - the share of completion pairs that two annotators
  order the same way.  This is the number InstructGPT reports between its
  labelers (72.6 ± 1.5 %, Ouyang et al. 2022, section 5.1).  Ties get partial
  credit: both annotators tie the pair -> 1, both order it the same way -> 1,
  one ties and the other does not -> 1/2, opposite orders -> 0.  Only the
  completions both rankings contain are compared.
* **Krippendorff's alpha, ordinal** - units are completions, values are the
  rank a completion received within its prompt's ranking, coders are
  annotators (Krippendorff, *Content Analysis*, 2004, ch. 11; Hayes &
  Krippendorff 2007 for the coincidence-matrix computation used here).

Only the completions two rankings share are compared, so a prompt ranked again
in a later round (new candidates) does not mix with the earlier round.  An
annotator who ranked the same completion set more than once counts with the
latest of those rankings only, and nobody is compared with themselves.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations

from rlhf_core.schemas import Ranking


@dataclass(frozen=True)
class AgreementReport:
    """Pairwise agreement over every (annotator pair, completion pair) comparison.

    ``agreement`` is None when no two annotators ranked a common prompt.
    ``per_annotator`` maps an annotator to its agreement with all the others.
    """

    agreement: float | None
    comparisons: int
    per_annotator: dict[str, float] = field(default_factory=dict)


def pair_credit(first: dict[str, int], second: dict[str, int], a: str, b: str) -> float:
    """Agreement credit of two rank maps on the pair (a, b): 1 same order or both tied, 1/2 one tie, 0 opposite."""
    x = _sign(first[a] - first[b])
    y = _sign(second[a] - second[b])
    if x == y:
        return 1.0
    if x == 0 or y == 0:
        return 0.5
    return 0.0


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def _compare(first: Ranking, second: Ranking) -> tuple[float, int]:
    """(summed credit, number of pairs) of two rankings over the completions they share."""
    rank_a, rank_b = first.rank_of(), second.rank_of()
    shared = [cid for cid in first.completion_ids if cid in rank_b]
    credit, count = 0.0, 0
    for a, b in combinations(shared, 2):
        credit += pair_credit(rank_a, rank_b, a, b)
        count += 1
    return credit, count


def latest_by_prompt(rankings: list[Ranking]) -> dict[str, list[Ranking]]:
    """prompt id -> the latest ranking of each (annotator, completion set), oldest first."""
    latest: dict[tuple[str, str, frozenset[str]], Ranking] = {}
    for ranking in sorted(rankings, key=lambda r: r.created_at):
        latest.pop((ranking.prompt_id, ranking.annotator_id, frozenset(ranking.completion_ids)), None)
        latest[ranking.prompt_id, ranking.annotator_id, frozenset(ranking.completion_ids)] = ranking
    by_prompt: dict[str, list[Ranking]] = defaultdict(list)
    for ranking in latest.values():
        by_prompt[ranking.prompt_id].append(ranking)
    return by_prompt


def pairwise_agreement(rankings: list[Ranking]) -> AgreementReport:
    """Share of completion pairs that two annotators of the same prompt order alike (see module docstring)."""
    total_credit, total_count = 0.0, 0
    credit: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for prompt_rankings in latest_by_prompt(rankings).values():
        for first, second in combinations(prompt_rankings, 2):
            if first.annotator_id == second.annotator_id:
                continue
            pair_sum, pairs = _compare(first, second)
            if not pairs:
                continue
            total_credit += pair_sum
            total_count += pairs
            for annotator in (first.annotator_id, second.annotator_id):
                credit[annotator] += pair_sum
                count[annotator] += pairs
    per_annotator = {name: credit[name] / count[name] for name in sorted(count) if count[name]}
    agreement = total_credit / total_count if total_count else None
    return AgreementReport(agreement, total_count, per_annotator)


def agreement_with_gold(rankings: list[Ranking], gold_rankings: dict[str, Ranking]) -> dict[str, float]:
    """Each annotator's pairwise agreement with the known ranking of the gold prompts it ranked."""
    credit: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for prompt_id, prompt_rankings in latest_by_prompt(rankings).items():
        gold = gold_rankings.get(prompt_id)
        if gold is None:
            continue
        for ranking in prompt_rankings:
            pair_sum, pairs = _compare(ranking, gold)
            credit[ranking.annotator_id] += pair_sum
            count[ranking.annotator_id] += pairs
    return {name: credit[name] / count[name] for name in sorted(count) if count[name]}


def krippendorff_alpha(rankings: list[Ranking]) -> float | None:
    """Ordinal Krippendorff's alpha of the ranks annotators gave each completion.

    Returns None when no completion was ranked by two annotators (no pairable
    values), or when every pairable value is the same (alpha is undefined: there
    is no disagreement to expect).
    """
    units: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for prompt_id, prompt_rankings in latest_by_prompt(rankings).items():
        for ranking in prompt_rankings:  # oldest first: an annotator's latest value of a unit wins
            for completion_id, rank in ranking.rank_of().items():
                units[prompt_id, completion_id][ranking.annotator_id] = rank
    coincidences = _coincidences([list(values.values()) for values in units.values() if len(values) >= 2])
    if not coincidences:
        return None
    marginals: Counter[int] = Counter()
    for (c, _k), weight in coincidences.items():
        marginals[c] += weight
    total = sum(marginals.values())
    distance = _ordinal_distances(marginals)
    observed = sum(weight * distance[c, k] for (c, k), weight in coincidences.items())
    expected = sum(marginals[c] * marginals[k] * distance[c, k] for c in marginals for k in marginals)
    if expected == 0:
        return None
    return 1.0 - (total - 1) * observed / expected


def interval_alpha(units: list[list[float]]) -> float | None:
    """Interval Krippendorff's alpha of scores (e.g. 1-7 ratings); each unit lists the values its coders gave it.

    Same coincidence-matrix computation as the ordinal alpha, with the interval
    metric delta^2(c, k) = (c - k)^2.  None when no unit has two values or when
    every pairable value is the same.
    """
    coincidences = _coincidences([values for values in units if len(values) >= 2])
    if not coincidences:
        return None
    marginals: Counter[float] = Counter()
    for (c, _k), weight in coincidences.items():
        marginals[c] += weight
    total = sum(marginals.values())
    observed = sum(weight * (c - k) ** 2 for (c, k), weight in coincidences.items())
    expected = sum(marginals[c] * marginals[k] * (c - k) ** 2 for c in marginals for k in marginals)
    if expected == 0:
        return None
    return 1.0 - (total - 1) * observed / expected


def _coincidences(units: list[list[int]]) -> Counter[tuple[int, int]]:
    """Coincidence matrix o_ck: each ordered pair of values within a unit of m values adds 1/(m-1)."""
    matrix: Counter[tuple[int, int]] = Counter()
    for values in units:
        weight = 1.0 / (len(values) - 1)
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    matrix[c, k] += weight
    return matrix


def _ordinal_distances(marginals: Counter[int]) -> dict[tuple[int, int], float]:
    """Ordinal metric: delta^2(c, k) = (sum of n_g for g from c to k, minus (n_c + n_k) / 2) squared."""
    values = sorted(marginals)
    distance = {}
    for i, c in enumerate(values):
        for k in values[i:]:
            between = sum(marginals[g] for g in values if c <= g <= k) - (marginals[c] + marginals[k]) / 2
            distance[c, k] = distance[k, c] = between**2
    return distance
