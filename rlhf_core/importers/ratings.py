"""Per-response ratings (UltraFeedback style) turned into rankings.

A row holds a prompt (``prompt`` or ``instruction``) and several responses, each
with a score: either ``completions: [{"response": …, "overall_score": …}, …]``
or parallel lists ``responses`` + ``scores`` (or ``ratings``).  The ranking
orders responses by score, best first; equal scores are ties, and the scores
are kept as ``ratings`` so that rating-gap margins can use them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from rlhf_core.importers.assemble import RankedItem, RecordError, annotator_of, first_text

PROMPT_KEYS = ("prompt", "instruction")
LIST_KEYS = ("completions", "responses")
SCORE_LIST_KEYS = ("scores", "ratings")
RESPONSE_KEYS = ("response", "text", "completion", "output")
SCORE_KEYS = ("overall_score", "score", "rating")


def parse_ratings(row: dict) -> Iterator[RankedItem]:
    prompt_field, prompt = first_text(row, PROMPT_KEYS)
    list_key, scored = _scored_responses(row)
    if len(scored) < 2:
        raise RecordError(list_key, f"fewer than 2 completions ({len(scored)})")
    # Stable sort: equal scores keep the source's order and share a rank.
    scored.sort(key=lambda entry: -entry[2])
    ranks, rank = [], 0
    for index, (_, _, score) in enumerate(scored):
        if index == 0 or score != scored[index - 1][2]:
            rank += 1
        ranks.append(rank)
    yield RankedItem(
        prompt,
        tuple(text for _, text, _ in scored),
        tuple(field for field, _, _ in scored),
        prompt_field=prompt_field,
        ranks=tuple(ranks),
        ratings=tuple(score for _, _, score in scored),
        annotator=annotator_of(row),
    )


def _scored_responses(row: dict) -> tuple[str, list[tuple[str, str, float]]]:
    """The column holding the responses, and (field, text, score) per response in source order."""
    list_key = next((key for key in LIST_KEYS if row.get(key) is not None), None)
    if list_key is None:
        raise RecordError(LIST_KEYS[0], f"missing (also looked for {', '.join(LIST_KEYS[1:])})")
    responses = row[list_key]
    if not isinstance(responses, list):
        raise RecordError(list_key, f"expected a list of responses, got {type(responses).__name__}")
    if not responses:
        return list_key, []
    if all(isinstance(item, dict) for item in responses):
        return list_key, [_scored_item(item, f"{list_key}[{index}]") for index, item in enumerate(responses)]
    return list_key, _parallel_lists(row, list_key, responses)


def _scored_item(item: dict, where: str) -> tuple[str, str, float]:
    key, text = first_text(item, RESPONSE_KEYS, where + ".")
    score_key = next((k for k in SCORE_KEYS if item.get(k) is not None), None)
    if score_key is None:
        raise RecordError(f"{where}.{SCORE_KEYS[0]}", f"missing (also looked for {', '.join(SCORE_KEYS[1:])})")
    return f"{where}.{key}", text, _score(item[score_key], f"{where}.{score_key}")


def _parallel_lists(row: dict, list_key: str, responses: list) -> list[tuple[str, str, float]]:
    score_key = next((key for key in SCORE_LIST_KEYS if row.get(key) is not None), None)
    if score_key is None:
        raise RecordError(SCORE_LIST_KEYS[0], f"missing (also looked for {', '.join(SCORE_LIST_KEYS[1:])})")
    scores = row[score_key]
    if not isinstance(scores, list):
        raise RecordError(score_key, f"expected a list of numbers, got {type(scores).__name__}")
    if len(scores) != len(responses):
        raise RecordError(score_key, f"has {len(scores)} entries for {len(responses)} responses")
    out = []
    for index, (text, score) in enumerate(zip(responses, scores)):
        if not isinstance(text, str):
            raise RecordError(f"{list_key}[{index}]", f"expected text, got {type(text).__name__}")
        out.append((f"{list_key}[{index}]", text, _score(score, f"{score_key}[{index}]")))
    return out


def _score(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(field, f"expected a number, got {value!r}")
    return float(value)
