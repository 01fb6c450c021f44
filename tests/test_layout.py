"""One layout of artifacts, one list of stages, and a dvc.yaml that agrees with both and with the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from rlhf_core import cli
from rlhf_core.artifacts import STAGE_IO, CsvCurve, Layout, artifact_path, pipeline_stages, stage_command
from rlhf_core.config import load_params
from rlhf_core.errors import ConfigError, DataError

from .conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
PACKAGE = REPO / "rlhf_core"


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def _imported_names(file: Path, module: str) -> set[str]:
    """Every module an ``import`` anywhere in the file may load (function-level imports included)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def project_modules(start: str) -> set[Path]:
    """The rlhf_core files that running ``start`` can execute: its imports, theirs, and their packages."""
    seen: dict[str, Path] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or not (name == "rlhf_core" or name.startswith("rlhf_core.")):
            continue
        file = _module_file(name)
        if file is None:
            continue
        seen[name] = file
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _imported_names(file, name)
    return set(seen.values())


def _resolve(entry: str) -> str:
    return re.sub(r"\$\{paths\.(\w+)\}", lambda m: PARAMS["paths"][m.group(1)], entry)


def _entries(stage: dict, key: str) -> set[str]:
    return {_resolve(next(iter(e)) if isinstance(e, dict) else e) for e in stage.get(key, [])}


