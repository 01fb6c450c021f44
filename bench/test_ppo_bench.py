"""Tests of the PPO benchmark's harness: FLOP counts, token counting, summary and ratios, and one tiny run.

Run with ``.venv/bin/pytest bench/test_ppo_bench.py`` (bench/ is outside the default test path).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ppo_bench.baseline import generated_tokens
from ppo_bench.flops import DecoderShape, PassSizes, matmul_peak_flops, ppo_training_flops
from ppo_bench.summary import checks, ratios, side_summary
from ppo_bench.workload import first_prompts

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

SHAPE = DecoderShape(layer_params=10, num_layers=4, head_params=100)
SIZES = PassSizes(batch=2, seq_len=5, n_response=3)  # 10 tokens through the layers, 6 through the LM head


def test_flops_freeze_mode_counts_only_the_upper_layers_and_input_gradient_of_the_frozen_head():
    # upper layer fwd 2*10*1*10 = 200; head fwd 2*100*6 = 1200
    # experience: policy + reference = 2 * 1400 = 2800
    # epoch: layers 3 * 200 (trained) + head 2 * 1200 (frozen, gradient passes) = 3000; two epochs 6000
    flops = ppo_training_flops(SHAPE, SIZES, mode="freeze", trunk_layers=3, separate_value=False, ppo_epochs=2)
    assert flops == 8800


def test_flops_full_mode_with_separate_value_trains_everything():
    # layers fwd 2*10*4*10 = 800 (policy, reference, value alike); head 1200
    # experience: 2 * (800 + 1200) + 800 = 4800; epoch: 3*800 + 3*1200 + 3*800 = 8400
    flops = ppo_training_flops(SHAPE, SIZES, mode="full", trunk_layers=0, separate_value=True, ppo_epochs=2)
    assert flops == 4800 + 2 * 8400


def test_flops_lora_mode_backpropagates_through_frozen_base_weights_only_once():
    flops = ppo_training_flops(SHAPE, SIZES, mode="lora", trunk_layers=3, separate_value=False, ppo_epochs=2)
    assert flops == 2800 + 2 * (2 * 200 + 2 * 1200)


def test_flops_count_the_rows_own_tokens_and_the_old_pass_only_where_it_runs():
    # 7 of the 10 positions are the rows' own: upper layer fwd 2*10*1*7 = 140; head 1200
    # experience without the old pass: reference only = 1340; epoch: 3 * 140 + 2 * 1200 = 2820
    sizes = PassSizes(batch=2, seq_len=5, n_response=3, tokens=7, old_pass=False)
    flops = ppo_training_flops(SHAPE, sizes, mode="freeze", trunk_layers=3, separate_value=False, ppo_epochs=2)
    assert flops == 1340 + 2 * 2820


def test_the_bf16_matmul_peak_is_measured_only_where_a_side_or_the_cpu_uses_it():
    import ppo_vs_trl

    assert ppo_vs_trl.matmul_dtypes(ppo_vs_trl.DEFAULT_SIDES, fast_bf16=False) == ("float32",)
    assert ppo_vs_trl.matmul_dtypes(ppo_vs_trl.DEFAULT_SIDES, fast_bf16=True) == ("float32", "bfloat16")
    assert ppo_vs_trl.matmul_dtypes(["ours-bf16", "trl-bf16"], fast_bf16=False) == ("float32", "bfloat16")


def test_matmul_peak_is_positive_and_finite():
    peak = matmul_peak_flops("float32", size=64, repeats=2)
    assert 0 < peak < float("inf")


def test_generated_tokens_stop_at_the_first_stop_token_inclusive():
    eos = 2
    responses = torch.tensor([[5, 6, eos, eos], [5, 6, 7, 8], [eos, eos, eos, eos]])
    assert generated_tokens(responses, eos) == 3 + 4 + 1


def _run(seconds: list[float], rss: int, flops: bool = False) -> dict:
    updates = []
    for s in seconds:
        update = {"seconds": s, "generation_seconds": s / 2, "generated_tokens": 10 * s}
        if flops:
            update.update(training_flops=100 * s, training_seconds=s / 4)
        updates.append(update)
    return {"updates": updates, "peak_rss_bytes": rss}


def test_side_summary_drops_each_runs_warmup_update():
    side = side_summary([_run([100, 1, 3], rss=5), _run([100, 2, 4], rss=7)], peaks={"float32": 100.0})
    assert side["steady_updates"] == 4
    assert side["median_seconds_per_update"] == 2.5
    assert side["median_seconds_per_update_by_round"] == {"1": 2, "2": 3}
    assert side["median_generated_tokens_per_second"] == 20
    assert side["peak_rss_bytes"] == 7
    assert "median_training_flops_per_second" not in side


def test_side_summary_gives_flops_share_of_each_peak():
    side = side_summary([_run([9, 2, 2], rss=1, flops=True)], peaks={"float32": 800.0, "bfloat16": 1600.0})
    assert side["median_training_flops_per_second"] == 400
    assert side["training_share_of_float32_peak"] == 0.5
    assert side["training_share_of_bfloat16_peak"] == 0.25


def test_ratios_and_checks():
    trl = {"median_seconds_per_update": 24.0, "peak_rss_bytes": 9}
    default = ratios({"median_seconds_per_update": 6.0, "peak_rss_bytes": 4}, trl)
    full = ratios({"median_seconds_per_update": 30.0, "peak_rss_bytes": 6}, trl)
    assert default == {"speedup": 4.0, "peak_rss_share": 4 / 9}
    verdict = checks(default, full)
    assert verdict["default_speedup_required_3x"] and not verdict["default_speedup_goal_5x"]
    assert verdict["default_rss_required_half"] and not verdict["default_rss_goal_third"]
    assert not verdict["full_not_slower"]


def test_first_prompts_are_ordered_by_id(tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps({"id": i, "prompt": f"text {i}"}) for i in ("p3", "p1", "p2")) + "\n")
    assert first_prompts(source, "prompt", 2) == ["text p1", "text p2"]


@pytest.mark.slow
def test_tiny_run_of_our_side_writes_results(tmp_path):
    from rlhf_core.base_model import build_tiny
    from rlhf_core.config import TinyModelConfig

    model = tmp_path / "tiny"
    build_tiny(TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=64, seed=0), model)  # fmt: skip
    params = tmp_path / "params.yaml"
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    values["ppo"].update(freeze_layers=1, max_new_tokens=4)
    params.write_text(yaml.safe_dump(values))
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(BENCH / "ppo_vs_trl.py"), "--model", str(model), "--params", str(params), "--updates", "2",
           "--rounds", "1", "--prompts", "8", "--sides", "ours-default", "--max-wait", "0", "--out", str(out),
           "--work-dir", str(tmp_path / "work")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    side = result["summary"]["ours-default"]
    assert side["steady_updates"] == 1
    assert side["median_training_flops_per_second"] > 0
    assert result["runs"][0]["updates"][0]["sizes"]["n_response"] <= 4
    assert "| ours-default |" in done.stdout
    assert not list((tmp_path / "work").glob("*/reward-model"))  # removed at the end; logs stay
    assert list((tmp_path / "work").glob("*/ours-default-round1.log"))
