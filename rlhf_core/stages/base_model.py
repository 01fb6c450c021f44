"""Stage ``base_model``: fetch and convert the pretrained starting point once."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rlhf_core import runtime
from rlhf_core.base_model import prepare_base_model
from rlhf_core.config import Params
from rlhf_core.tracking import stage_run


def run(params: Params) -> dict:
    paths = params.paths
    with stage_run("base_model", metrics_dir=paths.metrics, config_sections=[params.base_model]) as stage:
        info = prepare_base_model(params.base_model, Path(paths.base_model), runtime.work_dir() / "downloads")
        stage.log_params(params.base_model.model_dump())
        return stage.finish({f"base_model/{k}": v for k, v in asdict(info).items()})
