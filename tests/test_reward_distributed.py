"""train_reward unchanged under `accelerate launch` with two CPU processes (DDP over gloo)."""

from __future__ import annotations

import math
import os
import socket
import subprocess

import pytest

from rlhf_core.config import load_params

from .conftest import BIN, stage_metrics
from .test_train_reward_stage import LEARNABLE, marker_bundle, reward_project, write_preferences

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_share_the_training_and_only_the_main_one_writes(work_env, tiny_base_model):
    # The default mode (frozen lower layer, cached trunk states) under DDP.
    root = reward_project(work_env, tiny_base_model, {"reward": {**LEARNABLE["reward"], "mode": "freeze"}})
    write_preferences(root, marker_bundle(30))
    # STACK.md: `accelerate launch --cpu --num_processes 2` silently starts one process; this is the form that starts two.
    cmd = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "rlhf_core.cli", "train-reward",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert out.count("train-reward: done (0 metrics)") == 1  # the second process trained and wrote nothing

    metrics = stage_metrics(root).read("train_reward")
    cfg = load_params(root / "params.yaml").reward
    # Each step takes prompts_per_batch prompts on each of the 2 processes: half the steps of one process.
    steps_per_epoch = math.ceil(metrics["reward/train_prompts"] / (cfg.prompts_per_batch * 2))
    assert metrics["reward/train_steps"] == steps_per_epoch * cfg.epochs
    assert metrics["reward/accuracy"] >= 0.8 and metrics["reward/registered_version"] == 1

    import mlflow

    runs = mlflow.search_runs(experiment_names=["rlhf"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert len(mlflow.MlflowClient().search_model_versions("name='rlhf-reward-model'")) == 1
    assert (root / "models" / "reward" / "model.safetensors").exists()
