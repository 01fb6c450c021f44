"""Reward over-optimisation: the proxy keeps rising while the gold it stands for falls (Gao et al. 2022).

Two views of the same failure:

* on the eval prompts, the candidate's paired gain over the reference - proxy
  significantly up while gold is significantly down;
* along the PPO run, the gold measured every few updates on a fixed slice
  (``plots/ppo_curve.csv``, per prompt in ``plots/ppo_gold_probe.csv``) - the
  last probe's gold fell below an earlier probe's by more than a tolerance,
  significantly, while the proxy on that slice rose.

The slice is small (16 prompts, one answer each), so one probe's mean moves by
chance about as much as the tolerance.  Comparing the last probe with the best
of the earlier ones by their means flags an unchanged policy most of the time
(the best of five noisy values sits above the truth); so the drop is tested per
prompt, paired, against every earlier probe, with the confidence level split
among them (Bonferroni).  Without per-prompt values (a curve from an older run)
the means are compared as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlhf_core.evaluation.metrics import mean_interval, t_quantile

#: one-sided level of the along-PPO test, shared among the earlier probes it compares the last one with
DROP_ALPHA = 0.05


@dataclass(frozen=True)
class Drop:
    """The last probe's gold below an earlier probe's, paired by prompt."""

    update: int
    mean: float  # earlier gold - last gold, averaged over the slice's prompts
    low: float  # one-sided lower confidence bound of that mean (level DROP_ALPHA / earlier probes)
    proxy_rise: float | None  # last proxy - earlier proxy (slice means)

    def significant(self, tolerance: float) -> bool:
        return self.mean > tolerance and self.low > 0 and self.proxy_rise is not None and self.proxy_rise > 0


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
    #: the last probe against each earlier one, paired by prompt (empty without per-prompt values)
    drops: tuple[Drop, ...] = ()

    @property
    def worst(self) -> Drop | None:
        """The earlier probe the last one fell furthest below, by the lower bound of the drop."""
        return max(self.drops, key=lambda d: d.low, default=None)

    def significant_drop(self, tolerance: float) -> Drop | None:
        """Of the falls that count as over-optimisation, the one with the largest lower bound; None if none does."""
        return max((d for d in self.drops if d.significant(tolerance)), key=lambda d: d.low, default=None)

    def overoptimised(self, tolerance: float) -> bool:
        if self.drops:
            return self.significant_drop(tolerance) is not None
        proxy_rose = self.proxy_last is not None and self.proxy_at_peak is not None and self.proxy_last > self.proxy_at_peak
        return self.peak - self.last > tolerance and proxy_rose


def gold_trend(rows: Sequence[dict[str, float | None]], probe: Sequence[dict[str, float | None]] = ()) -> GoldTrend | None:
    """The gold trend of a PPO run, or None with fewer than two gold measurements.

    ``rows``: the curve (``update``, ``gold``, ``gold_proxy``); ``probe``: the
    same probes per prompt (``update``, ``prompt``, ``gold``), which turn the
    comparison of the last probe with the earlier ones into paired tests.
    """
    measured = [r for r in rows if r.get("gold") is not None and r.get("update") is not None]
    if len(measured) < 2:
        return None
    proxy_key = "gold_proxy" if any(r.get("gold_proxy") is not None for r in measured) else "score"
    peak = max(measured, key=lambda r: r["gold"])
    last = measured[-1]
    return GoldTrend(
        points=len(measured),
        first=measured[0]["gold"],
        peak=peak["gold"],
        last=last["gold"],
        peak_update=int(peak["update"]),
        last_update=int(last["update"]),
        proxy_at_peak=peak.get(proxy_key),
        proxy_last=last.get(proxy_key),
        drops=_paired_drops(measured, proxy_key, probe),
    )


def _paired_drops(measured: Sequence[dict], proxy_key: str, probe: Sequence[dict]) -> tuple[Drop, ...]:
    per_update: dict[int, dict[int, float]] = {}
    for r in probe:
        if r.get("update") is not None and r.get("prompt") is not None and r.get("gold") is not None:
            per_update.setdefault(int(r["update"]), {})[int(r["prompt"])] = r["gold"]
    last = measured[-1]
    final = per_update.get(int(last["update"]))
    earlier = measured[:-1]
    if not final or any(int(r["update"]) not in per_update for r in earlier):
        return ()
    drops = []
    for row in earlier:
        golds = per_update[int(row["update"])]
        shared = sorted(set(golds) & set(final))
        if len(shared) < 2:
            return ()
        z = t_quantile(1 - DROP_ALPHA / len(earlier), len(shared) - 1)
        mean, low, _ = mean_interval([golds[i] - final[i] for i in shared], z=z)
        rise = None if row.get(proxy_key) is None or last.get(proxy_key) is None else last[proxy_key] - row[proxy_key]
        drops.append(Drop(int(row["update"]), mean, low, rise))
    return tuple(drops)


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
        d = trend.significant_drop(tolerance)
        if d is not None:
            reasons.append(
                f"along PPO gold fell by {d.mean:.3f} from update {d.update} to update {trend.last_update} on the same "
                f"prompts (one-sided {1 - DROP_ALPHA:.0%} bound {d.low:.3f} > 0 over {len(trend.drops)} earlier "
                f"probes) while the proxy rose by {d.proxy_rise:.3f}"
            )
        else:  # no per-prompt values: judged by the means
            reasons.append(
                f"along PPO gold fell from {trend.peak:.3f} (update {trend.peak_update}) to {trend.last:.3f} (update "
                f"{trend.last_update}) while the proxy rose from {trend.proxy_at_peak:.3f} to {trend.proxy_last:.3f}"
            )
    return OverOptimisation(bool(reasons), tuple(reasons))
