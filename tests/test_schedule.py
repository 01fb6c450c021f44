"""Scheduled retraining against a real local Prefect server: a run is created and completes."""

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest
import yaml

from .conftest import BIN, rlhf


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


@pytest.mark.parametrize(("override", "expected"), [
    ("ppo.beta=0.1", "no key ppo.beta in the params (did you mean ppo.kl.beta?)"),
    ("base_model.seed=7", "did you mean base_model.tiny.seed?"),
    ("ppo.kl.beta=-1", "ppo.kl.beta=-1: Input should be greater than or equal to 0"),
    ("ppo.kl.beta", "expected section.key=value"),
])
def test_bad_override_is_one_line_before_any_server_is_asked(work_env, monkeypatch, override, expected):
    with socket.socket() as server:  # a "Prefect server" that records whether anyone connected
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.getsockname()[1]}/api")
        before = (work_env / "params.yaml").read_bytes()
        done = rlhf("schedule", "--interval", "60", "--set", "ppo.kl.target=3", "--set", override, cwd=work_env, check=False)
        with pytest.raises(BlockingIOError):
            server.accept()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert (work_env / "params.yaml").read_bytes() == before


@pytest.mark.slow
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
            [str(BIN / "rlhf"), "schedule", "--interval", "60", "--stages", "base_model", "--from-base",
             "--set", "base_model.tiny.seed=1"],
            cwd=tiny_project, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        user_params = (tiny_project / "params.yaml").read_bytes()
        runs = _wait(lambda: _completed_runs(api), 300, "a completed scheduled run")
        assert runs[0]["deployment_id"] is not None
        assert (tiny_project / "metrics" / "base_model.json").exists()
        # the run's override and pinned aliases live in its DVC experiment; the user's params.yaml is as it was
        assert (tiny_project / "params.yaml").read_bytes() == user_params
        refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=tiny_project,
                              capture_output=True, text=True, check=True).stdout.split()
        refs = [ref for ref in refs if "/exec/" not in ref]  # DVC's own working refs point at the baseline
        assert refs, "the scheduled run was not recorded as a DVC experiment"
        shown = subprocess.run(["git", "show", f"{refs[0]}:params.yaml"], cwd=tiny_project, capture_output=True,
                               text=True, check=True).stdout
        recorded = yaml.safe_load(shown)
        assert recorded["base_model"]["tiny"]["seed"] == 1 and recorded["evaluate"]["champion"] == "none"
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


def test_flow_overrides_edit_nested_keys_and_refuse_a_wrong_one(work_env):
    from rlhf_core.config import load_params
    from rlhf_core.errors import ConfigError
    from tasks.registry import apply_overrides

    path = work_env / "params.yaml"
    assert apply_overrides.fn(work_env, {"ppo.kl.beta": "0.3", "candidates.policy": "4"}) == ["ppo.kl.beta", "candidates.policy"]
    params = load_params(path)
    assert (params.ppo.kl.beta, params.candidates.policy) == (0.3, "4")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"did you mean ppo\.kl\.beta\?"):
        apply_overrides.fn(work_env, {"ppo.beta": "0.1"})
    assert path.read_bytes() == before
