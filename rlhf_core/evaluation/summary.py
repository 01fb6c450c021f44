"""The evaluate stage's verdict as one validated file, read by ``promote`` (path: ``Layout.evaluation.summary``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from rlhf_core.evaluation.best_of_n import FrontierPoint
from rlhf_core.evaluation.gates import GateResult
from rlhf_core.records import read_json_record, write_json

class EvaluationSummary(BaseModel):
    """Which version was judged against which champion, every gate's verdict, the lineage and the metrics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate_version: str | None
    champion_version: str | None
    gates: list[GateResult]
    lineage: dict[str, str]
    metrics: dict[str, float | int | bool | str | None]
    frontier: list[FrontierPoint]

    @property
    def all_passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "EvaluationSummary":
        return read_json_record(path, cls, "evaluation summary", "run `rlhf evaluate` first")
