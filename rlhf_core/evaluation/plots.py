"""The evaluation's figures as PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.evaluation.best_of_n import FrontierPoint

COLOURS = {"candidate": "tab:red", "reference": "tab:gray", "champion": "tab:blue"}


@dataclass(frozen=True)
class PolicyPoint:
    """A policy's position in the reward-vs-KL plane (the reference sits at KL 0)."""

    name: str
    kl: float | None
    proxy: float
    gold: float | None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    import io

    from rlhf_core.records import atomic_write_bytes

    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format=out.suffix.lstrip(".") or "png")
    _pyplot().close(fig)
    atomic_write_bytes(out, image.getvalue())
    return out


def plot_reward_vs_kl(
    frontier: Sequence[FrontierPoint], points: Sequence[PolicyPoint], ppo_rows: Sequence[Mapping], out: Path
) -> Path:
    """Proxy (and gold) reward against KL: the best-of-n frontier, the PPO trajectory and the policies.

    As in Gao et al. (2022, Fig. 1) the x axis is sqrt(KL), on which best-of-n
    and RL gold curves are near-parabolic.
    """
    plt = _pyplot()
    kinds = ["proxy"] + (["gold"] if frontier and frontier[0].gold is not None else [])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        xs = [p.kl**0.5 for p in frontier]
        ys = [getattr(p, kind) for p in frontier]
        ax.plot(xs, ys, "o-", color="tab:green", label=f"best-of-n from the reference ({frontier[0].prompts} prompts)")
        for point, x, y in zip(frontier, xs, ys):
            ax.annotate(f"n={point.n}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        column = "gold" if kind == "gold" else "score"
        trajectory = [(r["kl"], r[column]) for r in ppo_rows if r.get(column) is not None and r.get("kl") is not None]
        if trajectory:
            ax.plot([max(k, 0.0) ** 0.5 for k, _ in trajectory], [v for _, v in trajectory], ".-", color="tab:orange",
                    alpha=0.6, label="PPO run (per update)" if kind == "proxy" else "PPO run (gold slice)")
        for point in reversed(points):  # the candidate (first) is drawn last, on top
            value = getattr(point, kind)
            if point.kl is not None and value is not None:
                ax.plot([max(point.kl, 0.0) ** 0.5], [value], "*", markersize=14, color=COLOURS.get(point.name, "black"),
                        label=point.name)
        ax.set_xlabel("sqrt(KL to reference) [sqrt(nats)]")
        ax.set_ylabel(f"{kind} reward" + (" (normalised)" if kind == "proxy" else ""))
        ax.set_title(f"{kind} reward vs KL")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_ppo_curves(rows: Sequence[Mapping], out: Path) -> Path:
    """KL (and beta), proxy score (and score - beta KL) and gold along the PPO run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [
        ("KL to reference [nats]", [("kl", "KL"), ("beta", "beta")]),
        ("reward", [("score", "proxy score"), ("rlhf_reward", "score - beta KL")]),
        ("gold slice", [("gold", "gold"), ("gold_proxy", "proxy on gold slice")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        drawn = False
        for column, label in series:
            pairs = [(r["update"], r[column]) for r in rows if r.get(column) is not None and r.get("update") is not None]
            if pairs:
                ax.plot([u for u, _ in pairs], [v for _, v in pairs], ".-", label=label)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title)
        ax.set_xlabel("PPO update")
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_lengths(lengths: Mapping[str, Sequence[int]], max_new_tokens: int, out: Path) -> Path:
    """Histogram of response lengths (tokens) per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    bins = range(0, max_new_tokens + 2)
    for name, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.45, label=f"{name} (mean {sum(values) / len(values):.1f})",
                color=COLOURS.get(name))
    ax.set_xlabel("response length [tokens]")
    ax.set_ylabel("responses")
    ax.set_title("response lengths on eval prompts")
    ax.legend(fontsize=8)
    return _save(fig, out)


def write_plot_data(
    folder: Path, frontier: Sequence[FrontierPoint], points: Sequence[PolicyPoint], lengths: Mapping[str, Sequence[int]]
) -> list[Path]:
    """The numbers behind the figures as CSV: best_of_n.csv, policies.csv, lengths.csv."""
    import csv
    import io

    from rlhf_core.records import atomic_write_text

    tables = {
        "best_of_n.csv": [{"n": p.n, "kl": p.kl, "proxy": p.proxy, "gold": p.gold, "prompts": p.prompts} for p in frontier],
        "policies.csv": [{"policy": p.name, "kl": p.kl, "proxy": p.proxy, "gold": p.gold} for p in points],
        "lengths.csv": [{"policy": name, "tokens": n} for name, values in lengths.items() for n in values],
    }
    written = []
    for name, rows in tables.items():
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(folder / name, text.getvalue())
        written.append(folder / name)
    return written
