"""Sample-level metrics: win rates with confidence intervals, diversity, repetition, lengths, perplexity.

Everything here works on plain Python lists, so each function can be checked by hand.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

#: two-sided 95% quantile of the standard normal
Z_95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and is sensible for
    the small samples and extreme rates an evaluation often has.  ``successes``
    may be fractional (ties counted as half a win).
    """
    if n <= 0:
        raise ValueError("a proportion needs at least one trial")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    """How often A beat B over paired comparisons; a tie counts as half a win."""

    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of :attr:`rate`."""
        return wilson_interval(self.wins + 0.5 * self.ties, self.n)

    def as_metrics(self, name: str) -> dict[str, float]:
        low, high = self.interval
        return {name: self.rate, f"{name}_low": low, f"{name}_high": high, f"{name}_n": self.n}


def win_rate(a: Sequence[float], b: Sequence[float]) -> WinRate:
    """Paired win rate of scores ``a`` over ``b`` (same prompts, same order)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"win rate needs two equally long, non-empty score lists (got {len(a)} and {len(b)})")
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    return WinRate(wins, ties, len(a) - wins - ties)


def ngrams(sequence: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams over all n-grams of every sequence together (distinct-n, Li et al. 2016)."""
    grams = [gram for sequence in sequences for gram in ngrams(sequence, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Mean over sequences of the share of n-grams that repeat one seen earlier in the same sequence.

    This is seq-rep-n of Welleck et al. (2020), ``1 - unique n-grams / n-grams``;
    a sequence shorter than ``n`` repeats nothing.  A policy that collapses into
    "the the the ..." scores near 1.
    """
    if not sequences:
        return 0.0
    rates = []
    for sequence in sequences:
        grams = ngrams(sequence, n)
        rates.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(rates) / len(rates)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, median, standard deviation, minimum and maximum of response lengths."""
    if not lengths:
        raise ValueError("no lengths")
    return {
        "mean": statistics.fmean(lengths),
        "median": float(statistics.median(lengths)),
        "std": statistics.pstdev(lengths),
        "min": float(min(lengths)),
        "max": float(max(lengths)),
    }


def perplexity(total_logprob: float, total_tokens: int) -> float:
    """exp of the mean negative log-likelihood per token."""
    if total_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(-total_logprob / total_tokens)


def mean_interval(values: Sequence[float], z: float = Z_95) -> tuple[float, float, float]:
    """Mean with a normal-approximation 95% interval (infinitely wide for fewer than two values)."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, -math.inf, math.inf
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half
