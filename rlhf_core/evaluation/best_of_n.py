"""The best-of-n frontier: what the reference achieves by drawing n samples and keeping the proxy's favourite.

Gao, Schulman & Hilton (2022) compare RL against best-of-n sampling from the
reference, whose KL is known in closed form, ``KL = log n - (n - 1) / n``.  A
policy point below the frontier bought its KL less efficiently than sampling n
times would have; gold falling along the frontier while proxy rises is the
over-optimisation their paper measures.

One pool of N >= n samples per prompt serves every n: the mean over all
C(N, n) subsets of the pool of "the value of the proxy-best sample" is an
unbiased estimate of its expectation (the same trick as the pass@k estimator
of Chen et al. 2021), and it has a closed form over the pool sorted by proxy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf_core.evaluation.metrics import mean_interval


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || reference) in nats: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError("n must be at least 1")
    return math.log(n) - (n - 1) / n


def subset_max_weights(pool_size: int, n: int) -> list[float]:
    """P(the i-th smallest of ``pool_size`` values is the largest of a uniform random n-subset), i = 1..pool_size.

    That is C(i - 1, n - 1) / C(pool_size, n): the subset must hold item i and
    n - 1 of the i - 1 items below it.
    """
    if not 1 <= n <= pool_size:
        raise ValueError(f"n ({n}) must be between 1 and the pool size ({pool_size})")
    total = math.comb(pool_size, n)
    return [math.comb(i - 1, n - 1) / total for i in range(1, pool_size + 1)]


def expected_best_of_n(selector: Sequence[float], values: Sequence[float], n: int) -> float:
    """Unbiased estimate of E[value of the best-by-``selector`` sample among n drawn from this pool].

    With ``values is selector`` this is the expected maximum proxy score; with
    gold values it is the gold reward of best-of-n selection by the proxy.
    """
    if len(selector) != len(values):
        raise ValueError(f"selector has {len(selector)} scores, values {len(values)}")
    order = sorted(range(len(selector)), key=lambda i: selector[i])
    weights = subset_max_weights(len(selector), n)
    return sum(weight * values[index] for weight, index in zip(weights, order))


@dataclass(frozen=True)
class FrontierPoint:
    """Expected proxy (and gold) reward of best-of-n at its KL, averaged over ``prompts`` prompts.

    ``gold_gain`` is what best-of-n adds to the gold of one reference sample on
    those prompts (per prompt: best-of-n minus the pool's mean), with the 95%
    interval of that mean over the prompts, ``gold_gain_interval``: the
    yardstick a policy's own gold gain is read against, and how far it can be
    trusted on a few pool prompts.
    """

    n: int
    kl: float
    proxy: float
    gold: float | None
    prompts: int
    gold_gain: float | None = None
    gold_gain_interval: tuple[float, float] | None = None


def frontier(
    proxy_pools: Sequence[Sequence[float]], gold_pools: Sequence[Sequence[float]] | None, ns: Sequence[int]
) -> list[FrontierPoint]:
    """The best-of-n frontier averaged over prompts; pool ``p`` holds the reference samples of prompt ``p``."""
    if not proxy_pools:
        raise ValueError("no best-of-n pools")
    points = []
    for n in ns:
        proxy = sum(expected_best_of_n(pool, pool, n) for pool in proxy_pools) / len(proxy_pools)
        gold = gain = interval = None
        if gold_pools is not None:
            best = [expected_best_of_n(p, g, n) for p, g in zip(proxy_pools, gold_pools)]
            gold = sum(best) / len(best)
            gain, low, high = mean_interval([value - sum(g) / len(g) for value, g in zip(best, gold_pools)])
            interval = (low, high) if len(gold_pools) > 1 else None  # one prompt: no spread to measure
        points.append(FrontierPoint(n, best_of_n_kl(n), proxy, gold, len(proxy_pools), gain, interval))
    return points
