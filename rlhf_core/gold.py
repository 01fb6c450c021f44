"""The gold preference: a deterministic "house style" rubric that simulated annotators follow.

Gao, Schulman & Hilton (2022) study reward over-optimisation by letting a *gold*
reward stand in for humans: synthetic annotators label comparisons from it, a
proxy reward model learns those labels, and the policy optimised against the
proxy is scored by the gold.  :func:`gold_score` is that gold for this project.
It is cheap (pure Python, no model) so it can score every evaluation sample.

The house style, for a short assistant answer (components in :func:`gold_components`):

``relevance`` (weight 0.3, in [0, 1])
    The answer uses the prompt's content words (stop words dropped, crude
    suffix stemming): share of up to :data:`RELEVANCE_WORDS` of them that
    appear, scaled down when the answer mostly copies the prompt verbatim.
``length`` (weight 0.3, in [0, 1])
    1 inside the window of :data:`LENGTH_WINDOW` words; outside it falls off
    smoothly - quadratically towards zero words, as a Gaussian beyond the top.
``ending`` (weight 0.4, in [0, 1])
    1 when the answer ends in a complete sentence (``.``, ``!`` or ``?``,
    possibly followed by closing quotes or brackets; a trailing ``...`` trails
    off and does not count) or with a short list item.
    An answer cut off mid-sentence earns at most 0.5, in proportion to the share
    of its text that lies in complete sentences - so of two cut-off answers,
    the one that stopped nearer a sentence boundary is better.
``repetition`` (penalty weight 0.4, in [0, 1])
    Repeated word 3-grams beyond a small allowance, or repeated lines.
``tone`` (penalty weight 0.35, in [0, 1])
    Insults, refusals and "As an AI" disclaimers: 0.5 per occurrence, at most 1.
``markup`` (penalty weight 0.25, 0 or 1)
    Leftover chat markup: special tokens, role headers, ``Human:``/``Assistant:`` turns.

``gold = 0.3·relevance + 0.3·length + 0.4·ending − 0.4·repetition − 0.35·tone − 0.25·markup``,
in [−1, 1].  No single trick maxes it: a bare ``"Yes."`` earns only the ending
(0.4), a long on-topic answer that is cut off earns at most 0.8, and echoing the
prompt loses the relevance it would gain.  The signals a policy can move
quickly - length, a complete ending, no repetition - carry most of the weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

WEIGHTS = {"relevance": 0.3, "length": 0.3, "ending": 0.4}
PENALTIES = {"repetition": 0.4, "tone": 0.35, "markup": 0.25}

#: Preferred answer length in words (inclusive).
LENGTH_WINDOW = (15, 60)
#: Words above the window at which the length score has fallen to exp(-1).
LENGTH_SOFTNESS = 30.0
#: Prompt content words an answer must reuse for full relevance (long prompts need not be echoed whole).
RELEVANCE_WORDS = 3
#: Share of an answer's word 4-grams that may come from the prompt before relevance is scaled down.
ECHO_ALLOWANCE = 0.3
#: Share of repeated word 3-grams tolerated before repetition is penalised; the penalty is full at 50%.
REPEAT_ALLOWANCE = 0.05
#: A list item without final punctuation counts as complete up to this many words.
SHORT_ITEM_WORDS = 6

STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each even ever few for from further get give got
    had has have having he her here hers herself him himself his how i if in into is it its itself just like
    make me might more most much must my myself need never no nor not now of off on once only or other our ours
    ourselves out over own please same she should so some such tell than that the their theirs them themselves
    then there these they this those through to too under until up use very want was way we well were what
    when where which while who whom why will with without would you your yours yourself yourselves""".split()
)

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")
TERMINAL = re.compile(r"(?<!\.\.)[.!?][\"'”’)\]*_]*$")
SENTENCE_END = re.compile(r"[.!?][\"'”’)\]*_]*(?=\s|$)")

RUDE = re.compile(
    r"\b(?:stupid|idiot\w*|dumb|moron\w*|shut up|pathetic|loser|worthless|dumbest|ridiculous question"
    r"|figure it out yourself|google it)\b",
    re.IGNORECASE,
)
REFUSAL = re.compile(
    r"\b(?:i(?:'m| am) (?:sorry,? but|unable to|not able to)|i can(?:'t|not) (?:help|assist|answer|provide)"
    r"|i won't (?:help|answer))",
    re.IGNORECASE,
)
DISCLAIMER = re.compile(r"\bas an? (?:ai|artificial intelligence|language model|large language model)\b", re.IGNORECASE)
MARKUP = re.compile(
    r"<\|[^|>]*\|>|^\s*(?:user|assistant|system)\s*$|^\s*(?:human|assistant|user|system)\s*:|^#{2,}\s*(?:instruction|response)",
    re.IGNORECASE | re.MULTILINE,
)


