"""Promotion, rejection and rollback in a real (temporary, SQLite) MLflow registry."""

import shutil

import pytest
from mlflow import MlflowClient

from rlhf_core import cli, tracking
from rlhf_core.artifacts import Layout
from rlhf_core.config import load_params
from rlhf_core.evaluation.best_of_n import frontier
from rlhf_core.evaluation.gates import Evidence, Judged, apply_gates
from rlhf_core.evaluation.metrics import WinRate, distinct_n, repetition_rate
from rlhf_core.evaluation.overoptimisation import OverOptimisation
from rlhf_core.evaluation.summary import EvaluationSummary
from rlhf_core.promotion import decide, rollback
from rlhf_core.errors import RLHFError

from .conftest import REPO, stage_metrics

MODEL = tracking.POLICY_MODEL
#: the thresholds the pipeline runs with
GATES = load_params(REPO / "params.yaml").gates
LINEAGE = {"preference_data_hash": "abc123", "reward_model_version": "4", "ppo_run_id": "run-1"}


def _gates(token_ids, win=WinRate(30, 0, 2)):
    """Gates on a candidate whose responses are ``token_ids`` (everything else healthy)."""
    evidence = Evidence(
        vs_reference=Judged(win, "gold"),
        vs_champion=Judged(win, "gold"),
        kl=3.0,
        length_ratio=1.1,
        distinct_2=distinct_n(token_ids, 2),
        repetition_rate=repetition_rate(token_ids, 4),
        overoptimisation=OverOptimisation(False, ()),
        reward_accuracy=0.72,
    )
    return apply_gates(evidence, GATES)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables created once (creating them takes seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def registry(work_env, empty_store):
    """The isolated project of ``work_env`` with a fresh copy of the empty store."""
    shutil.copy(empty_store, work_env / ".work" / "mlflow.db")
    return work_env


HEALTHY = [[i, i + 1, i + 7, i * 3 % 11, 40 + i] for i in range(32)]
REPEATS_ONE_TOKEN = [[279] * 32 for _ in range(32)]


def _register(tmp_path) -> str:
    with tracking.stage_run("ppo", metrics_dir=tmp_path / "metrics") as run:
        return tracking.register_version(MODEL, run, "policy", aliases=["candidate"])


def _alias(client, alias):
    try:
        return str(client.get_model_version_by_alias(MODEL, alias).version)
    except Exception:
        return None


def test_better_candidates_are_promoted_degenerate_rejected_and_rollback_restores(registry):
    client = MlflowClient()
    first = _register(registry)
    assert decide(first, _gates(HEALTHY), LINEAGE).promoted
    second = _register(registry)
    decision = decide(second, _gates(HEALTHY), LINEAGE)
    assert decision.promoted and (decision.champion, decision.previous) == (second, first)
    assert (_alias(client, "champion"), _alias(client, "previous")) == (second, first)
    tags = client.get_model_version(MODEL, second).tags
    assert tags["status"] == "champion" and tags["gates.all_passed"] == "true"
    assert tags["gate.distinct_2.passed"] == "true" and tags["gate.kl.threshold"] == f"<= {GATES.max_kl}"
    assert tags["lineage.preference_data_hash"] == "abc123" and tags["lineage.ppo_run_id"] == "run-1"

    degenerate = _register(registry)
    rejected = decide(degenerate, _gates(REPEATS_ONE_TOKEN), LINEAGE)
    assert not rejected.promoted and rejected.champion == second
    assert (_alias(client, "champion"), _alias(client, "previous")) == (second, first)
    tags = client.get_model_version(MODEL, degenerate).tags
    assert tags["rejected"] == "true" and tags["status"] == "rejected" and tags["gate.repetition_rate.passed"] == "false"
    assert "distinct_2" in tags["rejection_reasons"] and "repetition_rate" in tags["rejection_reasons"]

    assert cli.main(["rollback", "--reason", "users complained"]) == 0
    assert _alias(client, "champion") == first and _alias(client, "previous") is None
    demoted = client.get_model_version(MODEL, second).tags
    assert demoted["status"] == "rolled_back" and demoted["rollback_reason"] == "users complained"
    assert cli.main(["rollback"]) == 2  # nothing left to roll back to
    assert _alias(client, "champion") == first


def test_rollback_walks_back_through_the_promotion_history(registry):
    versions = []
    for _ in range(3):
        versions.append(_register(registry))
        decide(versions[-1], _gates(HEALTHY), LINEAGE)
    done = rollback("bad release")
    assert (done.demoted, done.champion, done.previous) == (versions[2], versions[1], versions[0])
    client = MlflowClient()
    assert (_alias(client, "champion"), _alias(client, "previous")) == (versions[1], versions[0])


def test_a_rejected_version_that_later_passes_loses_its_rejection_tags(registry):
    version = _register(registry)
    decide(version, _gates(HEALTHY, win=WinRate(1, 0, 31)), LINEAGE)
    assert MlflowClient().get_model_version(MODEL, version).tags["rejected"] == "true"
    decide(version, _gates(HEALTHY), LINEAGE)
    tags = MlflowClient().get_model_version(MODEL, version).tags
    assert "rejected" not in tags and tags["status"] == "champion"


def test_deciding_on_an_unknown_version_is_one_clear_error(registry):
    with pytest.raises(RLHFError, match="no version"):
        decide("42", _gates(HEALTHY), LINEAGE)


def _summary(version, gates, champion=None):
    return EvaluationSummary(
        candidate_version=version,
        champion_version=champion,
        gates=gates,
        lineage=LINEAGE,
        metrics={"eval/num_prompts": 32, "eval/kl": 3.0, "eval/gold_win_rate_vs_reference": 0.9,
                 "eval/gold_win_rate_vs_reference_low": 0.8, "eval/gold_win_rate_vs_reference_high": 0.97,
                 "eval/gold_win_rate_vs_reference_n": 32},
        frontier=frontier([[0.0, 1.0]], [[0.1, 0.3]], [1, 2]),
    )


def test_promote_stage_records_the_decision_and_logs_a_model_card(registry, monkeypatch):
    monkeypatch.setenv("RLHF_FLOW_RUN_ID", "flow-77")
    params = load_params(registry / "params.yaml")
    from rlhf_core.stages import promote

    version = _register(registry)
    _summary(version, _gates(HEALTHY)).write(Layout(params.paths).evaluation.summary)
    metrics = promote.run(params)
    saved = stage_metrics(registry).read("promote")
    assert saved["promote/promoted"] is True and saved["promote/version"] == version == metrics["promote/champion"]
    tags = MlflowClient().get_model_version(MODEL, version).tags
    assert tags["lineage.flow_run_id"] == "flow-77"
    card = tracking.local_path(tags["model_card"]).read_text()
    assert f"{MODEL} version {version}" in card and "| distinct_2 |" in card and "abc123" in card
    assert "0.9 (95% CI 0.8–0.97, n=32)" in card

    rejected = _register(registry)
    _summary(rejected, _gates(REPEATS_ONE_TOKEN), champion=version).write(Layout(params.paths).evaluation.summary)
    metrics = promote.run(params)
    assert metrics["promote/promoted"] is False and metrics["promote/champion"] == version
    assert "repetition_rate" in metrics["promote/reasons"] and "promote/model_card" not in metrics


def test_the_flow_pins_the_champion_alias_to_its_version_before_the_stages_run(registry):
    from rlhf_core.tracking import resolved_aliases

    assert resolved_aliases(from_champion=False) == {"evaluate.champion": "none"}
    assert resolved_aliases(from_champion=True) == {
        "evaluate.champion": "none", "candidates.policy": "base", "ppo.init_policy": "base"
    }
    version = _register(registry)
    tracking.set_alias(tracking.POLICY_MODEL, "champion", version)
    assert resolved_aliases(from_champion=True) == {
        "evaluate.champion": version, "candidates.policy": version, "ppo.init_policy": version
    }
