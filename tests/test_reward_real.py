"""The reward model on imported human judgements: head-only probe through the stage, `rlhf reward evaluate`, reports."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_core.config import load_params
from rlhf_core.records import write_json, write_jsonl

from .conftest import load_bench_script, rlhf
from .test_train_reward_stage import MARKER, marker_bundle, reward_project

HH_ROWS = [
    {
        "chosen": f"\n\nHuman: Tell me about stone {i}.\n\nAssistant: Sure.\n\nHuman: More please.\n\nAssistant: a {MARKER} stone {i}.",
        "rejected": f"\n\nHuman: Tell me about stone {i}.\n\nAssistant: Sure.\n\nHuman: More please.\n\nAssistant: a grey stone {i}.",
    }
    for i in range(12)
]


def test_loss_first_and_last_are_window_means():
    from rlhf_core.reward.trainer import loss_first_last, loss_window

    losses = [(step, 1.0 if step % 2 else 0.0) for step in range(1, 41)]  # noisy steps 1, 0, 1, 0, ...
    assert loss_window(losses) == 4 and loss_first_last(losses) == (0.5, 0.5)
    assert loss_window(losses[:3]) == 1 and loss_first_last(losses[:3]) == (1.0, 1.0)
    assert loss_window([(i, 0.0) for i in range(5000)]) == 50 and loss_first_last([]) == (None, None)


def test_preference_report_counts_accuracy_interval_length_bins_and_calibration():
    from rlhf_core.reward.data import Comparison, PromptComparisons
    from rlhf_core.reward.metrics import preference_report, wilson_interval

    low, high = wilson_interval(80, 100)
    assert low == pytest.approx(0.7112, abs=1e-3) and high == pytest.approx(0.8666, abs=1e-3)
    groups = []
    for i, (chosen, rejected, diff) in enumerate([("a b", "a b c d e f g h", 2.0), ("a", "b", -1.0), ("x " * 30, "y", 0.5)]):
        group = PromptComparisons(f"p{i}", "q?", ["c", "r"], [chosen, rejected], [False, False])
        group.comparisons = [Comparison(0, 1, 0.0, 1.0, 1, None)]
        groups.append((group, diff))
    scores = {}
    for group, diff in groups:
        scores[("q?", group.responses[0], False)] = diff
        scores[("q?", group.responses[1], False)] = 0.0
    report = preference_report([g for g, _ in groups], scores)
    assert report["pairs"] == 3 and report["accuracy"] == pytest.approx(2 / 3)
    assert report["accuracy_by_length_difference"] == {
        "[-20, -5)": {"pairs": 1, "accuracy": 1.0}, "[-5, 5)": {"pairs": 1, "accuracy": 0.0}, "[20, inf)": {"pairs": 1, "accuracy": 1.0}
    }
    assert report["shorter_answer_wins"] == pytest.approx(1 / 3 + 0.5 / 3)
    assert sum(row["pairs"] for row in report["calibration"]) == 3 and 0 <= report["calibration_ece"] <= 0.5


def import_project(root, base_model, rows, overrides=None):
    """A project whose preferences came from an HH-RLHF import: no prompts stage, no candidates."""
    from rlhf_core.importers import import_preferences
    from rlhf_core.preferences import bundle_pairs

    source = root / "hh.jsonl"
    write_jsonl(source, rows)
    settings = {"labeling": {"backend": "import", "import_file": "hh.jsonl"},
                "reward": {"mode": "none", "read_layer": 1, "normalization_samples": 10, **(overrides or {})}}
    reward_project(root, base_model, settings)
    bundle = import_preferences(source, "hh")
    folder = root / "data" / "preferences"
    bundle.write(folder)
    write_jsonl(folder / "pairs.jsonl", bundle_pairs(bundle))
    write_json(root / "metrics" / "collect_preferences.json", {})
    return source


def test_head_only_stage_on_imported_pairs_normalises_on_their_answers_and_reports_lengths(work_env, tiny_base_model, capsys):
    from rlhf_core.stages import train_reward

    import_project(work_env, tiny_base_model, HH_ROWS * 3, {"max_length": 40})
    assert not (work_env / "data" / "candidates").exists() and not (work_env / "data" / "prompts").exists()
    metrics = train_reward.run(load_params(work_env / "params.yaml"))
    assert metrics["reward/normalization_source"] == "imported" and metrics["reward/normalization_samples"] == 10
    assert metrics["reward/train_steps"] == 0 and metrics["reward/trainable_parameters"] == 64
    assert metrics["reward/train_loss_last"] < metrics["reward/train_loss_first"]
    assert metrics["reward/length_p50"] <= metrics["reward/length_p90"] <= metrics["reward/length_max"]
    assert metrics["reward/truncated_completions"] > 0
    err = capsys.readouterr().err
    assert "exceed reward.max_length=40 tokens" in err and "never the final answer" in err
    assert "Token indices sequence length" not in err


def test_reward_evaluate_reports_accuracy_interval_length_and_calibration(work_env, tiny_base_model, tmp_path):
    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.build import build_reward_model
    from rlhf_core.reward.model import reward_tokenizer
    from rlhf_core.config import RewardConfig

    source = import_project(work_env, tiny_base_model, HH_ROWS)
    tokenizer = reward_tokenizer(tiny_base_model, 64)
    model, _ = build_reward_model(tiny_base_model, tokenizer, RewardConfig(mode="none"))
    RewardModel(model, tokenizer).save(tmp_path / "rm")
    done = rlhf("reward", "evaluate", str(source), "--model", str(tmp_path / "rm"), "--out", "report.json", cwd=work_env)
    report = json.loads((work_env / "report.json").read_text())
    assert report["pairs"] == 12 and report["accuracy_low"] <= report["accuracy"] <= report["accuracy_high"]
    assert report["shorter_answer_wins"] == 0.5 and list(report["accuracy_by_length_difference"]) == ["[-5, 5)"]
    assert f"accuracy {report['accuracy']:.3f} (95% " in done.stdout and "calibration: ECE" in done.stdout
    assert "Token indices" not in done.stderr

    missing = rlhf("reward", "evaluate", "nowhere.jsonl", "--model", str(tmp_path / "rm"), cwd=work_env, check=False)
    assert missing.returncode == 2 and "nowhere.jsonl: preference source not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    not_a_model = rlhf("reward", "evaluate", str(source), "--model", str(tmp_path), cwd=work_env, check=False)
    assert not_a_model.returncode == 2 and "not a reward model folder" in not_a_model.stderr


def test_bench_baselines_shorter_wins_and_bag_of_words():
    bench = load_bench_script("reward_real")
    assert bench.shorter_wins([("a", "bb"), ("ccc", "d"), ("e", "f")]) == pytest.approx(0.5)
    words = "river stone cloud paper window garden music light table road".split()
    pairs = [(f"{words[i % 10]} {MARKER}", f"{words[(i + 3) % 10]} dull") for i in range(40)]
    accuracy, l2 = bench.bag_of_words(pairs[:30], pairs[30:], seed=0)
    assert accuracy == 1.0 and l2 > 0


def test_an_empty_answer_is_a_valid_preference_item_and_trains(tmp_path, tiny_base_model):
    from rlhf_core.importers import import_preferences
    from rlhf_core.preferences import bundle_pairs
    from rlhf_core.reward.data import group_pairs
    from rlhf_core.reward.model import encode_conversation, reward_tokenizer

    rows = [
        {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant:", "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a wrench."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant:   "},
        {"chosen": "\n\nHuman: Yo\n\nAssistant:\u200b", "rejected": "\n\nHuman: Yo\n\nAssistant: Hey."},
    ]
    write_jsonl(tmp_path / "hh.jsonl", rows)
    bundle = import_preferences(tmp_path / "hh.jsonl", "hh")
    assert len(bundle.rankings) == 2 and sorted(c.text for c in bundle.completions)[:2] == ["", ""]
    assert [r.reason for r in bundle.rejects if r.line == 3][0].startswith("no visible text")  # invisible is not empty
    groups = group_pairs(bundle_pairs(bundle), bundle, "none")
    tokenizer = reward_tokenizer(tiny_base_model, 64)
    ids, _ = encode_conversation(tokenizer, groups[0].prompt, "", False)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_import_backend_without_import_file_names_the_key(tmp_path):
    from rlhf_core.config import LabelingConfig
    from rlhf_core.errors import DataError
    from rlhf_core.stages.collect_preferences import imported_bundle

    (tmp_path / "imports").mkdir()
    write_jsonl(tmp_path / "imports" / "hh.jsonl", HH_ROWS)
    with pytest.raises(DataError, match=r"labeling.import_file is not set: .* \(paths.preference_import\) .*e.g. hh.jsonl"):
        imported_bundle(tmp_path / "imports", LabelingConfig(backend="import"))


def test_preset_writes_its_settings_into_params_in_place_and_refuses_a_misspelt_key(work_env):
    (work_env / "hh.yaml").write_text("labeling.backend: import\nreward.mode: none\nreward.read_layer: 12\n")
    before = (work_env / "params.yaml").read_text()
    done = rlhf("reward", "preset", "hh.yaml", cwd=work_env)
    assert "3 of 3 settings of hh.yaml changed" in done.stdout and "dvc repro" in done.stdout
    params = load_params(work_env / "params.yaml")
    assert (params.labeling.backend, params.reward.mode, params.reward.read_layer) == ("import", "none", 12)
    assert len((work_env / "params.yaml").read_text().splitlines()) == len(before.splitlines())  # edited in place
    assert "0 of 3 settings" in rlhf("reward", "preset", "hh.yaml", cwd=work_env).stdout

    (work_env / "bad.yaml").write_text("reward.read_layr: 12\n")
    bad = rlhf("reward", "preset", "bad.yaml", cwd=work_env, check=False)
    assert bad.returncode == 2 and "bad.yaml: " in bad.stderr and "read_layr" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_dvc_repro_trains_the_reward_model_on_an_import_without_sampling_candidates(tiny_project):
    """`labeling.backend: import` + `dvc repro train_reward`: the candidates stage writes an empty bundle at once."""
    import subprocess
    import sys

    from .conftest import stage_metrics, write_params

    write_jsonl(tiny_project / "data" / "imports" / "hh.jsonl", HH_ROWS * 2)
    write_params(tiny_project, {"labeling": {"backend": "import", "import_file": "hh.jsonl"}, "sft": {"source": "none"},
                                "reward": {"mode": "none", "read_layer": 1, "normalization_samples": 8}})
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "train_reward"], cwd=tiny_project,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "generate_candidates: skipped, labeling.backend is import" in done.stdout
    candidates = json.loads(stage_metrics(tiny_project).detail("generate_candidates").read_text())
    assert candidates["candidates/completions"] == 0 and "candidates/tokens" not in candidates
    assert (tiny_project / "data" / "candidates" / "completions.jsonl").read_text() == ""
    reward = json.loads(stage_metrics(tiny_project).detail("train_reward").read_text())
    assert reward["reward/normalization_source"] == "imported" and reward["reward/train_pairs"] > 0
    assert json.loads(stage_metrics(tiny_project).detail("collect_preferences").read_text())["preferences/backend"] == "import"
