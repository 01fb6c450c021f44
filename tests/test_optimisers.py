"""RLOO, GRPO and DPO through TRL: each learns a preferred token with KL bounded, and the ppo stage's outputs for
each pass through evaluate and promote as PPO's do."""

import csv
import json

import pytest
import torch
import yaml
from mlflow import MlflowClient

from rlhf_core import tracking
from rlhf_core.config import PPOConfig, load_params
from rlhf_core.records import write_jsonl
from rlhf_core.schemas import PreferencePair, Prompt

from .conftest import hand_over_reward_model, stage_metrics
from .test_ppo_learning import FAVOURITE, NEW_TOKENS, favourite_share, favourite_token_model  # noqa: F401

KL_BOUND = 4.0  # nats per response, the bound test_ppo_learning holds PPO to


def _learning_cfg(algorithm: str, **overrides) -> PPOConfig:
    return PPOConfig(
        algorithm=algorithm, batch_size=8, minibatches=1, max_new_tokens=NEW_TOKENS, mode="freeze", freeze_layers=1,
        learning_rate=3e-3, missing_eos_penalty=None, **overrides,
    )  # fmt: skip


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_online_optimisers_raise_the_reward_while_kl_stays_bounded(favourite_token_model, algorithm, tmp_path):
    from rlhf_core.optimisers.online import train_online

    cfg = _learning_cfg(algorithm, updates=9)
    rows = []
    trained = train_online(
        algorithm, cfg, favourite_token_model, favourite_share, [f"Tell me about topic {i}" for i in range(32)], tmp_path,
        on_update=rows.append,
    )  # fmt: skip
    assert [r["update"] for r in rows] == list(range(1, 10)) and trained.history == rows
    scores = [r[f"{algorithm}/score"] for r in rows]
    assert sum(scores[-3:]) / 3 > scores[0] + 0.25, scores
    kls = [r[f"{algorithm}/kl"] for r in rows]
    assert max(kls) < KL_BOUND and kls[-1] > 0.1, kls  # it moved away from the reference, within bounds
    assert {r[f"{algorithm}/beta"] for r in rows} == {getattr(cfg, algorithm).beta}
    # 2 of the tiny model's layers, the lower one frozen with the embeddings (and the tied LM head)
    upper = trained.model.model.layers[1:]
    assert trained.trainable_parameters == sum(p.numel() for p in upper.parameters()) + trained.model.model.norm.weight.numel()


def test_the_reward_function_scores_text_and_applies_the_eos_trick_as_ppo_does():
    from rlhf_core.optimisers.online import ProxyReward

    seen = {}

    def score_fn(prompts, responses, finished):
        seen.update(prompts=prompts, responses=responses, finished=finished)
        return torch.tensor([0.5, 2.0])

    logged = {}
    reward = ProxyReward(score_fn, [2], missing_eos_penalty=-1.0)
    out = reward(["<chat>a", "<chat>b"], ["one", "two"], [[5, 2], [5, 6]], prompt_text=["a", "b"],
                 log_metric=logged.__setitem__)  # fmt: skip
    assert out == [0.5, -1.0]  # the cut-off response gets the penalty instead of its score
    assert seen == {"prompts": ["a", "b"], "responses": ["one", "two"], "finished": [True, False]}
    assert logged == {"score": 1.25, "finished_fraction": 0.5}  # the score before the trick, as PPO's


def _pairs(n: int, weight: float = 1.0) -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt_id=f"p{i}", prompt=f"Tell me about topic {i}", chosen_id=f"c{i}", chosen=" ".join([FAVOURITE] * 4),
            rejected_id=f"r{i}", rejected="the cat sat", ranking_id=f"k{i}", annotator_id="a", margin=0.0, weight=weight,
        )  # fmt: skip
        for i in range(n)
    ]


def test_dpo_on_pairs_that_prefer_a_token_raises_it_while_kl_stays_bounded(favourite_token_model, tmp_path):
    from rlhf_core.optimisers.dpo import train_dpo
    from rlhf_core.optimisers.session import GoldSlice

    share = lambda prompt, response: response.count(FAVOURITE) / NEW_TOKENS  # noqa: E731
    gold = GoldSlice([f"Question {i}" for i in range(8)], share, favourite_share, 0, NEW_TOKENS, 1.0)
    cfg = _learning_cfg("dpo", gold_eval_every=2, dpo={"learning_rate": 3e-3, "pairs_per_batch": 8, "epochs": 2.0})
    trained = train_dpo(cfg, favourite_token_model, _pairs(32), tmp_path, gold=gold)
    measured = [r for r in trained.history if "dpo/gold" in r]
    assert [r["update"] for r in measured] == [0, 2, 4, 6, 8]
    assert measured[-1]["dpo/gold"] > measured[0]["dpo/gold"] + 0.2, measured
    kls = [r["dpo/kl"] for r in measured]
    assert kls[0] == 0.0 and 0.1 < max(kls) < KL_BOUND, kls
    assert trained.history[-1]["dpo/trl/rewards/margins"] > 0  # TRL's own log rides along


