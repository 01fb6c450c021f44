"""The one-screen summary printed at the end of a pipeline run."""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_core import tracking
from rlhf_core.artifacts import headline
from rlhf_core.config import Params

#: where `make ui` serves the MLflow UI
MLFLOW_UI = "http://127.0.0.1:5000"

#: the figures worth a glance, per stage of dvc.yaml: a few of its headline figures (rlhf_core.artifacts.HEADLINES,
#: topics joined by "/") -> label; tests/test_stage_metrics.py checks that each is one
AT_A_GLANCE = {
    "base_model": {"source": "source", "params": "parameters"},
    "prompts": {"train": "train prompts", "eval": "eval prompts", "rejected": "rejected"},
    "sft": {"loss/sft": "held-out loss", "gold/win": "gold win rate vs base"},
    "generate_candidates": {"completions": "completions", "tok_s": "tokens/s"},
    "collect_preferences": {"pairs": "pairs", "agree/rate": "annotator agreement"},
    "train_reward": {"acc/heldout": "held-out accuracy", "acc/gold": "gold ceiling"},
    "ppo": {"final/kl": "KL", "final/score": "score", "updates": "updates"},
    "evaluate": {"gold/win": "gold win rate vs reference", "kl": "KL", "gates/passed": "gates passed"},
    "promote": {"promoted": "promoted", "version": "version"},
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def render_summary(root: Path, params: Params, results: dict[str, dict], gpu_stages=()) -> str:
    lines = ["", "=" * 72, f"RLHF pipeline finished at {time.strftime('%Y-%m-%d %H:%M:%S')}", "=" * 72]
    for stage, metrics in results.items():
        figures = tracking.flatten(headline(stage, metrics))
        shown = [f"{label} {_fmt(figures[n])}" for n, label in AT_A_GLANCE.get(stage, {}).items() if n in figures]
        lines.append(f"  {stage:<20} {', '.join(shown) if shown else 'done'}")
    promote = results.get("promote", {})
    if promote:
        verdict = "PROMOTED to champion" if promote.get("promote/promoted") else "NOT promoted (champion unchanged)"
        lines += ["", f"Policy: {verdict}"]
        reasons = promote.get("promote/reasons")
        if reasons:
            lines.append(f"  reasons: {reasons}")
    lines += [
        "",
        "Where to look:",
        "  metrics      dvc metrics show   |   dvc exp show",
        f"  plots        {root / params.paths.plots}",
        f"  MLflow UI    make ui  ->  {tracking.ui_url(MLFLOW_UI)}",
        "               (experiment 'rlhf', models rlhf-policy / rlhf-reward-model)",
        "  Prefect UI   make serve  ->  http://127.0.0.1:4200",
        "=" * 72,
    ]
    return "\n".join(lines)
