"""The one module that talks to MLflow.

* :func:`stage_run` opens the MLflow run of a pipeline stage, tags it with its
  lineage (stage, git commit, params hash, input data hash, Prefect flow run),
  and on :meth:`StageRun.finish` sends one metrics dict to MLflow and to the
  stage's metrics files (:class:`rlhf_core.artifacts.MetricsFolder`: the
  headline figures DVC shows, and every figure).
* The registry helpers register model folders as versions and move aliases
  (``candidate``, ``champion``, ``previous``).

The store is SQLite inside the project's working area with an explicit artifact
location (see :mod:`rlhf_core.runtime`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from rlhf_core import runtime
from rlhf_core.artifacts import MetricsFolder, ModelFolder
from rlhf_core.errors import RLHFError

EXPERIMENT = "rlhf"
FLOW_RUN_ENV = "RLHF_FLOW_RUN_ID"
FLOW_RUN_NAME_ENV = "RLHF_FLOW_RUN_NAME"


def _mlflow():
    runtime.configure()
    import mlflow

    return mlflow


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hash_paths(paths: Iterable[str | Path]) -> str:
    """Content hash of files and folders (recursively, in sorted order); missing paths hash as absent."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            if not file.exists():
                digest.update(b"<absent>")
                continue
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def hash_config(*sections) -> str:
    """Stable hash of pydantic config sections."""
    payload = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: The experiment type MLflow records for model training (``mlflow.experimentKind``), set on new and existing
#: experiments.  MLflow 3.17's UI does not read it to pick the view: that follows ``?workflowType=`` in the
#: link, then the browser's last choice (GenAI by default), so links to the UI carry :data:`UI_VIEW_QUERY`.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_VIEW_QUERY = "workflowType=machine_learning"


