"""Stage ``ppo`` through the real CLI on a tiny project, in an isolated MLflow store."""

import csv

import pytest
import torch
import yaml
from mlflow import MlflowClient

from rlhf_core import kernels, tracking
from rlhf_core.config import load_params
from rlhf_core.precision import default_device
from rlhf_core.records import write_jsonl
from rlhf_core.schemas import Prompt

from .conftest import hand_over_reward_model, rlhf, stage_metrics

pytestmark = pytest.mark.slow


@pytest.fixture
def project(work_env, tiny_base_model):
    """Tiny base model, train/eval prompts and an (untrained, normalised) tiny reward model; champion not yet named."""
    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.build import load_sequence_classifier
    from rlhf_core.reward.model import reward_tokenizer

    params = yaml.safe_load((work_env / "params.yaml").read_text())
    params["paths"]["base_model"] = str(tiny_base_model)
    (work_env / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prompts = work_env / "data" / "prompts"
    write_jsonl(prompts / "train.jsonl", [Prompt(id=f"t{i}", text=f"Tell me something about number {i}.") for i in range(6)])
    write_jsonl(prompts / "eval.jsonl", [Prompt(id=f"e{i}", text=f"What is {i} plus {i}?") for i in range(5)])
    tokenizer = reward_tokenizer(tiny_base_model, 64)
    RewardModel(load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id), tokenizer).save(work_env / "models/reward")
    return work_env


def test_without_a_handed_over_reward_model_the_stage_says_so_in_one_line(project):
    from rlhf_core.errors import RLHFError
    from rlhf_core.stages import ppo

    with pytest.raises(RLHFError, match="no reward model has been handed over") as failure:
        ppo.run(load_params(project / "params.yaml"))
    assert "\n" not in str(failure.value)


def test_a_reward_model_that_missed_its_bar_stops_ppo_before_training(project):
    hand_over_reward_model(project, project / "models/reward", version="2", accuracy=0.52, min_accuracy=0.55)
    done = rlhf("ppo", cwd=project, check=False)
    assert done.returncode == 2
    assert "rlhf-reward-model version 2" in done.stderr and "missed reward.champion_min_accuracy" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (project / "models/policy").exists() and not stage_metrics(project).detail("ppo").exists()


def test_a_reward_folder_that_is_not_the_handed_over_one_is_refused(project):
    hand_over_reward_model(project, project / "models/reward")
    (project / "models/reward/normalization.json").write_text('{"shift": 5.0, "scale": 1.0}')
    done = rlhf("ppo", cwd=project, check=False)
    assert done.returncode == 2 and "is not the reward model" in done.stderr


def test_an_alias_as_the_starting_policy_is_refused_naming_the_flow(project):
    hand_over_reward_model(project, project / "models/reward")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ppo"]["init_policy"] = "champion"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = rlhf("ppo", cwd=project, check=False)
    assert done.returncode == 2 and "aliases are resolved by" in done.stderr and "--from-champion" in done.stderr


def test_ppo_stage_trains_logs_every_update_saves_registers_and_resumes(project):
    reward_version = "4"
    hand_over_reward_model(project, project / "models/reward", version=reward_version)
    rlhf("ppo", cwd=project)  # tiny overrides: 3 updates, checkpoint every update, gold every 2

    metrics = stage_metrics(project).read("ppo")
    assert metrics["ppo/updates"] == 3 and metrics["ppo/resumed_from_update"] == 0
    for key in ("final_kl", "final_score", "gold_start", "gold_end", "seconds_per_update_median"):
        assert isinstance(metrics[f"ppo/{key}"], float)
    assert metrics["ppo/reward_model_version"] == reward_version
    assert metrics["ppo/reward_model_hash"] == tracking.hash_paths([project / "models/reward"])
    numeric_path = {"ppo/dtype": "float32", "ppo/device": default_device().type, "ppo/reward_dtype": "float32",
                    "ppo/decode_linears": kernels.decode_path(torch.float32, default_device())}
    assert {k: metrics[k] for k in numeric_path} == numeric_path

    with (project / "plots/ppo_curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["update", "kl", "beta", "score", "rlhf_reward", "entropy", "approx_kl", "clipfrac",
                             "response_length", "tokens_per_second", "gold", "gold_proxy"]  # fmt: skip
    assert [r["update"] for r in rows] == ["0", "1", "2", "3"]
    assert [bool(r["gold"]) for r in rows] == [True, False, True, True]  # before training, every 2 updates, at the end
    assert rows[0]["kl"] == "0" and rows[0]["score"] == "" and rows[3]["score"] != ""
    with (project / "plots/ppo_gold_probe.csv").open() as handle:  # the same probes, per prompt, in the slice's order
        probe = list(csv.DictReader(handle))
    slice_size = len(probe) // 3
    assert slice_size >= 2 and [(r["update"], r["prompt"]) for r in probe] == [
        (u, str(i)) for u in ("0", "2", "3") for i in range(slice_size)
    ]
    for row in (r for r in rows if r["gold"]):
        golds = [float(p["gold"]) for p in probe if p["update"] == row["update"]]
        assert sum(golds) / len(golds) == pytest.approx(float(row["gold"]), abs=1e-5)

    policy = project / "models/policy"
    assert (policy / "model.safetensors").exists() and (policy / "tokenizer.json").exists()
    assert not list(policy.glob("*.bin"))
    version = MlflowClient().get_model_version_by_alias(tracking.POLICY_MODEL, "candidate")
    assert metrics["ppo/registered_version"] == int(version.version)
    assert version.tags["reward_model_version"] == reward_version and version.tags["init_policy"].startswith("base:")
    assert version.tags["reward_model_hash"] == metrics["ppo/reward_model_hash"]
    client = MlflowClient()
    run = client.get_run(version.run_id)
    assert run.data.tags["stage"] == "ppo" and run.info.status == "FINISHED"
    assert {k: run.data.params[k] for k in numeric_path} == numeric_path
    for name in ("ppo/kl", "ppo/beta", "ppo/score", "ppo/rlhf_reward", "ppo/entropy", "ppo/approx_kl", "ppo/clipfrac",
                 "ppo/value_clipfrac", "ppo/policy_loss", "ppo/value_loss", "ppo/response_length",
                 "ppo/tokens_per_second", "ppo/seconds_per_update"):  # fmt: skip
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
        assert steps[-3:] == [1, 2, 3], name
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "ppo/gold")) == [0, 2, 3]
    assert [p.name for p in (project / ".work/checkpoints/ppo").iterdir()] == ["update-000003"]

    # the same run again resumes from its last checkpoint: nothing left to train, the curve is kept whole
    rlhf("ppo", cwd=project)
    again = stage_metrics(project).read("ppo")
    assert again["ppo/resumed_from_update"] == 3 and again["ppo/final_kl"] == metrics["ppo/final_kl"]
    assert (project / "plots/ppo_curve.csv").read_text().count("\n") == 5
