"""Process-wide runtime settings shared by every entry point.

The pipeline runs offline by default: no model hub, no telemetry, and every
tool keeps its state inside the project's working area (``.work/``, git-ignored)
so that a checkout is self-contained and two checkouts never share state.
Call :func:`configure` before importing transformers, mlflow, prefect or dvc.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment settings that keep every tool offline and quiet.  Values already
#: set by the user win, so ``HF_HUB_OFFLINE=0`` re-enables the hub on purpose.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def project_root(start: Path | None = None) -> Path:
    """The directory holding ``params.yaml`` (the current one by default)."""
    if "RLHF_PROJECT_ROOT" in os.environ:
        return Path(os.environ["RLHF_PROJECT_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "params.yaml").exists():
            return candidate
    return here


def work_dir(root: Path | None = None) -> Path:
    """The git-ignored working area: Prefect home, MLflow store, DVC site cache, downloads."""
    return (root or project_root()) / ".work"


def mlflow_tracking_uri(root: Path | None = None) -> str:
    return f"sqlite:///{work_dir(root) / 'mlflow.db'}"


def mlflow_artifact_root(root: Path | None = None) -> Path:
    return work_dir(root) / "mlartifacts"


def configure(root: Path | None = None) -> Path:
    """Apply the offline settings and point every tool's state into ``.work/``.

    Except DVC's site cache (its record of file hashes): a ``dvc repro`` typed
    in a shell does not run through this function and uses DVC's default one,
    so a second one here would make it re-hash every model folder after each
    flow run (measured: 2.5 s per GB of models added to a no-op ``dvc repro``).
    DVC keys that cache by the checkout's path, so checkouts do not share entries.

    Returns the working area.  Safe to call more than once.
    """
    work = work_dir(root)
    work.mkdir(parents=True, exist_ok=True)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", mlflow_tracking_uri(root))
    os.environ.setdefault("HF_HOME", str(work / "hf-home"))
    return work
