"""The RLHF pipeline as a Prefect flow: every DVC stage in order, one task each.

    python -m flows.pipeline                      # one round from the base model (what `make run` does)
    python -m flows.pipeline --from-champion      # a retraining round starting from the current champion

DVC decides what actually runs (an unchanged stage is skipped); the flow adds
retries for transient failures, a ``gpu`` concurrency limit, lineage tags on
every MLflow run, a registry that is restored if anything fails, and a DVC
experiment per flow run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.summary import render_summary
from rlhf_core import runtime
from rlhf_core.artifacts import pipeline_stages
from rlhf_core.config import load_params
from rlhf_core.records import atomic_write_text
from tasks.experiments import record_experiment
from tasks.registry import apply_overrides, resolve_aliases, restore_registry, snapshot_registry
from tasks.stages import GPU_STAGES, ensure_concurrency_limit, stage_task

#: the stages in pipeline order: dvc.yaml's
STAGES = list(pipeline_stages())


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(
    project_dir: str = ".",
    stages: list[str] | None = None,
    from_champion: bool = False,
    record_dvc_experiment: bool = True,
    overrides: dict[str, str] | None = None,
    restore_params: bool = False,
) -> dict[str, dict]:
    """Run the pipeline's DVC stages in order; a failing stage fails the flow with its error
    and puts the registry aliases back as they were.

    Before any stage runs, every registry alias the run depends on is pinned to the
    version it names now and written into params.yaml with the ``overrides``
    (recorded in dvc.lock, the DVC experiment and each stage's MLflow params), so
    the stages read only files and values DVC tracks.  ``restore_params`` (what
    scheduled runs use) puts the user's params.yaml back afterwards: the run's
    values then live in its DVC experiment (``dvc exp apply <run> && dvc repro``).
    """
    root = Path(project_dir).resolve()
    runtime.configure(root)
    params_file = root / "params.yaml"
    user_params = params_file.read_text()
    logger = get_run_logger()
    try:
        pinned = resolve_aliases(root, from_champion)
        logger.info("registry aliases pinned for this run: %s", pinned)
        apply_overrides(root, {**(overrides or {}), **pinned})
        params = load_params(params_file)
        ensure_concurrency_limit("gpu", params.orchestration.gpu_concurrency)
        snapshot = snapshot_registry(root)
        results: dict[str, dict] = {}
        try:
            for stage in stages or STAGES:
                run_stage = stage_task(stage, params.orchestration.retries, params.orchestration.retry_delay_seconds)
                results[stage] = run_stage(stage, root)
        except BaseException:
            changed = restore_registry(root, snapshot)
            if changed:
                logger.warning("registry restored after failure: %s", "; ".join(changed))
            raise
        if record_dvc_experiment:
            record_experiment(root, flow_run.name or "rlhf-run", stages)
    finally:
        if restore_params and params_file.read_text() != user_params:
            atomic_write_text(params_file, user_params)
            logger.info("params.yaml restored; the values this run used are in its DVC experiment and MLflow runs")
    print(render_summary(root, params, results, GPU_STAGES))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the RLHF pipeline flow (all DVC stages in order).")
    parser.add_argument("--project-dir", default=".", help="project root holding params.yaml and dvc.yaml")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages (and what they need)")
    parser.add_argument("--from-champion", action="store_true", help="start candidates and PPO from the champion policy")
    parser.add_argument("--no-experiment", action="store_true", help="do not record the run as a DVC experiment")
    args = parser.parse_args(argv)
    runtime.configure(Path(args.project_dir).resolve())
    try:
        rlhf_pipeline(args.project_dir, args.stages, args.from_champion, not args.no_experiment)
    except KeyboardInterrupt:
        sys.exit("pipeline interrupted; run it again to resume (DVC skips finished stages, PPO resumes its checkpoint)")
    except Exception as exc:  # noqa: BLE001 - the stage's own error, without the orchestration traceback
        sys.exit(f"pipeline failed: {exc}")


if __name__ == "__main__":
    main()