def words(text: str) -> list[str]:
    """Lower-case word tokens (letters, digits, inner apostrophes)."""
    return WORD.findall(text.lower())


def stem(word: str) -> str:
    """A crude suffix stripper: enough to match 'camping' with 'camp' and 'potatoes' with 'potato'."""
    for suffix in ("ing", "ed", "es", "ly", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    """Stemmed words that carry the topic: no stop words, no contractions ("i've"), at least 3 letters."""
    return {stem(w) for w in words(text) if len(w) >= 3 and "'" not in w and w not in STOP_WORDS}


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def relevance(prompt: str, response: str) -> float:
    """Share of (up to RELEVANCE_WORDS) prompt content words reused, scaled down for verbatim echoing."""
    wanted = content_words(prompt)
    if not wanted:
        return 1.0 if words(response) else 0.0
    coverage = min(1.0, len(wanted & content_words(response)) / min(len(wanted), RELEVANCE_WORDS))
    answer_grams = ngrams(words(response), 4)
    if not answer_grams:
        return coverage
    prompt_grams = set(ngrams(words(prompt), 4))
    echo = sum(g in prompt_grams for g in answer_grams) / len(answer_grams)
    return coverage * (1.0 - max(0.0, echo - ECHO_ALLOWANCE) / (1.0 - ECHO_ALLOWANCE))


def length_score(num_words: int) -> float:
    low, high = LENGTH_WINDOW
    if num_words < low:
        return (num_words / low) ** 2
    if num_words > high:
        return math.exp(-(((num_words - high) / LENGTH_SOFTNESS) ** 2))
    return 1.0


def ending_score(response: str) -> float:
    """1 for a complete ending; else up to 0.5 by the share of text in complete sentences."""
    text = response.rstrip()
    if not text:
        return 0.0
    if TERMINAL.search(text):
        return 1.0
    last_line = text.splitlines()[-1]
    if LIST_ITEM.match(last_line) and len(words(last_line)) <= SHORT_ITEM_WORDS and last_line.rstrip()[-1].isalnum():
        return 1.0
    boundaries = [m.end() for m in SENTENCE_END.finditer(text)]
    return 0.5 * (boundaries[-1] / len(text)) if boundaries else 0.0


def repetition_penalty(response: str) -> float:
    """Repeated word 3-grams (beyond REPEAT_ALLOWANCE, full at 50%) or repeated lines, whichever is worse."""
    grams = ngrams(words(response), 3)
    repeated = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    gram_penalty = min(1.0, max(0.0, repeated - REPEAT_ALLOWANCE) / (0.5 - REPEAT_ALLOWANCE))
    lines = [" ".join(words(line)) for line in response.splitlines()]
    lines = [line for line in lines if line]
    line_penalty = 1.0 - len(set(lines)) / len(lines) if lines else 0.0
    return max(gram_penalty, min(1.0, 2.0 * line_penalty))


def tone_penalty(response: str) -> float:
    hits = sum(len(pattern.findall(response)) for pattern in (RUDE, REFUSAL, DISCLAIMER))
    return min(1.0, 0.5 * hits)


def markup_penalty(response: str) -> float:
    return 1.0 if MARKUP.search(response) else 0.0


def gold_components(prompt: str, response: str) -> dict[str, float]:
    """Every component of the rubric (rewards and penalties, each in [0, 1]) plus ``words`` and ``gold``."""
    parts = {
        "relevance": relevance(prompt, response),
        "length": length_score(len(words(response))),
        "ending": ending_score(response),
        "repetition": repetition_penalty(response),
        "tone": tone_penalty(response),
        "markup": markup_penalty(response),
    }
    gold = sum(w * parts[k] for k, w in WEIGHTS.items()) - sum(w * parts[k] for k, w in PENALTIES.items())
    return {**parts, "words": float(len(words(response))), "gold": gold}


def gold_score(prompt: str, response: str) -> float:
    """The house-style score of ``response`` to ``prompt``, in [-1, 1]; deterministic and model-free."""
    return gold_components(prompt, response)["gold"]


def gold_accuracy(pairs: Iterable) -> float | None:
    """Share of preference pairs (``prompt``, ``chosen``, ``rejected`` attributes) whose chosen side the gold prefers.

    A gold tie counts half, as a coin flip would.  On simulated labels this is
    the ceiling a reward model can reach on them: the labels' own noise.
    """
    credit, count = 0.0, 0
    for pair in pairs:
        chosen, rejected = gold_score(pair.prompt, pair.chosen), gold_score(pair.prompt, pair.rejected)
        credit += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
        count += 1
    return credit / count if count else None
