"""The train_reward stage on a tiny model and hand-made preferences where the preference is learnable."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from rlhf_core.config import load_params
from rlhf_core.precision import default_device
from rlhf_core.preferences import PreferenceBundle, bundle_pairs
from rlhf_core.records import write_jsonl
from rlhf_core.schemas import Completion, Prompt, Ranking

from .conftest import deep_update, rlhf, stage_metrics

pytestmark = pytest.mark.slow

MARKER = "wonderful"
WORDS = "river stone cloud paper window garden music light table road apple winter ocean pencil bridge forest".split()
#: a reward model that can learn "contains the marker word" within seconds on the tiny model
LEARNABLE = {"reward": {"mode": "full", "learning_rate": 3e-3, "epochs": 5, "center_rewards_coefficient": None}}


def marker_bundle(num_prompts: int, k: int = 4, seed: int = 0, policy_version: str = "base:test") -> PreferenceBundle:
    """K completions per prompt; the first half contain MARKER and are ranked above the rest (ties within halves)."""
    rng = random.Random(seed)
    bundle = PreferenceBundle()
    for i in range(num_prompts):
        prompt = Prompt(id=f"p{i:03d}", text=f"Tell me about the {rng.choice(WORDS)} number {i}.")
        bundle.prompts.append(prompt)
        ids = []
        for j in range(k):
            words = rng.choices(WORDS, k=rng.randint(4, 9))
            if j < k // 2:
                words.insert(rng.randrange(len(words) + 1), MARKER)
            completion = Completion(
                id=f"c{i:03d}-{j}", prompt_id=prompt.id, text=" ".join(words) + ".", policy_version=policy_version,
                seed=0, num_tokens=len(words) + 1, finished=rng.random() < 0.8,
            )
            bundle.completions.append(completion)
            ids.append(completion.id)
        ranks = [1 if j < k // 2 else 2 for j in range(k)]
        bundle.rankings.append(
            Ranking(id=f"r{i:03d}", prompt_id=prompt.id, completion_ids=ids, ranks=ranks, annotator_id="a1", source="simulated")
        )
    return bundle


def write_preferences(root: Path, bundle: PreferenceBundle, *, candidates: PreferenceBundle | None = None, collect: dict | None = None) -> None:
    """What generate_candidates and collect_preferences would have written."""
    folder = root / "data" / "preferences"
    bundle.write(folder)
    write_jsonl(folder / "pairs.jsonl", bundle_pairs(bundle, margin="rank_distance"))
    cands = candidates or bundle
    write_jsonl(root / "data" / "candidates" / "prompts.jsonl", cands.prompts)
    write_jsonl(root / "data" / "candidates" / "completions.jsonl", cands.completions)
    if collect is None:
        collect = {"preferences/agreement": 0.73, "preferences/gold_accuracy": 0.8}
    stage_metrics(root).write("collect_preferences", collect)


def reward_project(root: Path, base_model: Path, overrides: dict | None = None) -> Path:
    """params.yaml with tiny overrides (+ ``overrides``) and the tiny base model in ``paths.base_model``."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_update(params, overrides or {}), sort_keys=False))
    shutil.copytree(base_model, root / load_params(root / "params.yaml").paths.base_model)
    return root


@pytest.fixture(params=["float32", "bfloat16"])
def project(request, work_env, tiny_base_model):
    """Both numeric paths on any host: bf16 (mixed precision) runs on every x86 CPU, fast or not."""
    root = reward_project(work_env, tiny_base_model, deep_update(LEARNABLE, {"reward": {"dtype": request.param}}))
    write_preferences(root, marker_bundle(30))
    return root


