"""``bench/prefix_scoring.py`` on a tiny random model: both workloads and dtypes timed, the two paths' scores agree."""

import json

import yaml

from tests.conftest import REPO, load_bench_script


def test_grouped_and_one_pass_scoring_are_timed_and_agree(tiny_base_model, tmp_path, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"]["prompt_source"] = str(REPO / params["paths"]["prompt_source"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "prefix.json"
    argv = ["--model", str(tiny_base_model), "--params", str(tmp_path / "params.yaml"), "--prompts", "6",
            "--pool-prompts", "2", "--pool", "4", "--k", "3", "--batch-size", "8", "--repeats", "1", "--threads", "1",
            "--out", str(out)]  # fmt: skip
    assert load_bench_script("prefix_scoring").main(argv) == 0

    result = json.loads(out.read_text())
    rows = {(r["dtype"], r["workload"]): r for r in result["rows"]}
    assert set(rows) == {(d, w) for d in ("float32", "bfloat16") for w in ("evaluate", "candidates")}
    assert rows["float32", "evaluate"]["responses"] == 6 * 2 + 2 * 3 and rows["float32", "candidates"]["responses"] == 18
    for row in rows.values():
        assert row["grouped_s"] > 0 and row["one_pass_s"] > 0 and row["groups_with_prefix"] > 0
        assert row["tokens_computed_grouped"] < row["tokens"]  # each prompt's tokens once per group
        assert row["max_abs_score_diff"] < (1e-4 if row["dtype"] == "float32" else 5e-2)
    assert result["machine"]["cpu_model"] and "amx_bf16" in result["machine"]
    assert "| float32 | candidates | 18 |" in capsys.readouterr().out


def test_a_missing_model_is_one_line_not_a_traceback(tmp_path, capsys):
    assert load_bench_script("prefix_scoring").main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no model at" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