def experiment_id(name: str = EXPERIMENT) -> str:
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        location = runtime.mlflow_artifact_root() / name
        location.mkdir(parents=True, exist_ok=True)
        try:
            return client.create_experiment(name, artifact_location=location.as_uri(), tags=EXPERIMENT_KIND)
        except Exception:  # created concurrently by another process
            found = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_KIND.items():
        if found.tags.get(key) != value:  # made before the tag was set, or switched in the UI
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def ui_url(base: str, experiment: str | None = None) -> str:
    """The MLflow UI's page of the experiment's runs, in the model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment or experiment_id()}/runs?{UI_VIEW_QUERY}"


def flatten(metrics: Mapping, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a/b': 1}."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


@dataclass
class StageRun:
    """Handle of one stage's MLflow run."""

    stage: str
    run_id: str
    metrics: MetricsFolder
    artifact_uri: str
    _logged: dict = field(default_factory=dict)

    def log_step(self, metrics: Mapping[str, float], step: int) -> None:
        """Log a row of a curve (e.g. one PPO update) in one batched call."""
        mlflow = _mlflow()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in flatten(metrics).items() if _numeric(v)]
        if rows:
            mlflow.MlflowClient().log_batch(self.run_id, metrics=rows)

    def log_curve(self, name: str, values: Iterable[float], start: int = 0) -> None:
        """Log a whole curve at once (one batched call per 1000 points)."""
        mlflow = _mlflow()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(name, float(v), now, start + i) for i, v in enumerate(values) if _numeric(v)]
        client = mlflow.MlflowClient()
        for i in range(0, len(rows), 1000):
            client.log_batch(self.run_id, metrics=rows[i : i + 1000])

    def log_params(self, params: Mapping) -> None:
        mlflow = _mlflow()
        from mlflow.entities import Param

        rows = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        client = mlflow.MlflowClient()
        for i in range(0, len(rows), 100):
            client.log_batch(self.run_id, params=rows[i : i + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        client = _mlflow().MlflowClient()
        for key, value in tags.items():
            client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        client = _mlflow().MlflowClient()
        if path.is_dir():
            client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, metrics: Mapping) -> dict:
        """Write the stage's metrics files and log the numeric values to MLflow; returns the flat dict.

        A second call (after registering the outputs the first one described)
        rewrites the files and logs only the values that are new or changed.
        """
        flat = flatten(metrics)
        self.metrics.write(self.stage, flat)
        new = {k: v for k, v in flat.items() if k not in self._logged or self._logged[k] != v}
        self.log_step({k: v for k, v in new.items() if _numeric(v)}, step=0)
        text = {k: v for k, v in new.items() if not _numeric(v) and v is not None}
        if text:
            self.set_tags({f"metric.{k}": v for k, v in text.items()})
        self._logged = flat
        return flat


HOST_TAG, PID_TAG, PID_START_TAG = "host", "pid", "pid_start"


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), which tells a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    """Tags that let a later process tell whether the one that opened a run still lives."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    start = _process_start(os.getpid())
    if start is not None:
        tags[PID_START_TAG] = start
    return tags


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this machine lives and is the same one (its start time matches, where known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return start is None or _process_start(pid) in (None, start)


def mark_dead_runs_killed(stage: str) -> list[str]:
    """End as KILLED the RUNNING runs of ``stage`` whose process, on this machine, is gone; returns their ids.

    Runs opened on another host, or without the process tags, are left alone:
    whether their process lives cannot be known from here.
    """
    client = _mlflow().MlflowClient()
    running = client.search_runs(
        [experiment_id()], filter_string=f"tags.stage = '{stage}' and attributes.status = 'RUNNING'", max_results=1000
    )
    killed = []
    for run in running:
        tags = run.data.tags
        if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
            continue
        if not process_alive(int(tags[PID_TAG]), tags.get(PID_START_TAG)):
            client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_id)
    return killed


@contextmanager
def stage_run(
    stage: str,
    *,
    metrics_dir: str | Path,
    config_sections: Iterable = (),
    inputs: Iterable[str | Path] = (),
    run_name: str | None = None,
) -> Iterator[StageRun]:
    """Open, tag and close the MLflow run of one stage.

    The run ends FAILED (and the exception propagates) if the body raises.  A
    process killed meanwhile cannot end its run; the next start of the same stage
    ends it as KILLED (:func:`mark_dead_runs_killed`).
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    tags = {
        "stage": stage,
        "git_commit": git_commit(),
        "params_hash": hash_config(*config_sections),
        "input_hash": hash_paths(inputs),
        "mlflow.runName": run_name or stage,
    }
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    if os.environ.get(FLOW_RUN_NAME_ENV):
        tags["prefect_flow_run_name"] = os.environ[FLOW_RUN_NAME_ENV]
    tags.update(process_tags())
    mark_dead_runs_killed(stage)
    run = client.create_run(experiment_id(), tags=tags, run_name=run_name or stage)
    handle = StageRun(stage, run.info.run_id, MetricsFolder(Path(metrics_dir)), run.info.artifact_uri)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


# --------------------------------------------------------------------------- registry


