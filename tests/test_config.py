from pathlib import Path

import pytest
import yaml

from rlhf_core.config import Params, load_params
from rlhf_core.errors import ConfigError

from .conftest import REPO, rlhf


def test_repo_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.candidates.k >= 2
    assert params.ppo.minibatch_size * params.ppo.minibatches == params.ppo.batch_size


def test_every_dvc_params_section_exists_in_the_model():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    sections = set(Params.model_fields)
    named = set()
    for stage in dvc["stages"].values():
        for entry in stage.get("params", []):
            names = entry if isinstance(entry, str) else next(iter(entry.values()))
            named.update([names] if isinstance(names, str) else names)
    assert named, "dvc.yaml names no params sections"
    assert named <= sections, f"dvc.yaml names sections the config does not know: {named - sections}"


def test_every_dvc_path_variable_is_a_paths_key():
    import re

    text = (REPO / "dvc.yaml").read_text()
    used = set(re.findall(r"\$\{paths\.(\w+)\}", text))
    assert used and used <= set(load_params(REPO / "params.yaml").paths.model_fields)


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_misspelt_key_names_file_line_and_key(tmp_path):
    path = _write(tmp_path, lambda d: d["ppo"].update({"lerning_rate": 1e-5}))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message.count("\n") == 0
    assert "ppo.lerning_rate" in message and "unknown key" in message and str(path) in message
    line = int(message.split(":")[1])
    assert "lerning_rate" in path.read_text().splitlines()[line - 1]


def test_ill_typed_value_is_reported(tmp_path):
    path = _write(tmp_path, lambda d: d["candidates"].update({"k": "four"}))
    with pytest.raises(ConfigError, match=r"candidates\.k"):
        load_params(path)


def test_cross_field_rule(tmp_path):
    path = _write(tmp_path, lambda d: d["ppo"].update({"batch_size": 8, "minibatches": 3}))
    with pytest.raises(ConfigError, match="divisible"):
        load_params(path)


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("paths: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(tmp_path / "nope.yaml")


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    path = _write(tmp_path, lambda d: d["reward"].update({"epohcs": 2}))
    done = rlhf("check-params", "--params", str(path), cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "reward.epohcs" in lines[0] and "unknown key" in lines[0]


def test_cli_help_lists_stages(tmp_path):
    done = rlhf("--help", cwd=tmp_path)
    for command in ("base-model", "prompts", "check-params"):
        assert command in done.stdout
