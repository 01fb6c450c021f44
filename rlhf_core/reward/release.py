"""The reward model a run hands from ``train_reward`` to ``ppo`` and ``evaluate``, as a file DVC tracks.

``train_reward`` writes the model folder (``paths.reward_model``) and, once the
version is registered, this record (``paths.reward_release``): which registry
version the folder is, its content hash, and whether it met
``reward.champion_min_accuracy``.  PPO trains against exactly that folder and
evaluate, the gates, the lineage tags and the model card all name the model from
this record, so a registry alias that moved (or a missing MLflow store) cannot
make one stage use another model than the next one reports.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from rlhf_core.errors import DataError, RLHFError
from rlhf_core.records import read_json_record, write_json


class RewardRelease(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    content_hash: str
    heldout_accuracy: float
    min_accuracy: float
    run_id: str

    @property
    def passed(self) -> bool:
        return self.heldout_accuracy >= self.min_accuracy

    @property
    def label(self) -> str:
        return f"{self.name} version {self.version} (content {self.content_hash})"

    def write(self, path: str | Path) -> None:
        write_json(Path(path), self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: str | Path) -> "RewardRelease":
        return read_json_record(path, cls, "reward model record", "no reward model has been handed over: run `rlhf train-reward` first")


def handed_over(release_file: str | Path, model_folder: str | Path) -> RewardRelease:
    """The released reward model, checked against the folder it describes; refuses one that missed its bar."""
    from rlhf_core.tracking import hash_paths

    release = RewardRelease.read(release_file)
    actual = hash_paths([model_folder])
    if actual != release.content_hash:
        raise DataError(
            f"{model_folder}: content {actual} is not the reward model {release_file} names ({release.label}); "
            "run `dvc repro` so that train_reward writes both"
        )
    if not release.passed:
        raise RLHFError(
            f"{release.label} missed reward.champion_min_accuracy (held-out accuracy {release.heldout_accuracy:.3f} "
            f"< {release.min_accuracy}): no policy is trained against it; collect more preferences or change the bar"
        )
    return release
