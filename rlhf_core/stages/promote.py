"""Stage ``promote``: act on the evaluate stage's verdict in the MLflow registry.

All gates passed: ``champion`` of rlhf-policy moves to the candidate version,
the old champion becomes ``previous``, and a model card is generated and logged.
Any gate failed: the champion stays, and the candidate is tagged ``rejected``
with the reasons.  Either way the version carries every gate result and its
lineage as tags, and ``metrics/promote.json`` records the decision.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rlhf_core import tracking
from rlhf_core.artifacts import Layout
from rlhf_core.config import Params
from rlhf_core.errors import RLHFError
from rlhf_core.evaluation.model_card import render_model_card
from rlhf_core.evaluation.summary import EvaluationSummary
from rlhf_core.promotion import Decision, decide

CARD_FILE = "MODEL_CARD.md"


def card_config(params: Params) -> dict[str, dict]:
    """The params sections that made the policy, for its model card."""
    return {name: getattr(params, name).model_dump(mode="json") for name in ("labeling", "reward", "ppo", "evaluate", "gates")}


def log_model_card(stage: tracking.StageRun, params: Params, summary: EvaluationSummary, decision: Decision, lineage) -> str:
    """Write the card, log it to this stage's run and point the version at it; returns its artifact URI."""
    text = render_model_card(tracking.POLICY_MODEL, decision.version, summary, lineage, card_config(params))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CARD_FILE
        path.write_text(text)
        stage.log_artifact(path, "model_card")
    uri = f"{stage.artifact_uri}/model_card/{CARD_FILE}"
    tracking.tag_version(tracking.POLICY_MODEL, decision.version, {"model_card": uri})
    return uri


def run(params: Params) -> dict:
    paths = params.paths
    summary_file = Layout(paths).evaluation.summary
    with tracking.stage_run(
        "promote", metrics_dir=paths.metrics, config_sections=[params.gates], inputs=[summary_file]
    ) as stage:
        summary = EvaluationSummary.read(summary_file)
        if summary.candidate_version is None:
            raise RLHFError(f"{summary_file}: the evaluated policy is not a registered version (run `rlhf ppo`)")
        lineage = {**summary.lineage, "flow_run_id": os.environ.get(tracking.FLOW_RUN_ENV, "")}
        decision = decide(summary.candidate_version, summary.gates, lineage)
        metrics = {
            "promote/promoted": decision.promoted,
            "promote/version": decision.version,
            "promote/champion": decision.champion,
            "promote/previous": decision.previous,
            "promote/failed_gates": sum(not g.passed for g in summary.gates),
            "promote/reasons": "; ".join(decision.reasons),
        }
        if decision.promoted:
            metrics["promote/model_card"] = log_model_card(stage, params, summary, decision, lineage)
        return stage.finish(metrics)