def test_pairs_are_drawn_in_proportion_to_their_weights():
    from rlhf_core.optimisers.dpo import weighted_pairs

    equal = _pairs(6, weight=1 / 6)
    assert weighted_pairs(equal, 6) == equal  # the default data: every C(4,2) pair once
    heavy, light = _pairs(1, weight=1.0), _pairs(3, weight=1 / 3)  # a ranking with 1 pair, one with 3
    drawn = weighted_pairs(heavy + light, 4)
    assert drawn.count(heavy[0]) == 2 and all(drawn.count(p) <= 1 for p in light)  # each ranking counts the same


# --------------------------------------------------------------------------- the stage, then evaluate and promote


@pytest.fixture
def project(work_env, tiny_base_model):
    """Tiny base model, prompts, preference pairs and a handed-over (untrained, normalised) tiny reward model."""
    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.build import load_sequence_classifier
    from rlhf_core.reward.model import reward_tokenizer

    params = yaml.safe_load((work_env / "params.yaml").read_text())
    params["paths"]["base_model"] = str(tiny_base_model)
    params["ppo"]["dpo"]["pairs_per_batch"] = 4
    (work_env / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prompts = work_env / "data" / "prompts"
    write_jsonl(prompts / "train.jsonl", [Prompt(id=f"t{i}", text=f"Tell me something about number {i}.") for i in range(6)])
    write_jsonl(prompts / "eval.jsonl", [Prompt(id=f"e{i}", text=f"What is {i} plus {i}?") for i in range(8)])
    write_jsonl(work_env / "data/preferences/pairs.jsonl", _pairs(8, weight=1.0))
    tokenizer = reward_tokenizer(tiny_base_model, 64)
    RewardModel(load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id), tokenizer).save(work_env / "models/reward")
    hand_over_reward_model(work_env, work_env / "models/reward", version="5")
    return work_env


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "dpo"])
def test_each_optimiser_writes_ppos_outputs_and_passes_through_evaluate_and_promote(project, algorithm):
    from rlhf_core.stages import evaluate, ppo, promote

    params = load_params(project / "params.yaml")
    params = params.model_copy(update={"ppo": params.ppo.model_copy(update={"algorithm": algorithm})})
    metrics = ppo.run(params)

    saved = stage_metrics(project).read("ppo")
    assert saved == json.loads(json.dumps(metrics)) and saved["ppo/algorithm"] == algorithm
    assert saved["ppo/reward_model_hash"] == tracking.hash_paths([project / "models/reward"])
    assert isinstance(saved[f"{algorithm}/gold_start"], float) and isinstance(saved[f"{algorithm}/gold_end"], float)
    assert saved[f"{algorithm}/trainable_parameters"] > 0
    assert not any(k.startswith("ppo/") and k.split("/")[1] in ("final_kl", "gold_end") for k in saved)

    with (project / "plots/ppo_curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ppo.CURVE_COLUMNS
    assert rows[0]["update"] == "0" and rows[0]["kl"] == "0" and rows[0]["gold"] != ""
    assert rows[-1]["gold"] != "" and rows[-1]["beta"] != ""
    with (project / "plots/ppo_gold_probe.csv").open() as handle:
        probe = list(csv.DictReader(handle))
    probed = [r["update"] for r in rows if r["gold"]]
    assert sorted({p["update"] for p in probe}, key=int) == probed and len(probe) % len(probed) == 0
    if algorithm != "dpo":
        assert all(r["kl"] != "" and r["score"] != "" for r in rows[1:])
        assert [r["update"] for r in rows] == [str(u) for u in range(params.ppo.updates + 1)]
    assert (rows[-1]["rlhf_reward"] != "") == (algorithm == "rloo")  # the others maximise no such total

    policy = project / "models/policy"
    assert (policy / "model.safetensors").exists() and not list(policy.glob("adapter*"))
    client = MlflowClient()
    version = client.get_model_version_by_alias(tracking.POLICY_MODEL, "candidate")
    assert saved["ppo/registered_version"] == int(version.version) and version.tags["algorithm"] == algorithm
    run = client.get_run(version.run_id)
    assert run.data.tags["stage"] == "ppo" and run.data.tags["algorithm"] == algorithm
    assert min(m.step for m in client.get_metric_history(run.info.run_id, f"{algorithm}/gold")) == 0

    decision_input = evaluate.run(params)
    assert decision_input["eval/candidate_version"] == str(version.version)
    assert "eval/overopt/ppo_gold_first" in decision_input  # the curve's gold slice is read as PPO's
    decision = promote.run(params)
    assert decision["promote/version"] == str(version.version)
    status = client.get_model_version(tracking.POLICY_MODEL, version.version).tags
    assert status.get("status") in ("champion", "rejected") and status["lineage.reward_model_version"] == "5"
