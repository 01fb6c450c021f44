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


def wilson_interval(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
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
    """How often A beat B over paired comparisons; a tie counts as half a win.

    ``effective_n``: when the comparisons are not independent (every response of
    a prompt against every response of the other policy to it,
    :func:`prompt_win_rate`), the number of independent comparisons they are worth;
    the interval is then Wilson's at that many.
    """

    wins: int
    ties: int
    losses: int
    effective_n: float | None = None

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of :attr:`rate` (at :attr:`effective_n` comparisons when set)."""
        if self.effective_n is None:
            return wilson_interval(self.wins + 0.5 * self.ties, self.n)
        return wilson_interval(self.rate * self.effective_n, self.effective_n)

    def as_metrics(self, name: str) -> dict[str, float]:
        low, high = self.interval
        metrics = {name: self.rate, f"{name}_low": low, f"{name}_high": high, f"{name}_n": self.n}
        if self.effective_n is not None:
            metrics[f"{name}_effective_n"] = self.effective_n
        return metrics


def win_rate(a: Sequence[float], b: Sequence[float]) -> WinRate:
    """Paired win rate of scores ``a`` over ``b`` (same prompts, same order)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"win rate needs two equally long, non-empty score lists (got {len(a)} and {len(b)})")
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    return WinRate(wins, ties, len(a) - wins - ties)


def prompt_win_rate(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> WinRate:
    """Win rate of ``a``'s responses over ``b``'s with several responses per prompt: ``a[i]`` and ``b[i]`` score
    each policy's responses to prompt i, and every response of ``a`` meets every response of ``b`` to the same prompt.

    Every prompt has as many pairs as every other, so the rate is the mean over
    prompts of the share of its pairs won.  The pairs of one prompt are not
    independent: the interval is Wilson's at the effective number of
    comparisons, ``prompts x p(1 - p) / var(per-prompt share)`` (Kish's design
    effect), between the prompt count and the pair count.  With one response
    per prompt on each side this is :func:`win_rate` exactly.
    """
    if len(a) != len(b) or not a or any(not x or not y for x, y in zip(a, b)):
        raise ValueError(f"win rate needs scores for every prompt on both sides (got {len(a)} and {len(b)} prompts)")
    if {len(x) for x in a} | {len(y) for y in b} == {1}:
        return win_rate([x[0] for x in a], [y[0] for y in b])
    if len({len(x) for x in a}) != 1 or len({len(y) for y in b}) != 1:
        raise ValueError("every prompt needs as many responses as every other, on each side")
    outcomes = [[(x > y) + 0.5 * (x == y) for x in xs for y in ys] for xs, ys in zip(a, b)]
    wins = sum(o == 1.0 for row in outcomes for o in row)
    ties = sum(o == 0.5 for row in outcomes for o in row)
    pairs = sum(len(row) for row in outcomes)
    shares = [statistics.fmean(row) for row in outcomes]
    rate, spread = statistics.fmean(shares), statistics.pvariance(shares)
    effective = pairs if spread == 0 else len(shares) * rate * (1 - rate) / spread
    return WinRate(wins, ties, pairs - wins - ties, min(max(effective, len(shares)), pairs))


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


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile, by the Cornish-Fisher expansion around the normal's (at 0.975: 2.5678 for 5 degrees of
    freedom against 2.5706 exactly, 2.13142 for 15 against 2.13145); small samples need it where the normal's
    interval is too narrow."""
    z = statistics.NormalDist().inv_cdf(p)
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_interval(values: Sequence[float], z: float = Z_95) -> tuple[float, float, float]:
    """Mean with a normal-approximation 95% interval (infinitely wide for fewer than two values)."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, -math.inf, math.inf
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half
