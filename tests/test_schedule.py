"""Scheduled retraining against a real local Prefect server: a run is created and completes."""

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from .conftest import BIN

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_interval_schedule_creates_and_completes_a_run(tiny_project, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    logs = tiny_project / ".work"
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tiny_project, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    worker = None
    try:
        _wait(lambda: _healthy(api), 150, "the Prefect server")
        monkeypatch.setenv("PREFECT_API_URL", api)
        worker = subprocess.Popen(
            [str(BIN / "rlhf"), "schedule", "--interval", "60", "--stages", "base_model", "--from-base"],
            cwd=tiny_project, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        runs = _wait(lambda: _completed_runs(api), 300, "a completed scheduled run")
        assert runs[0]["deployment_id"] is not None
        assert (tiny_project / "metrics" / "base_model.json").exists()
    finally:
        for process in (worker, server):
            if process is not None:
                _stop(process)
    assert server.poll() is not None


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _completed_runs(api: str) -> list[dict]:
    body = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    try:
        response = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=5)
    except httpx.HTTPError:
        return []
    return [run for run in response.json() if run.get("deployment_id")] if response.status_code == 200 else []