def test_learnable_preference_reaches_high_heldout_accuracy_and_registers_champion(project):
    from rlhf_core.stages import train_reward

    params = load_params(project / "params.yaml")
    metrics = train_reward.run(params)

    assert metrics["reward/accuracy"] >= 0.9, metrics
    assert metrics["reward/heldout_prompts"] == 6 and metrics["reward/train_prompts"] == 24
    assert metrics["reward/heldout_pairs"] == 6 * 4 and metrics["reward/train_pairs"] == 24 * 4
    assert metrics["reward/accuracy_rank_distance_1"] == metrics["reward/accuracy"]
    assert metrics["reward/agreement"] == 0.73 and 0 <= metrics["reward/gold_accuracy"] <= 1
    assert metrics["reward/gap_to_gold"] == pytest.approx(metrics["reward/gold_accuracy"] - metrics["reward/accuracy"])
    assert 0 <= metrics["reward/calibration_ece"] <= 0.5
    assert metrics["reward/train_loss_last"] < metrics["reward/train_loss_first"]
    assert metrics["reward/pairs_per_second"] > 0 and metrics["reward/train_seconds"] > 0
    assert metrics["reward/normalization_source"] == "candidates" and metrics["reward/normalization_samples"] == 120
    assert metrics["reward/champion"] is True and metrics["reward/registered_version"] == 1
    assert metrics["reward/dtype"] == params.reward.dtype and metrics["reward/device"] == default_device().type
    assert stage_metrics(project).read("train_reward") == metrics

    curve = (project / "plots" / "reward_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == metrics["reward/train_steps"] + 1

    folder = project / params.paths.reward_model
    assert (folder / "model.safetensors").exists() and (folder / "normalization.json").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    assert not list(project.glob("checkpoint-*")) and not list((project / ".work").rglob("checkpoint-*"))

    # Normalisation: reloaded (in the dtype it was trained in), the base model's own completions score mean 0, std 1.
    from rlhf_core.reward import RewardModel

    model = RewardModel.load(folder)
    assert model.dtype == params.reward.dtype
    base = marker_bundle(30)
    prompts = {p.id: p.text for p in base.prompts}
    scores = model.score([prompts[c.prompt_id] for c in base.completions], [c.text for c in base.completions],
                         [c.finished for c in base.completions])
    assert abs(float(scores.mean())) < 1e-3 and float(scores.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)

    # The registry: models:/rlhf-reward-model@champion resolves through MlflowClient and scores a pair.
    import mlflow

    version = mlflow.MlflowClient().get_model_version_by_alias("rlhf-reward-model", "champion")
    assert str(version.version) == "1" and version.tags["status"] == "champion"
    assert str(mlflow.MlflowClient().get_model_version_by_alias("rlhf-reward-model", "candidate").version) == "1"
    from rlhf_core.tracking import model_by_alias

    champion = RewardModel.load(model_by_alias("rlhf-reward-model", "champion").path)
    good, bad = champion.score(["Tell me about the sea."] * 2, [f"the {MARKER} blue sea.", "the blue sea."])
    assert good > bad
    run = mlflow.get_run(version.run_id)
    assert run.data.tags["stage"] == "train_reward" and run.info.status == "FINISHED"
    assert run.data.metrics["reward/accuracy"] == metrics["reward/accuracy"]
    assert run.data.params["reward/dtype"] == params.reward.dtype and run.data.params["reward/device"] == metrics["reward/device"]
    history = mlflow.MlflowClient().get_metric_history(version.run_id, "reward/train_loss")
    assert len(history) == metrics["reward/train_steps"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_normalisation_from_the_frozen_trunk_cache_holds_when_reloaded(work_env, tiny_base_model, dtype):
    """With reward.mode: freeze the stage scores from cached trunk states; a reload runs whole passes in the saved dtype."""
    from rlhf_core.reward import RewardModel
    from rlhf_core.stages import train_reward

    root = reward_project(work_env, tiny_base_model, {"reward": {"mode": "freeze", "epochs": 0.5, "dtype": dtype}})
    write_preferences(root, marker_bundle(12))
    params = load_params(root / "params.yaml")
    assert train_reward.run(params)["reward/dtype"] == dtype
    model = RewardModel.load(root / params.paths.reward_model)
    base = marker_bundle(12)
    prompts = {p.id: p.text for p in base.prompts}
    scores = model.score([prompts[c.prompt_id] for c in base.completions], [c.text for c in base.completions],
                         [c.finished for c in base.completions])  # fmt: skip
    assert abs(float(scores.mean())) < 1e-3 and float(scores.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


def test_inaccurate_version_does_not_replace_the_champion(work_env, tiny_base_model):
    root = reward_project(work_env, tiny_base_model, LEARNABLE)
    write_preferences(root, marker_bundle(20))
    from rlhf_core.stages import train_reward

    first = train_reward.run(load_params(root / "params.yaml"))
    assert first["reward/champion"] is True
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["reward"]["epochs"] = 0.2
    params["reward"]["champion_min_accuracy"] = 1.0  # a barely trained model does not order all 16 held-out pairs right
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    second = train_reward.run(load_params(root / "params.yaml"))

    assert second["reward/accuracy"] < 1.0
    assert second["reward/champion"] is False and second["reward/registered_version"] == 2
    import mlflow

    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("rlhf-reward-model", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("rlhf-reward-model", "candidate").version) == "2"
    reason = client.get_model_version("rlhf-reward-model", "2").tags["not_champion_reason"]
    assert "< reward.champion_min_accuracy 1.0" in reason


def test_base_completions_are_sampled_when_candidates_come_from_another_policy(work_env, tiny_base_model):
    root = reward_project(work_env, tiny_base_model, {"reward": {"epochs": 0.5, "normalization_samples": 10}})
    bundle = marker_bundle(10)
    write_preferences(root, bundle, candidates=marker_bundle(10, policy_version="rlhf-policy/3"), collect={})
    from rlhf_core.stages import train_reward

    metrics = train_reward.run(load_params(root / "params.yaml"))
    assert metrics["reward/normalization_source"] == "sampled" and metrics["reward/normalization_samples"] == 10
    assert "reward/gold_accuracy" not in metrics and "reward/agreement" not in metrics


def test_missing_preferences_is_one_clear_line(work_env, tiny_base_model):
    reward_project(work_env, tiny_base_model)
    done = rlhf("train-reward", cwd=work_env, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pairs.jsonl: not found (run `rlhf collect-preferences` first)" in done.stderr


HH_ROWS = [
    ("How do I keep basil alive?", "Water it when the soil feels dry and give it plenty of sun.", "Basil dies."),
    ("What is a good name for a cat?", "Many people like Luna or Milo; pick one that suits its mood.", "Cat."),
    ("How can I sleep better?", "Keep a regular bedtime, dim the lights and avoid screens late.", "Sleep more."),
    ("Any tips for learning guitar?", "Practise a little every day and start with simple chords.", "Guitar is hard."),
    ("How do I boil an egg?", "Cover it with water, boil for eight minutes, then cool it.", "Boil it."),
    ("What should I read next?", "Try a short novel in a genre you have not read before.", "Books."),
]


def test_hh_rlhf_import_trains_with_the_same_stage(tiny_project):
    """Public human preferences (HH-RLHF transcripts) through labeling.backend=import, then train-reward."""
    root = tiny_project
    lines = [
        json.dumps({"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"})
        for q, good, bad in HH_ROWS
    ]
    (root / "data" / "imports").mkdir(parents=True, exist_ok=True)
    (root / "data" / "imports" / "hh.jsonl").write_text("\n".join(lines) + "\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params = deep_update(params, {"labeling": {"backend": "import", "import_file": "hh.jsonl", "import_format": "hh"},
                                  "reward": {"normalization_samples": 8}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from rlhf_core.stages import base_model, collect_preferences, prompts, train_reward

    loaded = load_params(root / "params.yaml")
    for stage in (base_model, prompts, collect_preferences):
        stage.run(loaded)
    metrics = train_reward.run(loaded)
    assert metrics["reward/train_pairs"] + metrics["reward/heldout_pairs"] == len(HH_ROWS)
    # Imported data has no base-model candidates: its own training answers set the reward's zero and unit.
    assert metrics["reward/normalization_source"] == "imported" and "reward/gold_accuracy" not in metrics
    assert (root / "models" / "reward" / "model.safetensors").exists()


def test_runaway_learning_rate_exits_2_saves_and_registers_nothing(work_env, tiny_base_model):
    root = reward_project(work_env, tiny_base_model, {"reward": {"learning_rate": 1e30}})
    write_preferences(root, marker_bundle(10))
    params = load_params(root / "params.yaml")
    old = root / params.paths.reward_model
    old.mkdir(parents=True)
    (old / "model.safetensors").write_text("the previous reward model")

    done = rlhf("train-reward", cwd=root, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "reward.learning_rate=1e+30: loss is nan at step 2; training stopped" in done.stderr
    assert [p.name for p in old.iterdir()] == ["model.safetensors"] and (old / "model.safetensors").read_text() == "the previous reward model"
    assert not (root / params.paths.reward_release).exists() and not (root / "plots" / "reward_loss.csv").exists()
    assert not stage_metrics(root).detail("train_reward").exists()
    import mlflow

    assert mlflow.MlflowClient().search_model_versions("name = 'rlhf-reward-model'") == []
    (run,) = mlflow.search_runs(experiment_names=["rlhf"], output_format="list")
    assert run.data.tags["stage"] == "train_reward" and run.info.status == "FAILED"


def test_a_version_is_registered_only_after_the_outputs_and_metrics_are_written(work_env, tiny_base_model, monkeypatch):
    root = reward_project(work_env, tiny_base_model, {"reward": {"epochs": 0.2}})
    write_preferences(root, marker_bundle(10))
    from rlhf_core import tracking
    from rlhf_core.stages import train_reward

    params = load_params(root / "params.yaml")
    seen = {}
    register = tracking.register_version

    def register_after_checking(*args, **kwargs):
        metrics = stage_metrics(root).read("train_reward")
        seen.update(accuracy=metrics.get("reward/accuracy"), version=metrics.get("reward/registered_version"),
                    weights=(root / params.paths.reward_model / "model.safetensors").exists(),
                    curve=(root / "plots" / "reward_loss.csv").exists())  # fmt: skip
        return register(*args, **kwargs)

    monkeypatch.setattr(tracking, "register_version", register_after_checking)
    metrics = train_reward.run(params)
    assert seen == {"accuracy": metrics["reward/accuracy"], "version": None, "weights": True, "curve": True}
    assert stage_metrics(root).read("train_reward")["reward/registered_version"] == 1
    import mlflow

    (run,) = mlflow.search_runs(experiment_names=["rlhf"], output_format="list")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "reward/accuracy")
    assert len(history) == 1  # the second write of the metrics logs only the registry's additions
