"""``bench/sampling.py`` on a tiny random model: every dtype and batch measured, the roofline from this run's figures."""

import json

import pytest
import yaml

from tests.conftest import REPO, load_bench_script


def test_tokens_per_second_of_both_samplers_and_the_roofline(tiny_base_model, tmp_path, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"]["prompt_source"] = str(REPO / params["paths"]["prompt_source"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "sampling.json"
    argv = ["--model", str(tiny_base_model), "--params", str(tmp_path / "params.yaml"), "--batches", "2", "5",
            "--new-tokens", "3", "--repeats", "1", "--threads", "1", "--matmul-size", "256", "--out", str(out)]  # fmt: skip
    assert load_bench_script("sampling").main(argv) == 0

    result = json.loads(out.read_text())
    assert [(r["dtype"], r["batch"]) for r in result["rows"]] == [(d, b) for d in ("float32", "bfloat16") for b in (2, 5)]
    assert result["memory_bandwidth_gb_s"] > 0 and set(result["matmul_peak_gflop_s"]) == {"float32", "bfloat16"}
    assert result["machine"]["cpu_model"] and "amx_bf16" in result["machine"]
    for row in result["rows"]:
        assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
        assert row["weight_stream_gb_s"] > 0 and row["weight_stream_wxt_gb_s"] > 0
        # the sampler without its skinny linears, side by side, only where they apply (fp32, few rows)
        assert ("ours_plain_linear_tokens_per_s" in row) == (row["dtype"] == "float32")
        # and without the compiled kernel, where it runs (fp32 and bf16)
        kernel = result["decode_linears"] in ("avx512", "avx2")
        assert ("ours_without_kernel_tokens_per_s" in row) == kernel == ("weight_stream_kernel_gb_s" in row)
        assert row["ours_vs_hf"] == pytest.approx(row["ours_tokens_per_s"] / row["hf_tokens_per_s"])
        assert row["bound"] in ("memory", "compute") and row["roofline_tokens_per_s"] > 0
    fp32, bf16 = result["rows"][0], result["rows"][2]  # same batch: half the bytes per weight, so a higher memory bound
    if fp32["bound"] == bf16["bound"] == "memory":
        assert bf16["roofline_tokens_per_s"] > fp32["roofline_tokens_per_s"]
    table = capsys.readouterr().out
    assert "| float32 | 5 |" in table and "| bfloat16 | 2 |" in table


def test_a_missing_model_is_one_line_not_a_traceback(tmp_path, capsys):
    assert load_bench_script("sampling").main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no model at" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
