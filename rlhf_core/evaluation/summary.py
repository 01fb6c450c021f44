"""The evaluate stage's verdict as one validated file, read by ``promote`` (path: ``Layout.evaluation.summary``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from rlhf_core.errors import DataError
from rlhf_core.evaluation.best_of_n import FrontierPoint
from rlhf_core.evaluation.gates import GateResult
from rlhf_core.records import write_json

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
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text())
        except OSError:
            raise DataError(f"{path}: no evaluation summary (run `rlhf evaluate` first)") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise DataError(f"{path}: invalid evaluation summary ({where}: {first['msg']})") from None
