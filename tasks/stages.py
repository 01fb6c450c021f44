"""One Prefect task per pipeline stage.

A task runs ``dvc repro <stage>`` (DVC decides whether anything needs to run,
so there is no second cache here) and returns ``metrics/<stage>.json``.  Exit
status 2 from ``rlhf`` means bad input or config: retrying cannot help, so
only other failures are retried.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from prefect import task

from rlhf_core import runtime
from rlhf_core.artifacts import MetricsFolder, pipeline_stages
from rlhf_core.config import load_params
from rlhf_core.tracking import FLOW_RUN_ENV, FLOW_RUN_NAME_ENV

#: stages whose work benefits from an accelerator (``meta: {gpu: true}`` in dvc.yaml); their tasks carry the
#: ``gpu`` tag (see the concurrency limit).
GPU_STAGES = {name for name, stage in pipeline_stages().items() if (stage.get("meta") or {}).get("gpu")}
_TAIL_LINES = 15


class StageFailed(RuntimeError):
    """A DVC stage failed; the message carries the end of its output."""

    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode = stage, returncode
        #: dvc reports the command's exit status (2: bad input or config); errors in dvc.yaml itself mention it
        self.deterministic = "exited with 2" in tail or "dvc.yaml" in tail
        super().__init__(f"stage {stage!r} failed (exit {returncode}):\n{tail}")


def _flow_env() -> dict[str, str]:
    """The environment of the stage: this venv first on PATH, and the flow run for MLflow lineage tags."""
    from prefect.runtime import flow_run

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if flow_run.id:
        env[FLOW_RUN_ENV] = str(flow_run.id)
        env[FLOW_RUN_NAME_ENV] = str(flow_run.name)
    return env


def _run_streaming(cmd: list[str], root: Path) -> tuple[int, str]:
    """Run ``cmd`` with its output shown live (progress bars included) and kept for the error message."""
    process = subprocess.Popen(cmd, cwd=root, env=_flow_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kept = bytearray()
    for chunk in iter(lambda: process.stdout.read1(4096), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        kept += chunk
        del kept[: max(0, len(kept) - 20_000)]
    return process.wait(), kept.decode("utf-8", errors="replace").replace("\r", "\n")


def _holder_file(task_run_id) -> Path:
    """Where a running stage task records which process holds its Prefect task run (see ensure_concurrency_limit)."""
    return Path(os.environ.get("PREFECT_HOME", ".")) / "task-holders" / str(task_run_id)


@contextmanager
def _record_holder():
    from prefect.runtime import task_run

    path = _holder_file(task_run.id) if task_run.id else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{socket.gethostname()} {os.getpid()}")
    try:
        yield
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def repro(stage: str, root: Path) -> dict:
    """Run ``dvc repro <stage>`` in ``root`` and return that stage's metrics."""
    runtime.configure(root)
    cmd = [sys.executable, "-m", "dvc", "repro", stage]
    with _record_holder():
        returncode, output = _run_streaming(cmd, root)
    if returncode != 0:
        raise StageFailed(stage, returncode, "\n".join(output.strip().splitlines()[-_TAIL_LINES:]))
    return MetricsFolder(root / load_params(root / "params.yaml").paths.metrics).read(stage)


def _is_transient(task, task_run, state) -> bool:
    """Retry unless the stage rejected its input or config (``rlhf`` exits 2 for those)."""
    try:
        state.result()
    except StageFailed as exc:
        return not exc.deterministic
    except Exception:
        return True
    return False


def ensure_concurrency_limit(tag: str, limit: int) -> None:
    """Task-run concurrency limit by tag: at most ``limit`` ``gpu`` tasks run at once across flow runs.

    A task run killed while holding a slot (SIGKILL, power loss) never gives it
    back: its lease has no expiry, or - with the ephemeral server of a local
    run - died with that server's memory while the database still counts the
    slot, and every later ``gpu`` task would wait for it forever.  So slots
    whose task run is no longer running are released here, before the flow's
    first task asks for one.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
        held = client.read_concurrency_limit_by_tag(tag).active_slots  # task runs whose lease the server knows
        live = sum(_task_run_is_live(client, run_id) for run_id in held)
        # Tag limits are global concurrency limits named "tag:<tag>", and the slot count is what blocks a new task.
        # Only the count is corrected: the leases of live holders stay theirs to release.
        counted = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
        if counted.active_slots > live:
            client.update_global_concurrency_limit(f"tag:{tag}", GlobalConcurrencyLimitUpdate(active_slots=live))


def _task_run_is_live(client, task_run_id) -> bool:
    """False when the task run is over, or when it ran on this machine in a process that no longer exists.

    A killed flow's runs stay "Running" in Prefect's database; the holder file
    that :func:`repro` writes says which process ran them.  A holder on another
    machine is taken to be alive.
    """
    from prefect.exceptions import ObjectNotFound

    try:
        task_run = client.read_task_run(task_run_id)
    except ObjectNotFound:
        return False
    if task_run.state is None or task_run.state.is_final():
        return False
    try:
        host, pid = _holder_file(task_run_id).read_text().split()
    except (OSError, ValueError):
        return True
    return host != socket.gethostname() or _process_exists(int(pid))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stage_task(stage: str, retries: int = 2, retry_delay_seconds: int = 10):
    """The Prefect task that runs DVC stage ``stage``."""
    tags = ["gpu"] if stage in GPU_STAGES else []
    return task(
        repro,
        name=stage,
        task_run_name=stage,
        tags=tags,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=_is_transient,
    )
