"""Record a flow run as a DVC experiment, so `dvc exp show` lists retraining runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger, task


@task(name="record-dvc-experiment")
def record_experiment(root: Path, name: str, stages: list[str] | None = None) -> str | None:
    """``dvc exp save -n <name> [stages]``: the workspace (params, dvc.lock, metrics) becomes a named experiment.

    ``stages`` limits what DVC caches to the stages the run asked for (a run of some stages has no outputs of
    the others, and DVC refuses to save an experiment with missing outputs).

    Any experiment can later be restored with ``dvc exp apply <name>`` and re-run with ``dvc repro``.
    Returns the name, or None when the project has no git commit to attach experiments to.
    """
    cmd = [sys.executable, "-m", "dvc", "exp", "save", "--force", "--name", name, *(stages or [])]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        get_run_logger().warning("not recorded as a DVC experiment: %s", (done.stderr or done.stdout).strip()[-300:])
        return None
    return name
