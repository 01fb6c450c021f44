"""How good a reward model is on held-out comparisons.

All measures take ``diff = r(chosen) - r(rejected)`` per pair, on *raw* rewards:
the Bradley-Terry model the head was trained under says that
``sigmoid(diff)`` is the probability that the chosen side wins.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from rlhf_core.reward.data import PromptComparisons

#: (prompt, response, finished): what the reward model reads
Conversation = tuple[str, str, bool]
#: raw reward of each conversation
Scores = dict[Conversation, float]


def pairwise_accuracy(diff: torch.Tensor) -> float:
    """Share of pairs the model orders as labelled; a tie counts half, as a coin flip would."""
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def expected_calibration_error(diff: torch.Tensor, bins: int = 10) -> float:
    """ECE of the predicted win probability ``sigmoid(diff)`` (Guo et al. 2017).

    Each pair is predicted with confidence ``max(p, 1 - p)`` in [0.5, 1] and is
    right when ``diff > 0``; confidences fall into ``bins`` equal-width bins and
    ECE = sum over bins of (share of pairs) * |accuracy - mean confidence|.
    """
    p = torch.sigmoid(diff.double())
    confidence = torch.maximum(p, 1 - p)
    correct = ((diff > 0).double() + 0.5 * (diff == 0).double())
    index = ((confidence - 0.5) * 2 * bins).long().clamp(max=bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            error += float(in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs())
    return error


def group_by(diff: torch.Tensor, keys: list) -> dict:
    """Pairwise accuracy per key (keys that are None are left out)."""
    rows = defaultdict(list)
    for value, key in zip(diff.tolist(), keys):
        if key is not None:
            rows[key].append(value)
    return {key: pairwise_accuracy(torch.tensor(values)) for key, values in sorted(rows.items())}


def conversations(groups: list[PromptComparisons]) -> list[Conversation]:
    """Every distinct completion of ``groups`` as the reward model reads it."""
    return [(g.prompt, response, done) for g in groups for response, done in zip(g.responses, g.finished)]


def score_conversations(reward_model, items: list[Conversation], batch_size: int, desc: str | None = None) -> Scores:
    """Raw reward of each distinct conversation in ``items``, each scored once."""
    unique = list(dict.fromkeys(items))
    if not unique:
        return {}
    prompts, responses, finished = (list(column) for column in zip(*unique))
    raw = reward_model.raw_scores(prompts, responses, finished, batch_size=batch_size, desc=desc)
    return dict(zip(unique, raw.tolist()))


def comparison_diffs(groups: list[PromptComparisons], scores: Scores) -> tuple[torch.Tensor, list[int | None]]:
    """r(chosen) - r(rejected) for every comparison of ``groups``, and each pair's rank distance."""
    diffs, distances = [], []
    for g in groups:
        for c in g.comparisons:
            chosen = scores[(g.prompt, g.responses[c.chosen], g.finished[c.chosen])]
            rejected = scores[(g.prompt, g.responses[c.rejected], g.finished[c.rejected])]
            diffs.append(chosen - rejected)
            distances.append(c.rank_distance)
    return torch.tensor(diffs, dtype=torch.float64), distances


def heldout_metrics(groups: list[PromptComparisons], scores: Scores) -> dict[str, float]:
    """``accuracy``, ``accuracy_rank_distance_<d>`` and ``calibration_ece`` over the comparisons of ``groups``."""
    diff, distances = comparison_diffs(groups, scores)
    metrics = {"accuracy": pairwise_accuracy(diff), "calibration_ece": expected_calibration_error(diff)}
    for distance, accuracy in group_by(diff, distances).items():
        metrics[f"accuracy_rank_distance_{distance}"] = accuracy
    return metrics


def wilson_interval(correct: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a share ``correct / total`` (Wilson 1927; sound near 0 and 1, unlike p ± 2se)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


#: bins of (chosen length - rejected length), in words of the final answers: the length shortcut shows up here
LENGTH_DIFF_BINS = ((-math.inf, -20), (-20, -5), (-5, 5), (5, 20), (20, math.inf))


def calibration_table(diff: torch.Tensor, bins: int = 5) -> list[dict[str, float]]:
    """Per confidence bin of ``max(p, 1 - p)``, ``p = sigmoid(diff)``: pairs, mean confidence, accuracy."""
    p = torch.sigmoid(diff.double())
    confidence = torch.maximum(p, 1 - p)
    correct = (diff > 0).double() + 0.5 * (diff == 0).double()
    index = ((confidence - 0.5) * 2 * bins).long().clamp(max=bins - 1)
    rows = []
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            rows.append(
                {
                    "confidence_low": 0.5 + b / (2 * bins),
                    "pairs": int(in_bin.sum()),
                    "confidence": float(confidence[in_bin].mean()),
                    "accuracy": float(correct[in_bin].mean()),
                }
            )
    return rows


def preference_report(groups: list[PromptComparisons], scores: Scores) -> dict:
    """What ``rlhf reward evaluate`` prints: accuracy with its 95% interval, by length difference, and calibration.

    Lengths are words of the final answers (chosen minus rejected), so the
    report reads the same whatever tokenizer scored them.
    """
    diff, _ = comparison_diffs(groups, scores)
    words = [
        len(g.responses[c.chosen].split()) - len(g.responses[c.rejected].split()) for g in groups for c in g.comparisons
    ]
    accuracy = pairwise_accuracy(diff)
    low, high = wilson_interval(accuracy * len(diff), len(diff))
    by_length = {}
    for start, stop in LENGTH_DIFF_BINS:
        rows = torch.tensor([start <= w < stop for w in words])
        if rows.any():
            by_length[f"[{start:g}, {stop:g})"] = {"pairs": int(rows.sum()), "accuracy": pairwise_accuracy(diff[rows])}
    return {
        "pairs": len(diff),
        "accuracy": accuracy,
        "accuracy_low": low,
        "accuracy_high": high,
        "shorter_answer_wins": (sum(w < 0 for w in words) + 0.5 * sum(w == 0 for w in words)) / len(diff),
        "accuracy_by_length_difference": by_length,
        "calibration_ece": expected_calibration_error(diff),
        "calibration": calibration_table(diff),
    }
