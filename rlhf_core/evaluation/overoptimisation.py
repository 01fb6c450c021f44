"""Reward over-optimisation: the proxy keeps rising while the gold it stands for falls (Gao et al. 2022).

Two views of the same failure:

* on the eval prompts, the candidate's paired gain over the reference - proxy
  significantly up while gold is significantly down;
* along the PPO run, the gold measured every few updates on a fixed slice
  (``plots/ppo_curve.csv``) - gold fell from its peak by more than a
  tolerance while the proxy on that slice rose past its value at the peak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlhf_core.evaluation.metrics import mean_interval


@dataclass(frozen=True)
class GoldTrend:
    """Gold (and the proxy on the same slice) at the first, best and last measured PPO updates."""

    points: int
    first: float
    peak: float
    last: float
    peak_update: int
    last_update: int
    proxy_at_peak: float | None
    proxy_last: float | None

    def overoptimised(self, tolerance: float) -> bool:
        proxy_rose = self.proxy_last is not None and self.proxy_at_peak is not None and self.proxy_last > self.proxy_at_peak
        return self.peak - self.last > tolerance and proxy_rose


def gold_trend(rows: Sequence[dict[str, float | None]]) -> GoldTrend | None:
    """The gold trend of a PPO run, or None with fewer than two gold measurements."""
    measured = [r for r in rows if r.get("gold") is not None and r.get("update") is not None]
    if len(measured) < 2:
        return None
    proxy_key = "gold_proxy" if any(r.get("gold_proxy") is not None for r in measured) else "score"
    peak = max(measured, key=lambda r: r["gold"])
    return GoldTrend(
        points=len(measured),
        first=measured[0]["gold"],
        peak=peak["gold"],
        last=measured[-1]["gold"],
        peak_update=int(peak["update"]),
        last_update=int(measured[-1]["update"]),
        proxy_at_peak=peak.get(proxy_key),
        proxy_last=measured[-1].get(proxy_key),
    )


@dataclass(frozen=True)
class Gain:
    """Mean paired gain of the candidate over the reference with its 95% interval."""

    mean: float
    low: float
    high: float


def paired_gain(candidate: Sequence[float], reference: Sequence[float]) -> Gain:
    if len(candidate) != len(reference):
        raise ValueError("paired gain needs one reference score per candidate score")
    return Gain(*mean_interval([c - r for c, r in zip(candidate, reference)]))


@dataclass(frozen=True)
class OverOptimisation:
    flagged: bool
    reasons: tuple[str, ...]


def assess(proxy_gain: Gain, gold_gain: Gain | None, trend: GoldTrend | None, tolerance: float) -> OverOptimisation:
    """Flag over-optimisation when either view shows proxy up and gold down; say which and by how much."""
    reasons = []
    if gold_gain is not None and proxy_gain.low > 0 and gold_gain.high < 0:
        reasons.append(
            f"on eval prompts proxy rose by {proxy_gain.mean:+.3f} while gold fell by {gold_gain.mean:+.3f} "
            "(both outside their 95% intervals)"
        )
    if trend is not None and trend.overoptimised(tolerance):
        reasons.append(
            f"along PPO gold fell from {trend.peak:.3f} (update {trend.peak_update}) to {trend.last:.3f} "
            f"(update {trend.last_update}) while the proxy rose from {trend.proxy_at_peak:.3f} to {trend.proxy_last:.3f}"
        )
    return OverOptimisation(bool(reasons), tuple(reasons))
