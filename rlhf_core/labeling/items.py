"""Labelling items, built from a preference bundle: a prompt with its K completions to rank or rate, or a
prompt (with an optional model draft) to write a demonstration for.

An item is identified by its task, its prompt id *and* its completion set, so
the same prompt with new candidates from a later policy round is a new item.
A gold item (rankings only) also carries a known ranking, against which
annotators are scored.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

from rlhf_core.preferences import BUNDLE_FILES, PreferenceBundle
from rlhf_core.prompts import blank_reason
from rlhf_core.records import Reject
from rlhf_core.schemas import Completion, Prompt, Ranking


@dataclass(frozen=True)
class Item:
    prompt: Prompt
    completions: tuple[Completion, ...]
    gold: Ranking | None = None
    task: str = "ranking"

    @property
    def key(self) -> str:
        ids = "\n".join(sorted(c.id for c in self.completions))
        key = f"{self.prompt.id}:{hashlib.sha256(ids.encode()).hexdigest()[:16]}"
        # Ranking keys keep their original form, so that stores made before other tasks existed stay consistent.
        return key if self.task == "ranking" else f"{self.task}:{key}"


@dataclass
class BuiltItems:
    items: list[Item]
    rejects: list[Reject]


def build_items(bundle: PreferenceBundle, max_text_chars: int, *, gold: bool = False, task: str = "ranking") -> BuiltItems:
    """Group a bundle's completions under their prompts; anything unusable becomes a reject.

    ``task`` is ``ranking`` or ``rating`` (both need at least 2 completions per
    prompt) or ``demonstration``: every prompt becomes an item, with its first
    completion, if any, as the draft the annotator may edit (further ones are
    rejected: one draft per demonstration).  Gold items are rankings only.

    Texts longer than ``max_text_chars`` are rejected rather than cut, so that
    an annotator never ranks text it did not see; empty completions, which
    there is nothing to judge in, are rejected too.  With ``gold=True`` only
    prompts that have a ranking become items, and the first ranking of each
    prompt is its known answer.  Rejects found here name the record by id
    (line 0: the valid records no longer know their line).
    """
    rejects = list(bundle.rejects)
    prompts = {}
    for prompt in bundle.prompts:
        if len(prompt.text) > max_text_chars:
            rejects.append(_too_long("prompts", prompt.id, max_text_chars))
        elif blank_reason(prompt.text):
            rejects.append(_reject("prompts", f"prompt {prompt.id!r}: {blank_reason(prompt.text)}", "text", "empty"))
        else:
            prompts[prompt.id] = prompt
    grouped: dict[str, list[Completion]] = defaultdict(list)
    for completion in bundle.completions:
        if len(completion.text) > max_text_chars:
            rejects.append(_too_long("completions", completion.id, max_text_chars))
        elif blank_reason(completion.text):
            reason = f"completion {completion.id!r}: {blank_reason(completion.text)}"
            rejects.append(_reject("completions", reason, "text", "empty"))
        elif completion.prompt_id not in prompts:
            reason = f"completion {completion.id!r}: unknown or rejected prompt {completion.prompt_id!r}"
            rejects.append(_reject("completions", reason, "prompt_id"))
        else:
            grouped[completion.prompt_id].append(completion)
    if task == "demonstration":
        return BuiltItems([_demonstration_item(prompt, grouped.get(pid, []), rejects) for pid, prompt in prompts.items()],
                          rejects)
    known = _gold_rankings(bundle.rankings, grouped, rejects) if gold else {}
    items = []
    for prompt_id, prompt in prompts.items():
        completions = grouped.get(prompt_id, [])
        if len(completions) < 2:
            reason = f"prompt {prompt_id!r} has {len(completions)} usable completions, needs at least 2"
            rejects.append(_reject("prompts", reason, "id", "too_few_completions"))
        elif gold and prompt_id not in known:
            rejects.append(_reject("prompts", f"gold prompt {prompt_id!r} has no usable ranking", "id"))
        else:
            items.append(Item(prompt, tuple(completions), known.get(prompt_id), task))
    return BuiltItems(items, rejects)


def _demonstration_item(prompt: Prompt, drafts: list[Completion], rejects: list[Reject]) -> Item:
    for extra in drafts[1:]:
        reason = f"completion {extra.id!r}: prompt {prompt.id!r} already has the draft {drafts[0].id!r}"
        rejects.append(_reject("completions", reason, "prompt_id", "duplicate"))
    return Item(prompt, tuple(drafts[:1]), task="demonstration")


def _gold_rankings(
    rankings: list[Ranking], grouped: dict[str, list[Completion]], rejects: list[Reject]
) -> dict[str, Ranking]:
    """prompt id -> its known ranking (the first valid one)."""
    known: dict[str, Ranking] = {}
    for ranking in rankings:
        ids = {c.id for c in grouped.get(ranking.prompt_id, [])}
        unknown = [cid for cid in ranking.completion_ids if cid not in ids]
        if unknown:
            reason = f"ranking {ranking.id!r} names unknown completions {unknown}"
            rejects.append(_reject("rankings", reason, "completion_ids"))
        elif ranking.prompt_id in known:
            reason = f"ranking {ranking.id!r}: a gold prompt keeps its first ranking only"
            rejects.append(_reject("rankings", reason, "prompt_id", "duplicate"))
        else:
            known[ranking.prompt_id] = ranking
    return known


def _reject(part: str, reason: str, field: str, kind: str = "invalid") -> Reject:
    return Reject(BUNDLE_FILES[part], 0, reason, field, kind=kind)


def _too_long(part: str, record_id: str, limit: int) -> Reject:
    return _reject(part, f"{record_id!r}: text longer than labeling.max_text_chars={limit}", "text", "too_long")