@pytest.mark.parametrize("stage", list(DVC))
def test_dvc_deps_cover_every_module_the_stage_imports(stage):
    deps = [REPO / d for d in _entries(DVC[stage], "deps")]
    modules = project_modules(f"rlhf_core.stages.{stage}")
    assert PACKAGE / "stages" / f"{stage}.py" in modules
    missing = sorted(str(f.relative_to(REPO)) for f in modules if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {stage} runs these modules without listing them as deps: {missing}"


def test_the_import_walk_follows_function_level_and_package_imports():
    ppo = project_modules("rlhf_core.stages.ppo")
    assert PACKAGE / "reward" / "__init__.py" in ppo  # imported inside run()
    assert PACKAGE / "ppo" / "__init__.py" in ppo and PACKAGE / "ppo" / "loop.py" in ppo
    assert PACKAGE / "evaluation" / "human_eval.py" in project_modules("rlhf_core.stages.collect_preferences")


@pytest.mark.parametrize("stage", list(DVC))
def test_dvc_outs_and_data_deps_are_the_declared_artifacts(stage):
    layout, io = Layout(load_params(REPO / "params.yaml").paths), STAGE_IO[stage]
    declared_in = {str(artifact_path(layout, name)) for name in io.inputs}
    declared_in |= {str(layout.metrics.detail(name)) for name in io.metrics_inputs}
    data_deps = {d for d in _entries(DVC[stage], "deps") if not d.startswith("rlhf_core")}
    assert data_deps == declared_in
    outs = {str(artifact_path(layout, name)) for name in io.outputs} | {str(layout.metrics.detail(stage))}
    assert _entries(DVC[stage], "outs") == outs
    assert _entries(DVC[stage], "plots") == {str(artifact_path(layout, name)) for name in io.plots}
    assert _entries(DVC[stage], "metrics") == {str(layout.metrics.headline(stage))}


def test_every_consumer_takes_its_stages_from_dvc_yaml():
    stages = list(pipeline_stages(REPO / "dvc.yaml"))
    assert stages == list(DVC) == list(STAGE_IO)
    assert list(cli.stages()) == [stage_command(s) for s in stages]
    for name, stage in DVC.items():
        assert stage["cmd"] == f"rlhf {stage_command(name)}" and stage.get("desc")
        assert callable(__import__(f"rlhf_core.stages.{name}", fromlist=["run"]).run)
    from flows.pipeline import STAGES
    from flows.summary import AT_A_GLANCE
    from tasks.stages import GPU_STAGES

    assert STAGES == stages and set(AT_A_GLANCE) <= set(stages)
    assert GPU_STAGES == {name for name, stage in DVC.items() if (stage.get("meta") or {}).get("gpu")}
    assert {"train_reward", "ppo"} <= GPU_STAGES and "promote" not in GPU_STAGES


def test_a_broken_pipeline_file_is_one_config_error(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: [oops\n")
    with pytest.raises(ConfigError, match="dvc.yaml: not valid YAML"):
        pipeline_stages(tmp_path / "dvc.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        pipeline_stages(tmp_path / "missing.yaml")


def test_the_library_never_imports_the_orchestration_layer():
    offenders = []
    for file in PACKAGE.rglob("*.py"):
        text = file.read_text()
        module = ".".join(file.relative_to(REPO).with_suffix("").parts)
        for name in _imported_names(file, module):
            if name.split(".")[0] in ("flows", "tasks", "prefect", "dvc"):
                offenders.append(f"{file.relative_to(REPO)} imports {name}")
        if re.search(r"[\"'](flows|tasks)\.\w+", text):
            offenders.append(f"{file.relative_to(REPO)} names an orchestration module in a string")
    assert not offenders


def test_schedule_comes_from_the_entry_point_group(capsys):
    tools = cli.tools()
    assert tools["schedule"][0] == "flows.deploy" and "schedule" not in cli.TOOLS
    with pytest.raises(SystemExit):
        cli.main(["schedule", "--help"])
    assert "--cron" in capsys.readouterr().out


#: names of files that one stage writes and another reads; only rlhf_core/artifacts.py may spell them
HAND_OFF_NAMES = ("train.jsonl", "eval.jsonl", "pairs.jsonl", "ppo_curve.csv", "reward_loss.csv", "summary.json",
                  "samples.jsonl", "rejects.jsonl")


def test_no_stage_or_bench_script_spells_another_stages_file_name():
    found = []
    for folder in ("rlhf_core", "bench", "flows", "tasks"):
        for file in (REPO / folder).rglob("*.py"):
            if file == PACKAGE / "artifacts.py":
                continue
            for number, line in enumerate(file.read_text().splitlines(), start=1):
                found += [f"{file.relative_to(REPO)}:{number}: {name}" for name in HAND_OFF_NAMES if f'"{name}"' in line]
    assert not found


def test_csv_curve_round_trip_keeps_empty_cells_as_none(tmp_path):
    curve = CsvCurve(tmp_path / "plots" / "curve.csv")
    assert curve.read() == []
    curve.write(["update", "kl", "gold"], [[0, 0.0, None], [1, 0.5, 0.25]])
    assert curve.read() == [{"update": 0.0, "kl": 0.0, "gold": None}, {"update": 1.0, "kl": 0.5, "gold": 0.25}]
    curve.path.write_text("update,kl\n1,abc\n")
    with pytest.raises(DataError, match=r"curve.csv:2: not a number"):
        curve.read()


def test_prompt_split_and_metrics_folder_round_trip(tmp_path):
    from rlhf_core.schemas import Prompt

    layout = Layout(load_params(REPO / "params.yaml").paths.model_copy(
        update={"prompts": str(tmp_path / "prompts"), "metrics": str(tmp_path / "metrics")}))
    train, held_out = [Prompt(id="a", text="Hi?")], [Prompt(id="b", text="Why?")]
    layout.prompts.write(train, held_out, [])
    assert layout.prompts.read_train() == train and layout.prompts.read_eval() == held_out
    layout.prompts.eval.write_text("")
    with pytest.raises(DataError, match="eval.jsonl: no prompts"):
        layout.prompts.read_eval()
    assert layout.metrics.read("ppo") == {}
    layout.metrics.write("ppo", {"ppo/final_kl": 1.5, "ppo/seed": 3})
    assert layout.metrics.read("ppo") == {"ppo/final_kl": 1.5, "ppo/seed": 3}


def test_an_existing_experiment_gets_the_model_training_kind(work_env):
    from mlflow import MlflowClient

    from rlhf_core import tracking

    client = MlflowClient()
    old = client.create_experiment("rlhf", artifact_location=(work_env / "art").as_uri())
    assert tracking.experiment_id() == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.ui_url("http://h:5000/").endswith(f"/#/experiments/{old}/runs?workflowType=machine_learning")
