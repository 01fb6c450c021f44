"""Registry decisions on ``rlhf-policy``: promote a candidate that passed every gate, reject one that did not, roll back.

Aliases: ``candidate`` (set by the PPO stage) is the version under evaluation,
``champion`` the version in use, ``previous`` the champion it replaced.  Every
decision is written onto the version as tags - each gate's value, threshold
and verdict, the lineage (preference data hash, reward-model version, PPO run,
Prefect flow run) and a ``status`` - so the registry alone explains why a
version is or is not the champion.  All MLflow calls go through
:mod:`rlhf_core.tracking`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from rlhf_core import tracking
from rlhf_core.errors import RLHFError
from rlhf_core.evaluation.gates import GateResult, failure_reasons

CHAMPION, PREVIOUS = "champion", "previous"
#: tag on a promoted version naming the champion it replaced, so that rollbacks can walk back more than once
REPLACED_TAG = "promotion.replaced_champion"
REJECTION_TAGS = ("rejected", "rejection_reasons")
#: MLflow keeps model-version tag values up to 5000 characters
MAX_TAG_CHARS = 5000


@dataclass(frozen=True)
class Decision:
    version: str
    promoted: bool
    champion: str | None  # after the decision
    previous: str | None
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Rollback:
    demoted: str
    champion: str
    previous: str | None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def gate_tags(gates: Sequence[GateResult]) -> dict[str, str]:
    """``gate.<name>.{value,threshold,passed[,reason]}`` for every gate and ``gates.all_passed``."""
    tags = {}
    for gate in gates:
        tags[f"gate.{gate.name}.value"] = str(gate.value)
        tags[f"gate.{gate.name}.threshold"] = f"{gate.rule} {gate.threshold}"
        tags[f"gate.{gate.name}.passed"] = str(gate.passed).lower()
        if gate.reason:
            tags[f"gate.{gate.name}.reason"] = gate.reason[:MAX_TAG_CHARS]
    tags["gates.all_passed"] = str(all(g.passed for g in gates)).lower()
    return tags


def decide(
    version: str, gates: Sequence[GateResult], lineage: Mapping[str, str], model: str = tracking.POLICY_MODEL
) -> Decision:
    """Promote ``version`` if every gate passed, else tag it rejected with the reasons; the champion moves only on success."""
    if tracking.model_version(model, version) is None:
        raise RLHFError(f"{model} has no version {version!r} to decide on")
    tags = {**gate_tags(gates), **{f"lineage.{k}": v for k, v in lineage.items() if v}, "decided_at": _now()}
    reasons = tuple(failure_reasons(list(gates)))
    if reasons:
        tracking.tag_version(
            model, version, {**tags, "status": "rejected", "rejected": "true", "rejection_reasons": "; ".join(reasons)[:MAX_TAG_CHARS]}
        )
        champion = tracking.model_by_alias(model, CHAMPION)
        previous = tracking.model_by_alias(model, PREVIOUS)
        return Decision(version, False, champion and champion.version, previous and previous.version, reasons)
    return promote(version, tags, model)


def promote(version: str, tags: Mapping[str, str], model: str = tracking.POLICY_MODEL) -> Decision:
    """Make ``version`` the champion; the champion it replaces becomes ``previous``."""
    old = tracking.model_by_alias(model, CHAMPION)
    if old is not None and old.version == version:
        previous = tracking.model_by_alias(model, PREVIOUS)
        tracking.tag_version(model, version, tags)
        return Decision(version, True, version, previous and previous.version, ())
    tags = {**tags, "status": "champion", "promoted_at": _now()}
    if old is not None:
        tags[REPLACED_TAG] = old.version
        retired = tracking.model_by_alias(model, PREVIOUS)
        if retired is not None and retired.version not in (old.version, version):
            tracking.tag_version(model, retired.version, {"status": "retired"})
        tracking.set_alias(model, PREVIOUS, old.version)
        tracking.tag_version(model, old.version, {"status": "previous"})
    tracking.delete_version_tags(model, version, REJECTION_TAGS)
    tracking.tag_version(model, version, tags)
    tracking.set_alias(model, CHAMPION, version)
    return Decision(version, True, version, old and old.version, ())


def rollback(reason: str = "", model: str = tracking.POLICY_MODEL) -> Rollback:
    """Move ``champion`` back to ``previous``; ``previous`` then points at the champion before that, if known."""
    champion = tracking.model_by_alias(model, CHAMPION)
    previous = tracking.model_by_alias(model, PREVIOUS)
    if champion is None or previous is None:
        raise RLHFError(f"{model} has no {'champion' if champion is None else 'previous version'} to roll back")
    tracking.set_alias(model, CHAMPION, previous.version)
    tracking.tag_version(
        model, champion.version, {"status": "rolled_back", "rolled_back_at": _now(), "rollback_reason": reason or "none given"}
    )
    tracking.tag_version(model, previous.version, {"status": "champion", "restored_at": _now()})
    earlier = previous.tags.get(REPLACED_TAG)
    if earlier and earlier != champion.version and tracking.model_version(model, earlier) is not None:
        tracking.set_alias(model, PREVIOUS, earlier)
        tracking.tag_version(model, earlier, {"status": "previous"})
    else:
        earlier = None
        tracking.delete_alias(model, PREVIOUS)
    return Rollback(demoted=champion.version, champion=previous.version, previous=earlier)
