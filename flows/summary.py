"""The one-screen summary printed at the end of a pipeline run."""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_core import tracking
from rlhf_core.config import Params

#: where `make ui` serves the MLflow UI
MLFLOW_UI = "http://127.0.0.1:5000"

#: the figures worth a glance, per stage of dvc.yaml (metric name -> label); tests/test_layout.py checks the stages
HEADLINES = {
    "base_model": {"base_model/source": "source", "base_model/parameters": "parameters"},
    "prompts": {"prompts/train": "train prompts", "prompts/eval": "eval prompts", "prompts/rejected": "rejected"},
    "sft": {"sft/heldout_loss": "held-out loss", "sft/eval/gold_win_rate_vs_base": "gold win rate vs base"},
    "generate_candidates": {"candidates/completions": "completions", "candidates/tokens_per_second": "tokens/s"},
    "collect_preferences": {"preferences/pairs": "pairs", "preferences/agreement": "annotator agreement"},
    "train_reward": {"reward/accuracy": "held-out accuracy", "reward/gold_accuracy": "gold ceiling"},
    "ppo": {"ppo/final_kl": "KL", "ppo/final_score": "score", "ppo/seconds_per_update_median": "s/update"},
    "evaluate": {"eval/gold_win_rate_vs_reference": "gold win rate vs base", "eval/kl": "KL", "eval/all_gates_passed": "gates passed"},
    "promote": {"promote/promoted": "promoted", "promote/version": "version"},
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def render_summary(root: Path, params: Params, results: dict[str, dict], gpu_stages=()) -> str:
    lines = ["", "=" * 72, f"RLHF pipeline finished at {time.strftime('%Y-%m-%d %H:%M:%S')}", "=" * 72]
    for stage, metrics in results.items():
        shown = [f"{label} {_fmt(metrics[key])}" for key, label in HEADLINES.get(stage, {}).items() if key in metrics]
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
