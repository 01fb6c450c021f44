"""A model card (Mitchell et al. 2019) in markdown for every promoted policy version: data, config, metrics, gates."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone

import yaml

from rlhf_core.evaluation.summary import EvaluationSummary

#: headline metrics of the card, in order (metric name -> label)
HEADLINES = {
    "eval/gold_win_rate_vs_reference": "gold win rate vs reference",
    "eval/gold_win_rate_vs_champion": "gold win rate vs previous champion",
    "eval/human_win_rate_vs_reference": "human win rate vs reference",
    "eval/human_win_rate_vs_champion": "human win rate vs previous champion",
    "eval/proxy_win_rate_vs_reference": "proxy win rate vs reference",
    "eval/kl": "KL(candidate || reference) [nats]",
    "eval/candidate/proxy": "mean proxy reward (reference = 0)",
    "eval/candidate/gold": "mean gold reward",
    "eval/reference/gold": "mean gold reward of the reference",
    "eval/length_ratio": "length ratio to reference",
    "eval/candidate/distinct_2": "distinct-2",
    "eval/candidate/repetition_rate": "repetition rate",
    "eval/perplexity": "perplexity under the reference",
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def _metric_rows(metrics: Mapping) -> list[str]:
    rows = []
    for key, label in HEADLINES.items():
        if key not in metrics:
            continue
        value = _fmt(metrics[key])
        if f"{key}_low" in metrics:
            value += f" (95% CI {_fmt(metrics[f'{key}_low'])}–{_fmt(metrics[f'{key}_high'])}, n={metrics.get(f'{key}_n')})"
        rows.append(f"| {label} | {value} |")
    return rows


def render_model_card(
    model: str, version: str, summary: EvaluationSummary, lineage: Mapping[str, str], config: Mapping[str, Mapping]
) -> str:
    """Markdown card of ``model`` version ``version``; ``config`` maps params sections to their values."""
    metrics = summary.metrics
    lines = [
        f"# {model} version {version}",
        "",
        f"Promoted to `champion` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} after passing every evaluation gate"
        + (f"; it replaces version {summary.champion_version}." if summary.champion_version else "."),
        "",
        "A causal language model fine-tuned with PPO against a learned reward model, with a KL penalty to the",
        "reference (base) model.",
        "",
        "## Lineage",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | `{value}` |" for key, value in sorted(lineage.items()) if value],
        "",
        "## Evaluation",
        "",
        f"On {_fmt(metrics.get('eval/num_prompts'))} held-out prompts, one sampled response per policy and prompt.",
        "",
        "| metric | value |",
        "|---|---|",
        *_metric_rows(metrics),
        "",
        "### Best-of-n frontier from the reference",
        "",
        f"Expected rewards of keeping the proxy's favourite of n reference samples, over {summary.frontier[0].prompts} prompts.",
        "",
        "| n | KL [nats] | proxy | gold |",
        "|---|---|---|---|",
        *[f"| {p.n} | {p.kl:.3f} | {p.proxy:.3f} | {_fmt(p.gold)} |" for p in summary.frontier],
        "",
        "## Gates",
        "",
        "| gate | value | rule | passed |",
        "|---|---|---|---|",
        *[f"| {g.name} | {_fmt(g.value)} | {g.rule} {_fmt(g.threshold)} | {'yes' if g.passed else 'no'} |" for g in summary.gates],
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump({k: dict(v) for k, v in config.items()}, sort_keys=False).rstrip(),
        "```",
        "",
        "## Limitations",
        "",
        "- Win rates come from a small held-out prompt set; read them with their intervals.",
        "- With the simulated labelling backend, \"gold\" is a fixed rubric (rlhf_core/gold.py), not human judgement.",
        "- The reward model is a proxy: a high proxy reward alone is no evidence of quality.",
        "",
    ]
    return "\n".join(lines)
