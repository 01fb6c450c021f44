"""``bench/packed_passes.py`` on a tiny random model: both ways of running PPO's length groups, timed in turns."""

import json

import yaml

from tests.conftest import REPO, load_bench_script


def test_packed_and_per_group_steps_are_timed_in_turns(tiny_base_model, tmp_path, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"]["prompt_source"] = str(REPO / params["paths"]["prompt_source"])
    params["ppo"].update(batch_size=8, max_new_tokens=6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "packed.json"
    argv = ["--model", str(tiny_base_model), "--params", str(tmp_path / "params.yaml"), "--prompts", "16",
            "--rounds", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert load_bench_script("packed_passes").main(argv) == 0

    result = json.loads(out.read_text())
    assert result["mode"] == "full" and result["rows"] == 8 and result["groups"] > 1
    assert len(result["packed"]["seconds"]) == len(result["per_group"]["seconds"]) == 2
    assert result["speedup"] == result["per_group"]["median_seconds"] / result["packed"]["median_seconds"] > 0
    assert result["machine"]["cpu_model"] and "| packed |" in capsys.readouterr().out
    from rlhf_core.ppo import policy

    assert policy.packs_layers.__name__ == "packs_layers"  # put back after the runs


def test_a_missing_model_is_one_line_not_a_traceback(tmp_path, capsys):
    assert load_bench_script("packed_passes").main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no model at" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
