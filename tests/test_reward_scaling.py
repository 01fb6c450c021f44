"""``bench/reward_scaling.py`` on a tiny random model: sampled data, a fixed held-out split, every method per size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_core.artifacts import PromptSplit
from rlhf_core.records import write_jsonl
from rlhf_core.schemas import Prompt
from tests.conftest import load_bench_script

REPO = Path(__file__).resolve().parents[1]



@pytest.mark.slow
def test_learning_curve_on_a_tiny_model(work_env, tiny_base_model):
    rows = [json.loads(line) for line in (REPO / "data" / "prompts.jsonl").read_text().splitlines()[:15]]
    prompts = [Prompt(id=f"p{i:02d}", text=row["prompt"]) for i, row in enumerate(rows)]
    write_jsonl(PromptSplit(work_env / "data" / "prompts").train, prompts)
    out = work_env / "curve.json"
    argv = ["--params", str(work_env / "params.yaml"), "--base-model", str(tiny_base_model), "--prompts", "15",
            "--k", "5", "--train-k", "3,5", "--sizes", "6,all", "--work", str(work_env / "scratch"),
            "--out", str(out), "--threads", "1"]  # fmt: skip
    assert load_bench_script("reward_scaling").main(argv) == 0

    report = json.loads(out.read_text())
    assert report["heldout_prompts"] == 3 and report["train_prompts_available"] == 12  # 20% of 15 prompts held out
    assert report["heldout_pairs"] > 0 and 0.0 <= report["ceiling"]["gold_accuracy"] <= 1.0
    points = report["points"]
    # sizes 6 and all (12) x train K 3 and 5 x three methods
    assert {(p["train_prompts"], p["train_k"], p["method"]) for p in points} == {
        (n, k, m) for n in (6, 12) for k in (3, 5) for m in ("reward", "probe", "rubric")
    }
    pairs = {(p["train_prompts"], p["train_k"]): p["train_pairs"] for p in points}
    assert pairs[(6, 3)] < pairs[(12, 3)] and pairs[(12, 3)] < pairs[(12, 5)]  # C(3,2) vs C(5,2) pairs per ranking
    for p in points:
        assert 0.0 <= p["heldout_accuracy"] <= 1.0 and 0.0 <= p["heldout_gold_agreement"] <= 1.0
    assert Path(out.with_suffix(".png")).stat().st_size > 0


def test_linear_head_recovers_a_linear_preference():
    """The probe/rubric fit: pairs labelled by a hidden linear score are ordered by the fitted head on new items."""
    import torch

    script = load_bench_script("reward_scaling")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 6, generator=generator)
    truth = features @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    ordered = lambda a, b: (a, b, 1.0) if truth[a] > truth[b] else (b, a, 1.0)  # noqa: E731
    train = [ordered(i, i + 1) for i in range(0, 300, 2)]
    heldout = [ordered(i, i + 1) for i in range(300, 400, 2)]
    scores = script.fit_head(features, train, 1e-3)
    assert script.agreement(scores, train) >= 0.97
    assert script.agreement(scores, heldout) >= 0.95
    assert script.agreement(-scores, heldout) <= 0.05


def test_first_k_keeps_sampling_order_and_remaps_pairs():
    from rlhf_core.reward.data import Comparison, PromptComparisons

    group = PromptComparisons("p1", "prompt", ["c", "a", "b"], ["C", "A", "B"], [True, False, True])
    group.comparisons = [Comparison(0, 1, 0.0, 1.0, 1, None), Comparison(2, 1, 0.0, 1.0, 1, None)]  # c > a, b > a
    kept = load_bench_script("reward_scaling").first_k(group, 2, {"a": 0, "b": 1, "c": 2})
    assert kept.completion_ids == ["a", "b"] and kept.responses == ["A", "B"] and kept.finished == [False, True]
    assert [(c.chosen, c.rejected) for c in kept.comparisons] == [(1, 0)]  # b > a; the pair with c is gone


def test_bad_options_are_reported_without_a_traceback(capsys):
    assert load_bench_script("reward_scaling").main(["--sizes", "50,lots"]) == 2
    assert "--sizes: 'lots' is not a positive whole number or 'all'" in capsys.readouterr().err
    assert load_bench_script("reward_scaling").main(["--methods", "reward,magic"]) == 2
    assert "--methods: magic" in capsys.readouterr().err
