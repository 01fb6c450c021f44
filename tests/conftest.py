"""Shared fixtures: an isolated work area per test and a tiny copy of the project.

Tiny models are chosen through params (``base_model.source: tiny``), exactly as a
user would choose them for a quick run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: overrides that make every stage run in seconds on a tiny random model
TINY_OVERRIDES = {
    "base_model": {"source": "tiny"},
    # simulated demonstrations (best-of-2 on 8 prompts): one training step instead of the 369 written answers' 20
    "sft": {"source": "simulated", "simulated": {"n": 2, "prompts": 8}, "freeze_layers": 1, "max_length": 64,
            "batch_size": 16, "eval_prompts": 4, "max_new_tokens": 8},
    "candidates": {"max_prompts": 12, "max_new_tokens": 8, "batch_size": 16},
    "ppo": {"updates": 3, "batch_size": 4, "max_new_tokens": 8, "freeze_layers": 1, "checkpoint_every": 1,
            "gold_eval_every": 2, "gold_eval_prompts": 4},
    "reward": {"freeze_layers": 1, "max_length": 64},
    "evaluate": {"num_prompts": 8, "max_new_tokens": 8, "best_of_n": [1, 2, 4], "best_of_n_prompts": 4},
}


def deep_update(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_params(root: Path, overrides: dict | None = None) -> Path:
    """params.yaml of the repo with the tiny overrides (and any others) applied, written into ``root``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = deep_update(params, TINY_OVERRIDES)
    params = deep_update(params, overrides or {})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def isolate_env(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point every tool's state into ``root/.work`` for this test (and its subprocesses)."""
    work = root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("RLHF_PROJECT_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(work / "prefect"))
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(work / "dvc-site-cache"))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for key in ("RLHF_FLOW_RUN_ID", "RLHF_FLOW_RUN_NAME", "PREFECT_API_URL"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine it makes them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def work_env(tmp_path, monkeypatch) -> Path:
    """A bare isolated project root (params.yaml with tiny overrides, empty .work)."""
    isolate_env(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    return tmp_path


def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A runnable copy of the project in ``root``: git + DVC initialised, code linked, tiny params."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("rlhf_core", "tasks", "flows"):
        (root / name).symlink_to(REPO / name)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "data").mkdir()
    for name in ("prompts.jsonl", "demonstrations.jsonl"):
        shutil.copy(REPO / "data" / name, root / "data" / name)
    for folder in ("labels", "imports"):  # inputs of collect_preferences, as in a clone
        shutil.copytree(REPO / "data" / folder, root / "data" / folder)
    write_params(root, overrides)
    (root / ".gitignore").write_text(".work/\n")
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "ci@example.invalid")
    run("git", "config", "user.name", "ci")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "config", "core.analytics", "false")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "project")
    return root


@pytest.fixture
def tiny_project(tmp_path, monkeypatch) -> Path:
    root = make_project(tmp_path / "project")
    isolate_env(monkeypatch, root)
    monkeypatch.chdir(root)
    return root


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """A tiny random model folder with the real tokenizer, built once per session."""
    from rlhf_core.base_model import build_tiny
    from rlhf_core.config import TinyModelConfig

    out = tmp_path_factory.mktemp("tiny") / "base"
    build_tiny(TinyModelConfig(), out)
    return out


def load_bench_script(name: str):
    """A script of ``bench/`` (not a package) imported as a module, for tests of its functions and ``main``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rlhf(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``rlhf`` console script as a user would."""
    done = subprocess.run([str(BIN / "rlhf"), *args], cwd=cwd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def hand_over_reward_model(root: Path, folder: Path, version: str = "1", accuracy: float = 0.7, min_accuracy: float = 0.55):
    """The record train_reward writes for ``folder`` (what ppo and evaluate read), at ``root/models/reward_release.json``."""
    from rlhf_core.reward.release import RewardRelease
    from rlhf_core.tracking import hash_paths

    path = root / "models" / "reward_release.json"
    RewardRelease(
        name="rlhf-reward-model", version=version, content_hash=hash_paths([folder]), heldout_accuracy=accuracy,
        min_accuracy=min_accuracy, run_id="test-run",
    ).write(path)
    return path


def stage_metrics(root: Path, params_file: str = "params.yaml"):
    """The metrics folder of the project in ``root`` (its params' ``paths.metrics``): ``.read(stage)`` is every figure."""
    from rlhf_core.artifacts import MetricsFolder
    from rlhf_core.config import load_params

    return MetricsFolder(root / load_params(root / params_file).paths.metrics)
