"""The Prefect flow over the DVC stages, with no Prefect server configured."""

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _flow(root, *args):
    code = "import sys; from flows.pipeline import rlhf_pipeline; rlhf_pipeline(stages=sys.argv[1:] or None)"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True, timeout=900)


def test_flow_runs_stages_then_dvc_has_nothing_to_do(tiny_project):
    done = _flow(tiny_project, "base_model", "prompts")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tiny_project / "metrics" / "prompts.json").exists()
    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "prompts"], cwd=tiny_project, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro", "prompts"], cwd=tiny_project, capture_output=True, text=True)
    assert repro.returncode == 0 and "didn't change" in repro.stdout + repro.stderr
    assert time.perf_counter() - start < 30


def test_failing_stage_fails_the_flow_with_its_error(tiny_project):
    (tiny_project / "data" / "prompts.jsonl").write_text('{"prompt": ""}\n')
    done = _flow(tiny_project, "base_model", "prompts")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "stage 'prompts' failed" in output and "no usable prompts" in output
