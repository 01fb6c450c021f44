"""From raw per-update records to per-side figures, the ratios against TRL and a markdown table."""

from __future__ import annotations

import statistics

GIB = 1024**3

#: Required and hoped-for ratios for our default mode: speed-up over TRL and peak RSS as a share of TRL's.
REQUIRED_SPEEDUP, GOAL_SPEEDUP = 3.0, 5.0
REQUIRED_RSS_SHARE, GOAL_RSS_SHARE = 1 / 2, 1 / 3


def steady_updates(runs: list[dict]) -> list[dict]:
    """Every update of a side's runs but the first of each run (warm-up: first-touch allocation, lazy init)."""
    return [update for run in runs for update in run["updates"][1:]]


def side_summary(runs: list[dict], peaks: dict[str, float]) -> dict:
    """Median seconds per update and generated tokens/s over the steady updates of all runs; worst peak RSS;
    and, where the runs counted them, the training step's FLOP/s and its share of each matmul peak."""
    steady = steady_updates(runs)
    if not steady:
        return {"runs": len(runs), "steady_updates": 0}
    out = {
        "runs": len(runs),
        "steady_updates": len(steady),
        "median_seconds_per_update": statistics.median(u["seconds"] for u in steady),
        "seconds_per_update": [u["seconds"] for u in steady],
        "median_seconds_per_update_by_round": {
            str(run.get("round", i + 1)): statistics.median(u["seconds"] for u in run["updates"][1:]) for i, run in enumerate(runs)
        },
        "median_generated_tokens_per_second": statistics.median(u["generated_tokens"] / u["generation_seconds"] for u in steady),
        "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
    }
    if all("training_flops" in u for u in steady):
        flops_per_second = statistics.median(u["training_flops"] / u["training_seconds"] for u in steady)
        out["median_training_flops_per_second"] = flops_per_second
        out.update({f"training_share_of_{dtype}_peak": flops_per_second / peak for dtype, peak in peaks.items()})
    return out


def ratios(ours: dict, trl: dict) -> dict:
    """Speed-up (TRL's median seconds / ours) and peak-RSS share (ours / TRL's)."""
    return {
        "speedup": trl["median_seconds_per_update"] / ours["median_seconds_per_update"],
        "peak_rss_share": ours["peak_rss_bytes"] / trl["peak_rss_bytes"],
    }


def checks(default: dict | None, full: dict | None) -> dict:
    """The verdicts: default mode >= 3x faster and <= 1/2 the peak RSS (goal 5x, 1/3); full mode not slower."""
    out = {}
    if default:
        out["default_speedup_required_3x"] = default["speedup"] >= REQUIRED_SPEEDUP
        out["default_speedup_goal_5x"] = default["speedup"] >= GOAL_SPEEDUP
        out["default_rss_required_half"] = default["peak_rss_share"] <= REQUIRED_RSS_SHARE
        out["default_rss_goal_third"] = default["peak_rss_share"] <= GOAL_RSS_SHARE
    if full:
        out["full_not_slower"] = full["speedup"] >= 1.0
    return out


def markdown_table(sides: dict[str, dict], side_ratios: dict[str, dict]) -> str:
    """One row per side: median s/update, generated tokens/s, peak RSS, training GFLOP/s and share of peak, ratios."""
    lines = [
        "| side | median s/update | generated tokens/s | peak RSS (GiB) | training GFLOP/s (share of fp32 / bf16 peak) "
        "| speed-up vs TRL (same dtype) | peak RSS vs TRL |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, side in sides.items():
        if not side.get("steady_updates"):
            lines.append(f"| {name} | failed | | | | | |")
            continue
        flops = "-"
        if "median_training_flops_per_second" in side:
            shares = " / ".join(f"{side[k]:.0%}" for k in ("training_share_of_float32_peak", "training_share_of_bfloat16_peak") if k in side)
            flops = f"{side['median_training_flops_per_second'] / 1e9:.1f} ({shares})"
        ratio = side_ratios.get(name)
        speedup = f"{ratio['speedup']:.2f}x" if ratio else "1x"
        rss = f"{ratio['peak_rss_share']:.2f}" if ratio else "1"
        lines.append(
            f"| {name} | {side['median_seconds_per_update']:.2f} | {side['median_generated_tokens_per_second']:.1f} "
            f"| {side['peak_rss_bytes'] / GIB:.2f} | {flops} | {speedup} | {rss} |"
        )
    return "\n".join(lines)
