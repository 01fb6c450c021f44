"""The RLHF pipeline as a Prefect flow: every DVC stage in order, one task each."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from rlhf_core import runtime
from rlhf_core.config import load_params
from tasks.stages import stage_task

#: the stages in pipeline order (names as in dvc.yaml)
STAGES = ["base_model", "prompts"]


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(project_dir: str = ".", stages: list[str] | None = None) -> dict[str, dict]:
    """Run the pipeline's DVC stages in order; a failing stage fails the flow with its error."""
    root = Path(project_dir).resolve()
    runtime.configure(root)
    params = load_params(root / "params.yaml")
    logger = get_run_logger()
    results: dict[str, dict] = {}
    for stage in stages or STAGES:
        run_stage = stage_task(stage, params.orchestration.retries, params.orchestration.retry_delay_seconds)
        results[stage] = run_stage(stage, root)
        logger.info("%s: %s", stage, {k: v for k, v in results[stage].items() if not isinstance(v, str)})
    return results


if __name__ == "__main__":
    runtime.configure()
    rlhf_pipeline()
