"""``bench/device_check.py`` end to end on a tiny random model: every step runs and reports its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_bench_script

REPO = Path(__file__).resolve().parents[1]



@pytest.mark.slow
def test_device_check_runs_every_step_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # params.yaml's paths are relative to the repository
    out = tmp_path / "check.json"
    assert load_bench_script("device_check").main(["--shape", "tiny", "--prompts", "4", "--updates", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert list(steps) == ["sampling", "likelihood", "reward_training", "reward_scoring", "ppo_build", "ppo_update"]
    assert steps["sampling"]["samples"] == 16  # 4 prompts x params' K = 4
    assert steps["sampling"]["tokens"] > 0
    assert steps["reward_training"]["pairs"] > 0 and steps["reward_training"]["steps"] >= 1
    assert steps["reward_scoring"]["responses"] == 16
    assert steps["ppo_update"]["updates"] == 2 and steps["ppo_update"]["median_seconds"] > 0
    assert report["device_type"] in ("cpu", "cuda")


def test_device_check_reports_a_bad_params_file_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("ppo:\n  updates: -3\n")
    assert load_bench_script("device_check").main(["--params", str(bad), "--shape", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "device check:" in err and "updates" in err
