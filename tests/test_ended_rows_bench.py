"""``bench/ended_rows.py`` on a tiny random model made to stop early: both samplers side by side, the same tokens."""

import json

import torch
import yaml

from tests.conftest import REPO, load_bench_script


def test_dropping_ended_rows_runs_fewer_row_steps_and_samples_the_same_tokens(tiny_base_model, tmp_path, capsys, monkeypatch):
    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.decoder import DecodeStep

    stop = load_tokenizer(tiny_base_model).eos_token_id
    step = DecodeStep.__call__
    # a random model seldom emits its stop token: a logit bonus ends its answers after a few tokens, at many steps
    def stopping(self, *args):
        logits = step(self, *args)
        return logits + 9.0 * (torch.arange(logits.shape[-1]) == stop)

    monkeypatch.setattr(DecodeStep, "__call__", stopping)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"]["prompt_source"] = str(REPO / params["paths"]["prompt_source"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "ended.json"
    argv = ["--model", str(tiny_base_model), "--params", str(tmp_path / "params.yaml"), "--prompts", "12", "--k", "2",
            "--batch", "24", "--new-tokens", "12", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert load_bench_script("ended_rows").main(argv) == 0

    result = json.loads(out.read_text())
    assert result["answers"] == 24 and result["identical_tokens"] is True and result["finished_share"] > 0.5
    assert result["dropping"]["row_steps"] < result["keeping"]["row_steps"]
    assert result["row_step_share"] == result["dropping"]["row_steps"] / result["keeping"]["row_steps"]
    assert result["speedup"] > 0 and result["machine"]["cpu_model"] and result["drop_ended"] < 1
    assert "| dropping ended rows |" in capsys.readouterr().out


def test_a_missing_policy_is_one_line_not_a_traceback(tmp_path, capsys):
    assert load_bench_script("ended_rows").main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no model at" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
