"""Registry tasks of the flow: pin the aliases a run depends on, and leave the registry as it was found if the run fails."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from rlhf_core import runtime
from rlhf_core.config import set_params
from rlhf_core.tracking import alias_snapshot, resolved_aliases, restore_aliases

REGISTERED_MODELS = ("rlhf-reward-model", "rlhf-policy")


@task(name="snapshot-registry")
def snapshot_registry(root: Path) -> dict[str, dict[str, str]]:
    runtime.configure(root)
    return alias_snapshot(REGISTERED_MODELS)


@task(name="restore-registry")
def restore_registry(root: Path, snapshot: dict[str, dict[str, str]]) -> list[str]:
    runtime.configure(root)
    return restore_aliases(snapshot)


@task(name="apply-overrides")
def apply_overrides(root: Path, overrides: dict[str, str]) -> list[str]:
    """Write overrides (``dotted.key -> YAML value``, any depth) into params.yaml; DVC reruns what they affect.

    Every value is validated against the params model before the file is touched; returns the keys that changed.
    """
    return set_params(root / "params.yaml", overrides)


@task(name="resolve-aliases")
def resolve_aliases(root: Path, from_champion: bool) -> dict[str, str]:
    """``section.key -> version`` for every registry alias this run depends on, as it stands now."""
    runtime.configure(root)
    return resolved_aliases(from_champion)
