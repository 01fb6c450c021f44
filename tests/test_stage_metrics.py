"""A stage's metrics: a few headline figures for `dvc metrics show`, every figure for code and MLflow."""

import json
import subprocess
import sys
from typing import get_args

from flows.summary import AT_A_GLANCE, render_summary

from rlhf_core import tracking
from rlhf_core.artifacts import HEADLINES, OPTIMISERS, STAGE_IO, MetricsFolder, headline
from rlhf_core.config import PPOConfig, load_params

from .conftest import isolate_env, make_project, stage_metrics

#: DVC prints a float to 5 significant digits: ``0.12346``, as wide as most figures are
FIGURE = 0.123456789


def _first_keys(table: dict) -> list[str]:
    keys = []
    for leaf in table.values():
        if isinstance(leaf, dict):
            keys += _first_keys(leaf)
        else:
            keys.append(leaf if isinstance(leaf, str) else leaf[0])
    return keys


def test_every_stage_has_a_few_headline_figures():
    assert list(HEADLINES) == list(STAGE_IO)
    for stage, table in HEADLINES.items():
        keys = _first_keys(table)
        assert 3 <= len(keys) <= 15 and len(set(keys)) == len(keys), stage


def test_ppo_headlines_show_the_figures_of_whichever_optimiser_ran():
    assert set(OPTIMISERS) == set(get_args(PPOConfig.model_fields["algorithm"].annotation))
    flat = {"ppo/algorithm": "rloo", "rloo/final_kl": 0.5, "rloo/updates": 3, "ppo/registered_version": 2}
    assert headline("ppo", flat) == {"algorithm": "rloo", "updates": 3, "final": {"kl": 0.5}, "version": 2}


def test_the_run_summary_shows_headline_figures_of_any_optimiser(work_env):
    for stage, names in AT_A_GLANCE.items():
        assert set(names) <= set(tracking.flatten(HEADLINES[stage])), stage
    results = {"ppo": {"ppo/algorithm": "grpo", "grpo/final_kl": 0.25, "grpo/updates": 3}, "promote": {}}
    text = render_summary(work_env, load_params(work_env / "params.yaml"), results)
    assert "  ppo                  KL 0.25, updates 3\n" in text and "  promote              done\n" in text


def test_a_stage_writes_every_figure_flat_and_its_headlines_nested(tmp_path):
    metrics = MetricsFolder(tmp_path / "metrics")
    flat = {
        "eval/gold_win_rate_vs_reference": 0.6, "eval/gold_win_rate_vs_reference_low": 0.5, "eval/kl": 1.25,
        "eval/champion_version": None, "eval/candidate/length_std": 0.0, "eval/all_gates_passed": True,
        "eval/failed_gates": "",
    }  # fmt: skip
    metrics.write("evaluate", flat)
    assert metrics.read("evaluate") == flat
    shown = json.loads(metrics.headline("evaluate").read_text())
    assert shown == {"gold": {"win": 0.6, "lo": 0.5}, "kl": 1.25, "gates": {"passed": True, "failed": ""}}
    assert sorted(p.name for p in metrics.folder.iterdir()) == ["evaluate.detail.json", "evaluate.json"]


def test_finishing_a_stage_writes_both_files_and_logs_every_figure(work_env):
    with tracking.stage_run("train_reward", metrics_dir=work_env / "metrics") as stage:
        first = stage.finish({"reward": {"accuracy": 0.75, "train_loss_first": 0.7}})
        stage.finish({**first, "reward/registered_version": 3})
    folder = stage_metrics(work_env)
    every = {"reward/accuracy": 0.75, "reward/train_loss_first": 0.7, "reward/registered_version": 3}
    assert folder.read("train_reward") == every
    assert json.loads(folder.headline("train_reward").read_text()) == {"acc": {"heldout": 0.75}, "version": 3}
    assert tracking._mlflow().MlflowClient().get_run(stage.run_id).data.metrics == every


def test_dvc_metrics_show_prints_only_the_headlines_each_stage_within_120_columns(tmp_path, monkeypatch):
    root = make_project(tmp_path / "project")
    isolate_env(monkeypatch, root)
    folder = stage_metrics(root)
    for stage, table in HEADLINES.items():
        folder.write(stage, {key: FIGURE for key in _first_keys(table)})

    listed = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=root,
                            capture_output=True, text=True, check=True)  # fmt: skip
    shown = json.loads(listed.stdout)[""]["data"]
    assert set(shown) == {str(folder.headline(stage).relative_to(root)) for stage in HEADLINES}
    for stage in HEADLINES:
        assert shown[str(folder.headline(stage).relative_to(root))]["data"] == headline(stage, folder.read(stage))

    # one table per stage, as `dvc metrics show metrics/<stage>.json` prints it (one process: DVC starts slowly)
    targets = [str(folder.headline(stage).relative_to(root)) for stage in HEADLINES]
    script = "import sys\nfrom dvc.cli import main\nfor t in sys.argv[1:]:\n    main(['metrics', 'show', t])\n"
    monkeypatch.setenv("COLUMNS", "1000")  # a table DVC would wrap could not be measured
    tables = subprocess.run([sys.executable, "-c", script, *targets], cwd=root, capture_output=True, text=True,
                            check=True)  # fmt: skip
    lines = tables.stdout.splitlines()
    assert len(lines) == 2 * len(HEADLINES)
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
