"""Promotion gates: each compares one measured value with its threshold from ``params.yaml`` (``gates:``).

A candidate becomes the champion only if every gate passes.  A gate whose value
could not be measured fails (a policy is not promoted on missing evidence),
except the comparison with a champion when there is none yet.

Win rates are judged by the gold function when there is one, else by returned
human labels (:mod:`rlhf_core.evaluation.human_eval`); never by the proxy the
policy was optimised against.  Their gate value is the lower end of the 95%
interval, so a small evaluation set has to win clearly to pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from rlhf_core.config import GatesConfig
from rlhf_core.evaluation.metrics import WinRate
from rlhf_core.evaluation.overoptimisation import OverOptimisation


class GateResult(BaseModel):
    """One gate's verdict: ``value`` compared with ``threshold`` by ``rule``.

    ``reason`` says why the gate failed, or why it passed without a value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    value: float | bool | None
    threshold: float | bool
    rule: Literal[">=", "<=", "=="]
    passed: bool
    reason: str = ""


@dataclass(frozen=True)
class Judged:
    """A win rate and who judged it ("gold" or "human"); ``win_rate`` is None when nobody did."""

    win_rate: WinRate | None
    judge: str


@dataclass(frozen=True)
class Evidence:
    """Everything the gates look at, as measured by the evaluate stage."""

    vs_reference: Judged
    vs_champion: Judged | None  # None: there is no champion yet
    kl: float
    length_ratio: float
    distinct_2: float
    repetition_rate: float
    overoptimisation: OverOptimisation
    reward_accuracy: float | None


def _compare(name: str, value: float | None, threshold: float, rule: str, missing: str) -> GateResult:
    if value is None:
        return GateResult(name=name, value=None, threshold=threshold, rule=rule, passed=False, reason=missing)
    passed = value >= threshold if rule == ">=" else value <= threshold
    reason = "" if passed else f"{name} {value:.4g} is not {rule} {threshold:.4g}"
    return GateResult(name=name, value=value, threshold=threshold, rule=rule, passed=passed, reason=reason)


def _win_rate_gate(name: str, judged: Judged | None, threshold: float, opponent: str) -> GateResult:
    if judged is None:
        return GateResult(name=name, value=None, threshold=threshold, rule=">=", passed=True, reason=f"no {opponent} yet")
    low = judged.win_rate.interval[0] if judged.win_rate is not None else None
    missing = f"win rate vs {opponent} not measured: no gold function and no returned human labels"
    result = _compare(name, low, threshold, ">=", missing)
    if not result.passed and low is not None:
        rate = judged.win_rate.rate
        reason = f"{judged.judge} win rate vs {opponent} {rate:.3f}, lower 95% bound {low:.3f} < {threshold:.3g}"
        result = result.model_copy(update={"reason": reason})
    return result


def apply_gates(evidence: Evidence, cfg: GatesConfig) -> list[GateResult]:
    """Every gate's verdict, in a fixed order."""
    overopt = evidence.overoptimisation
    blocked = overopt.flagged and cfg.block_on_overoptimisation
    return [
        _win_rate_gate("win_rate_vs_reference", evidence.vs_reference, cfg.min_gold_win_rate_vs_reference, "reference"),
        _win_rate_gate("win_rate_vs_champion", evidence.vs_champion, cfg.min_gold_win_rate_vs_champion, "champion"),
        _compare("kl", evidence.kl, cfg.max_kl, "<=", "KL not measured"),
        _compare("length_ratio_min", evidence.length_ratio, cfg.min_length_ratio, ">=", "length ratio not measured"),
        _compare("length_ratio_max", evidence.length_ratio, cfg.max_length_ratio, "<=", "length ratio not measured"),
        _compare("distinct_2", evidence.distinct_2, cfg.min_distinct_2, ">=", "distinct-2 not measured"),
        _compare("repetition_rate", evidence.repetition_rate, cfg.max_repetition_rate, "<=", "repetition not measured"),
        GateResult(
            name="overoptimisation",
            value=overopt.flagged,
            threshold=False,
            rule="==",
            passed=not blocked,
            reason="over-optimisation: " + "; ".join(overopt.reasons) if blocked else "",
        ),
        _compare(
            "reward_accuracy",
            evidence.reward_accuracy,
            cfg.min_reward_accuracy,
            ">=",
            "reward-model accuracy not found (metrics/train_reward.json reward/accuracy)",
        ),
    ]


def all_passed(gates: list[GateResult]) -> bool:
    return all(gate.passed for gate in gates)


def failure_reasons(gates: list[GateResult]) -> list[str]:
    return [gate.reason or f"{gate.name} failed" for gate in gates if not gate.passed]


def gate_metrics(gates: list[GateResult]) -> dict[str, object]:
    """``eval/gate/<name>/{value,threshold,passed}`` for every gate, plus ``eval/all_gates_passed``."""
    metrics: dict[str, object] = {}
    for gate in gates:
        prefix = f"eval/gate/{gate.name}"
        metrics[f"{prefix}/value"] = gate.value
        metrics[f"{prefix}/threshold"] = gate.threshold
        metrics[f"{prefix}/passed"] = gate.passed
        if gate.reason:
            metrics[f"{prefix}/reason"] = gate.reason
    metrics["eval/all_gates_passed"] = all_passed(gates)
    metrics["eval/failed_gates"] = ", ".join(g.name for g in gates if not g.passed)
    return metrics