def local_path(uri: str) -> Path:
    """Filesystem path of a ``file://`` URI (MLflow artifact locations here are local)."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else Path(uri)


def register_version(
    name: str, run: StageRun, artifact_path: str, *, aliases: Iterable[str] = (), tags: Mapping[str, str] | None = None
) -> str:
    """Register ``<run artifacts>/<artifact_path>`` as a new version of model ``name``; returns the version."""
    client = _mlflow().MlflowClient()
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{run.artifact_uri}/{artifact_path}", run_id=run.run_id, tags=dict(tags or {})
    ).version
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    path: Path
    run_id: str | None
    tags: dict


def model_by_alias(name: str, alias: str) -> ModelRef | None:
    """The version behind ``models:/name@alias`` with its local folder, or None if there is none."""
    client = _mlflow().MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception:
        return None
    return ModelRef(name, str(version.version), local_path(version.source), version.run_id, dict(version.tags))


def model_version(name: str, version: str) -> ModelRef | None:
    """Version ``version`` of registered model ``name`` with its local folder, or None if there is none."""
    client = _mlflow().MlflowClient()
    try:
        found = client.get_model_version(name, str(version))
    except Exception:
        return None
    return ModelRef(name, str(found.version), local_path(found.source), found.run_id, dict(found.tags))


#: Registered model name of PPO-trained policies.
POLICY_MODEL = "rlhf-policy"
#: Registered model name of trained reward models.
REWARD_MODEL = "rlhf-reward-model"


def resolve_policy(spec: str, start: ModelFolder) -> tuple[Path, str]:
    """Folder and version label of a policy: ``base`` (the run's starting policy) or a version of rlhf-policy.

    ``base`` is ``start``, the layout's starting policy: the SFT model when the
    sft stage trained one, else the base model.  The label is
    ``<start.kind>:<content hash of the folder>`` (``sft:…`` or ``base:…``) or ``rlhf-policy/<version>``.
    Aliases are refused: a stage that read ``champion`` would train on whatever
    the alias points at when it runs, which its params and dvc.lock cannot show.
    """
    if spec == "base":
        folder = start.require()
        return folder, f"{start.kind}:{hash_paths([folder])[:12]}"
    if not spec.isdigit():
        now = model_by_alias(POLICY_MODEL, spec)
        hint = f" (rlhf-policy@{spec} is version {now.version} now)" if now else ""
        raise RLHFError(
            f"policy {spec!r}: expected 'base' or a version of {POLICY_MODEL}{hint}; aliases are resolved by "
            "`python -m flows.pipeline --from-champion`"
        )
    ref = model_version(POLICY_MODEL, spec)
    if ref is None:
        raise RLHFError(f"policy {spec!r}: registered model {POLICY_MODEL} has no such version")
    return ref.path, f"{POLICY_MODEL}/{ref.version}"


def resolved_aliases(from_champion: bool) -> dict[str, str]:
    """The params overrides that pin every alias a run depends on to the version it names now.

    ``evaluate.champion`` always (the champion to beat); with ``from_champion``
    also the policy that writes the candidates and that PPO starts from.
    """
    champion = model_by_alias(POLICY_MODEL, "champion")
    overrides = {"evaluate.champion": champion.version if champion else "none"}
    if from_champion:
        start = champion.version if champion else "base"
        overrides.update({"candidates.policy": start, "ppo.init_policy": start})
    return overrides


def set_alias(name: str, alias: str, version: str) -> None:
    _mlflow().MlflowClient().set_registered_model_alias(name, alias, version)


def delete_alias(name: str, alias: str) -> None:
    _mlflow().MlflowClient().delete_registered_model_alias(name, alias)


def tag_version(name: str, version: str, tags: Mapping[str, object]) -> None:
    client = _mlflow().MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def delete_version_tags(name: str, version: str, keys: Iterable[str]) -> None:
    """Remove tags of a model version (keys it does not have are ignored)."""
    client = _mlflow().MlflowClient()
    present = client.get_model_version(name, version).tags
    for key in keys:
        if key in present:
            client.delete_model_version_tag(name, version, key)


def alias_snapshot(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """{model name: {alias: version}} for the registered models that exist."""
    client = _mlflow().MlflowClient()
    snapshot = {}
    for name in names:
        try:
            snapshot[name] = {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
        except Exception:  # not registered yet
            snapshot[name] = {}
    return snapshot


def restore_aliases(snapshot: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Put every alias back where ``snapshot`` had it and drop aliases created since; returns what changed."""
    client = _mlflow().MlflowClient()
    changed = []
    for name, aliases in snapshot.items():
        try:
            current = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
        except Exception:
            continue
        for alias, version in current.items():
            if alias not in aliases:
                client.delete_registered_model_alias(name, alias)
                changed.append(f"{name}@{alias} removed")
        for alias, version in aliases.items():
            if current.get(alias) != version:
                client.set_registered_model_alias(name, alias, version)
                changed.append(f"{name}@{alias} -> {version}")
    return changed
