"""The evaluate and promote stages end to end on tiny models, in an isolated MLflow store."""

import json
import shutil

import pytest
import torch
import yaml
from mlflow import MlflowClient

from rlhf_core import kernels, tracking
from rlhf_core.config import load_params
from rlhf_core.records import write_jsonl
from rlhf_core.schemas import Prompt, Ranking

from .conftest import hand_over_reward_model, stage_metrics

pytestmark = pytest.mark.slow

PROMPTS = [
    "How do I keep basil alive on a windowsill?",
    "Explain what a hash table is in one paragraph.",
    "Give me three tips for a first marathon.",
    "Why is the sky blue?",
    "Write a haiku about autumn rain.",
    "What should I pack for a weekend camping trip?",
    "How can I make my bread rise better?",
    "Summarise the plot of Hamlet in two sentences.",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny reference, a different tiny candidate, and an (untrained, normalised) tiny reward model."""
    from rlhf_core.base_model import build_tiny
    from rlhf_core.config import TinyModelConfig
    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.build import load_sequence_classifier
    from rlhf_core.reward.model import reward_tokenizer

    root = tmp_path_factory.mktemp("models")
    build_tiny(TinyModelConfig(), root / "base")
    build_tiny(TinyModelConfig(seed=1), root / "policy")
    tokenizer = reward_tokenizer(root / "base", 128)
    RewardModel(load_sequence_classifier(root / "base", tokenizer.pad_token_id), tokenizer).save(root / "reward")
    return root


def _project(root, models, policy="policy", **sections):
    """Params pointing at the tiny models, eval prompts, and the PPO and reward stages' metrics."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["paths"].update(base_model=str(models / "base"), policy=str(models / policy), reward_model=str(models / "reward"))
    for name, values in sections.items():
        params[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_jsonl(root / "data/prompts/eval.jsonl", [Prompt(id=f"e{i}", text=t) for i, t in enumerate(PROMPTS)])
    (root / "metrics").mkdir(exist_ok=True)
    params["paths"]["reward_release"] = str(hand_over_reward_model(root, models / "reward", version="3"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "plots").mkdir(exist_ok=True)
    (root / "plots/ppo_curve.csv").write_text(
        "update,kl,beta,score,rlhf_reward,gold,gold_proxy\n"
        "0,0.0,0.05,0.0,0.0,0.10,0.0\n1,0.4,0.05,0.3,0.28,,\n2,0.9,0.05,0.6,0.56,0.30,0.5\n3,1.5,0.05,0.9,0.83,0.05,0.9\n"
    )
    return load_params(root / "params.yaml")


def _register_policy(root, folder, aliases) -> str:
    """A version of rlhf-policy whose artifact is ``folder`` (as the PPO stage registers it)."""
    with tracking.stage_run("ppo", metrics_dir=root / "scratch") as run:
        run.log_artifact(folder, "policy")
        return tracking.register_version(tracking.POLICY_MODEL, run, "policy", aliases=aliases)


def test_evaluate_measures_gates_plots_and_promote_acts_on_it(work_env, models):
    from rlhf_core.stages import evaluate, promote

    champion = _register_policy(work_env, models / "base", ["champion"])
    candidate = _register_policy(work_env, models / "policy", ["candidate"])
    params = _project(work_env, models, evaluate={"champion": champion})
    stage_metrics(work_env).write("ppo", {"ppo/registered_version": int(candidate)})

    metrics = evaluate.run(params)
    saved = stage_metrics(work_env).read("evaluate")
    assert saved == json.loads(json.dumps(metrics))
    assert saved["eval/candidate_version"] == candidate and saved["eval/champion_version"] == champion
    assert saved["eval/num_prompts"] == len(PROMPTS)
    low, rate, high = (saved[f"eval/gold_win_rate_vs_reference{s}"] for s in ("_low", "", "_high"))
    k = params.evaluate.samples_per_prompt
    assert k == 2  # the default: every response of a prompt meets each of the other policy's
    assert 0 <= low <= rate <= high <= 1 and saved["eval/gold_win_rate_vs_reference_n"] == len(PROMPTS) * k * k
    assert len(PROMPTS) <= saved["eval/gold_win_rate_vs_reference_effective_n"] <= len(PROMPTS) * k * k
    assert "eval/gold_win_rate_vs_champion" in saved and "eval/proxy_win_rate_vs_champion" in saved
    # k1 estimates from a few samples can be negative; exactly 0 only for a policy identical to the reference
    assert saved["eval/kl"] != 0.0
    # the champion here has the reference's weights: same seed, same responses, same win rates
    assert saved["eval/gold_win_rate_vs_champion"] == saved["eval/gold_win_rate_vs_reference"]
    assert saved["eval/champion/length_mean"] == saved["eval/reference/length_mean"]
    assert saved["eval/perplexity"] > 1 and saved["eval/length_ratio"] > 0
    for n in (1, 2, 4):
        assert f"eval/best_of_n/{n}/gold" in saved
        low, gain, high = (saved[f"eval/best_of_n/{n}/gold_gain{s}"] for s in ("_low", "", "_high"))
        assert low <= gain <= high
    assert saved["eval/best_of_n/1/gold_gain"] == pytest.approx(0.0, abs=1e-12)  # best-of-1 is one reference sample
    assert saved["eval/best_of_n/1/kl"] == 0.0 and saved["eval/best_of_n/4/proxy"] >= saved["eval/best_of_n/1/proxy"]
    assert saved["eval/overopt/ppo_gold_peak"] == 0.30 and saved["eval/overopt/flagged"] is True  # gold fell, proxy rose
    assert saved["eval/gate/overoptimisation/passed"] is False and saved["eval/all_gates_passed"] is False
    for gate in ("win_rate_vs_reference", "kl", "distinct_2", "reward_accuracy"):
        assert {"value", "threshold", "passed"} <= {k.split("/")[-1] for k in saved if k.startswith(f"eval/gate/{gate}/")}

    evaluation = work_env / params.paths.evaluation
    samples = (evaluation / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * len(PROMPTS) * k
    assert sorted({(json.loads(row)["prompt_id"], json.loads(row)["sample"]) for row in samples}) == sorted(
        (f"e{i}", j) for i in range(len(PROMPTS)) for j in range(k)
    )
    assert (evaluation / "plot_data/best_of_n.csv").read_text().startswith("n,kl,proxy,gold")
    assert not (evaluation / "human_eval").exists()  # gold is known: no human task
    for name in ("gold_vs_kl.png", "ppo_curves.png", "lengths.png"):
        assert (work_env / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = MlflowClient().search_runs([tracking.experiment_id()], "tags.stage = 'evaluate'")[0]
    assert run.data.metrics["eval/kl"] == pytest.approx(saved["eval/kl"])
    assert run.data.tags["metric.eval/all_gates_passed"] == "False"
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert logged == {f"plots/{n}" for n in ("gold_vs_kl.png", "ppo_curves.png", "lengths.png")}

    decision = promote.run(params)
    assert decision["promote/promoted"] is False and decision["promote/champion"] == champion
    tags = MlflowClient().get_model_version(tracking.POLICY_MODEL, candidate).tags
    assert tags["status"] == "rejected" and "over-optimisation" in tags["rejection_reasons"]
    assert tags["lineage.reward_model_version"] == "3" and tags["lineage.ppo_run_id"]
    assert tags["lineage.reward_model_hash"] == tracking.hash_paths([models / "reward"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # both numeric paths, whatever the host CPU
def test_a_candidate_equal_to_the_reference_ties_everywhere_with_zero_kl(work_env, models, dtype):
    from rlhf_core.precision import default_device
    from rlhf_core.stages import evaluate

    params = _project(work_env, models, policy="base", evaluate={"human_eval": "never", "dtype": dtype})
    saved = evaluate.run(params)
    # the policies ran in evaluate.dtype; the reward model in the dtype its folder records (fp32 here)
    assert (saved["eval/dtype"], saved["eval/device"], saved["eval/reward_dtype"]) == (dtype, default_device().type, "float32")
    run = MlflowClient().search_runs([tracking.experiment_id()], "tags.stage = 'evaluate'")[0]
    assert run.data.params["eval/dtype"] == dtype and run.data.params["eval/device"] == saved["eval/device"]
    # fp32 on a CPU: the compiled kernel's path (or why not); bf16: torch's
    assert saved["eval/decode_linears"] == kernels.decode_path(getattr(torch, dtype), default_device())
    assert saved["eval/candidate_version"] is None and saved["eval/champion_version"] is None
    # same seed, same model: same samples; the KL is the sampler's log-probs minus a scoring pass's (rounding only)
    assert saved["eval/kl"] == pytest.approx(0.0, abs=1e-3 if dtype == "float32" else 0.1)
    assert saved["eval/length_ratio"] == 1.0
    assert saved["eval/gold_win_rate_vs_reference"] == 0.5 and saved["eval/proxy_win_rate_vs_reference"] == 0.5
    assert saved["eval/overopt/proxy_gain"] == 0.0
    assert saved["eval/gate/win_rate_vs_champion/passed"] is True  # no champion yet
    assert saved["eval/gate/win_rate_vs_reference/passed"] is False  # a tie is no evidence of improvement


def test_without_gold_a_blind_task_is_exported_and_returned_labels_give_the_win_rate(work_env, models):
    from rlhf_core.evaluation.human_eval import read_key
    from rlhf_core.stages import evaluate

    params = _project(work_env, models, labeling={"backend": "human"})
    first = evaluate.run(params)
    assert "eval/gold_win_rate_vs_reference" not in first and "eval/candidate/gold" not in first
    gate = "eval/gate/win_rate_vs_reference"
    assert first[f"{gate}/passed"] is False and "not measured" in first[f"{gate}/reason"]
    folder = work_env / params.paths.evaluation / "human_eval"
    task = folder / "task"
    shown = (task / "completions.jsonl").read_text()
    assert '"policy_version":"blind"' in shown and "candidate" not in shown and "reference" not in shown

    # Annotators prefer the candidate on every prompt; `rlhf label export` would write this bundle.
    key = read_key(folder)
    by_prompt = {}
    for line in shown.splitlines():
        completion = json.loads(line)
        by_prompt.setdefault(completion["prompt_id"], {})[key[completion["id"]]] = completion["id"]
    rankings = [
        Ranking(id=f"r{i}", prompt_id=p, completion_ids=[ids["candidate"], ids["reference"]], annotator_id="ann")
        for i, (p, ids) in enumerate(by_prompt.items())
    ]
    export = work_env / params.paths.label_export
    shutil.copytree(task, export)
    write_jsonl(export / "rankings.jsonl", rankings)

    second = evaluate.run(params)
    assert second["eval/human_win_rate_vs_reference"] == 1.0
    assert second["eval/human_win_rate_vs_reference_n"] == len(PROMPTS)
    assert second[f"{gate}/value"] == pytest.approx(second["eval/human_win_rate_vs_reference_low"])
    assert second[f"{gate}/passed"] is True


def test_evaluate_names_the_handed_over_reward_model_and_never_reads_the_champion_alias(work_env, models):
    from rlhf_core.errors import DataError
    from rlhf_core.stages import evaluate

    _register_policy(work_env, models / "base", ["champion"])  # an alias the params do not pin
    params = _project(work_env, models, policy="base", evaluate={"human_eval": "never"})
    saved = evaluate.run(params)
    assert saved["eval/champion_version"] is None  # evaluate.champion: none, whatever the alias says
    assert saved["eval/reward_model_version"] == "3"
    assert saved["eval/reward_model_hash"] == tracking.hash_paths([models / "reward"])

    # a policy trained against another reward model is refused, naming both
    stage_metrics(work_env).write("ppo", {"ppo/reward_model_hash": "0123456789abcdef"})
    with pytest.raises(DataError, match="trained against reward model content 0123456789abcdef"):
        evaluate.run(params)
