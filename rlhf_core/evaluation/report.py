"""One policy's responses to the eval prompts with their scores, and the metrics that describe and compare them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from rlhf_core.evaluation.metrics import WinRate, distinct_n, length_stats, prompt_win_rate, repetition_rate


@dataclass(frozen=True)
class Responses:
    """``samples_per_prompt`` responses per eval prompt, prompt by prompt (same prompts, same order and as many
    responses for every policy)."""

    name: str
    texts: list[str]
    token_ids: list[list[int]]
    finished: list[bool]
    proxy: list[float]
    gold: list[float] | None  # None when there is no gold function
    samples_per_prompt: int = 1

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    def per_prompt(self, values: list) -> list[list]:
        """``values`` (one per response, e.g. :attr:`gold`) cut into one list per prompt."""
        k = self.samples_per_prompt
        return [values[at : at + k] for at in range(0, len(values), k)]

    def prompt_means(self, values: list[float]) -> list[float]:
        return [statistics.fmean(group) for group in self.per_prompt(values)]

    def firsts(self, values: list) -> list:
        """The first response's value for every prompt."""
        return values[:: self.samples_per_prompt]


def compare(a: Responses, b: Responses, scores: str) -> WinRate:
    """Win rate of ``a`` over ``b`` by ``scores`` ("gold" or "proxy"), every response of a prompt against every
    response of the other policy to it (:func:`rlhf_core.evaluation.metrics.prompt_win_rate`)."""
    return prompt_win_rate(a.per_prompt(getattr(a, scores)), b.per_prompt(getattr(b, scores)))


def policy_metrics(responses: Responses, repetition_ngram: int) -> dict[str, float]:
    """``eval/<policy>/...``: mean proxy and gold, lengths, share finished, distinct-1/2, repetition."""
    prefix = f"eval/{responses.name}"
    metrics = {f"{prefix}/proxy": statistics.fmean(responses.proxy)}
    if responses.gold is not None:
        metrics[f"{prefix}/gold"] = statistics.fmean(responses.gold)
    metrics.update({f"{prefix}/length_{k}": v for k, v in length_stats(responses.lengths).items()})
    metrics[f"{prefix}/finished"] = sum(responses.finished) / len(responses.finished)
    metrics[f"{prefix}/distinct_1"] = distinct_n(responses.token_ids, 1)
    metrics[f"{prefix}/distinct_2"] = distinct_n(responses.token_ids, 2)
    metrics[f"{prefix}/repetition_rate"] = repetition_rate(responses.token_ids, repetition_ngram)
    return metrics


def win_rate_metrics(candidate: Responses, other: Responses) -> dict[str, float]:
    """``eval/{proxy,gold}_win_rate_vs_<other>`` with ``_low``/``_high`` (95% Wilson), ``_n`` (pairs) and, with
    several responses per prompt, ``_effective_n``."""
    metrics = compare(candidate, other, "proxy").as_metrics(f"eval/proxy_win_rate_vs_{other.name}")
    if candidate.gold is not None and other.gold is not None:
        metrics.update(compare(candidate, other, "gold").as_metrics(f"eval/gold_win_rate_vs_{other.name}"))
    return metrics


def length_ratio(candidate: Responses, reference: Responses) -> float:
    """Mean response length of the candidate over the reference's (tokens)."""
    return statistics.fmean(candidate.lengths) / max(statistics.fmean(reference.lengths), 1e-9)
