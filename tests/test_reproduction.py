"""A run reproduced from git + the DVC remote alone, on a machine without the MLflow store that made it.

Every stage hands off through files DVC tracks and every registry alias is
pinned in params, so a fresh clone that pulls the DVC cache is up to date, and
forcing ``ppo`` and ``evaluate`` again gives the same figures.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_core.artifacts import HEADLINES
from rlhf_core.tracking import flatten

from .conftest import isolate_env, stage_metrics, write_params

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
#: enough candidate prompts that the tiny reward model clears reward.champion_min_accuracy (0.61 held out), so PPO runs
LEARNABLE = {"candidates": {"max_prompts": 48}}


def _run(cmd, cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


#: wall-clock figures and registry bookkeeping, which differ between any two machines by design
UNREPRODUCIBLE = ("second", "per_s", "tokens_s", "time", "run_id", "registered_version", "candidate_version")


def _figures(metrics_file: Path) -> dict:
    """The stage's metrics without wall-clock figures (they differ between any two runs) or registry version numbers
    (each counts what that machine's MLflow store already held, not anything the stage computed)."""
    flat = {}

    def walk(value, name):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{name}/{key}" if name else key)
        elif not any(word in name for word in UNREPRODUCIBLE):
            flat[name] = value

    walk(json.loads(metrics_file.read_text()), "")
    return flat


#: Headline figures a stage writes only in some runs: promote's once a policy is promoted, generate_candidates'
#: ``skipped`` when ``labeling.backend: import`` brings its own candidates.
SOMETIMES = {"promote": {"champion", "previous"}, "generate_candidates": {"skipped"}}


def test_a_fresh_clone_with_the_dvc_remote_and_no_mlflow_store_reproduces_ppo_and_evaluate(
    tiny_project, tmp_path, monkeypatch
):
    remote = tmp_path / "dvc-remote"
    write_params(tiny_project, LEARNABLE)
    _run([*DVC, "repro"], tiny_project)
    for stage, table in HEADLINES.items():  # every headline names a figure its stage writes, less those of SOMETIMES
        shown = json.loads(stage_metrics(tiny_project).headline(stage).read_text())
        assert set(flatten(table)) - set(flatten(shown)) <= SOMETIMES.get(stage, set()), stage
    _run([*DVC, "remote", "add", "-d", "shared", str(remote)], tiny_project)
    _run([*DVC, "push"], tiny_project)
    _run(["git", "add", "-A"], tiny_project)
    _run(["git", "commit", "-q", "-m", "a pipeline run"], tiny_project)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(tiny_project), str(clone)], tmp_path)
    isolate_env(monkeypatch, clone)  # its own, empty MLflow store: nothing of the first machine's registry
    assert not (clone / ".work" / "mlflow.db").exists()
    _run([*DVC, "pull"], clone)
    status = _run([*DVC, "status"], clone)
    assert "up to date" in status, status
    assert "didn't change" in _run([*DVC, "repro"], clone) or "up to date" in status

    _run([*DVC, "repro", "--force", "--single-item", "ppo"], clone)
    _run([*DVC, "repro", "--force", "--single-item", "evaluate"], clone)
    for stage in ("ppo", "evaluate"):
        original = _figures(stage_metrics(tiny_project).detail(stage))
        again = _figures(stage_metrics(clone).detail(stage))
        assert again == original, {k: (original.get(k), again.get(k)) for k in original.keys() | again.keys()
                                   if original.get(k) != again.get(k)}
