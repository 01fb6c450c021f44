"""Registry guard tasks: a failed flow run leaves the MLflow model registry as it found it."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from rlhf_core import runtime
from rlhf_core.config import set_params
from rlhf_core.tracking import alias_snapshot, model_by_alias, restore_aliases

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


@task(name="start-from-champion")
def start_from_champion(root: Path) -> str:
    """Point candidate generation and PPO at the current champion policy (or the base model if none)."""
    runtime.configure(root)
    champion = model_by_alias("rlhf-policy", "champion")
    version = champion.version if champion else "base"
    set_params(root / "params.yaml", {"candidates.policy": version, "ppo.init_policy": version})
    return version
