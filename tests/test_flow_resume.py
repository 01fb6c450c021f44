"""Killing the whole retraining flow in the middle of PPO, then running it again.

The second run must resume PPO from its last checkpoint, recompute nothing
before PPO (DVC skips those stages) and finish the pipeline.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_core.ppo.checkpoint import latest_checkpoint
from tests.conftest import stage_metrics, write_params

pytestmark = pytest.mark.slow

FLOW = [sys.executable, "-m", "flows.pipeline", "--no-experiment"]


def _complete_checkpoint(root):
    """The newest finished PPO checkpoint (a folder still being written ends in ``.tmp``)."""
    folder = root / ".work" / "checkpoints" / "ppo"
    return latest_checkpoint(folder) if folder.exists() else None


def _kill_when_ppo_has_a_checkpoint(root, process, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, _ = process.communicate()
            pytest.fail(f"the flow ended before PPO checkpointed:\n{out[-3000:]}")
        if _complete_checkpoint(root) is not None:
            os.killpg(process.pid, signal.SIGKILL)  # the flow, its DVC child and the stage process
            process.wait()
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail("no PPO checkpoint appeared in time")


def test_flow_killed_during_ppo_resumes_without_recomputing_earlier_stages(tiny_project):
    write_params(
        tiny_project,
        # 48 candidate prompts: the tiny reward model clears reward.champion_min_accuracy, so PPO runs
        {"ppo": {"updates": 40, "checkpoint_every": 1, "gold_eval_every": 20}, "candidates": {"max_prompts": 48}},
    )
    first = subprocess.Popen(
        FLOW, cwd=tiny_project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    _kill_when_ppo_has_a_checkpoint(tiny_project, first)
    assert not stage_metrics(tiny_project).detail("ppo").exists()
    before = {
        name: stage_metrics(tiny_project).detail(name).stat().st_mtime_ns
        for name in ("base_model", "prompts", "generate_candidates", "collect_preferences", "train_reward")
    }

    second = subprocess.run(FLOW, cwd=tiny_project, capture_output=True, text=True, timeout=900)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    for name, mtime in before.items():
        assert stage_metrics(tiny_project).detail(name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
        assert f"Stage '{name}' didn't change, skipping" in output
    ppo = stage_metrics(tiny_project).read("ppo")
    assert ppo["ppo/resumed_from_update"] >= 1 and ppo["ppo/updates"] == 40
    assert stage_metrics(tiny_project).detail("evaluate").exists()
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=tiny_project, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
