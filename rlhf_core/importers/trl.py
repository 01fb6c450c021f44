"""TRL's preference format and Anthropic HH-RLHF transcripts: one chosen and one rejected answer per row.

TRL rows hold ``chosen`` and ``rejected`` either as text or as lists of chat
messages, with the prompt explicit (a ``prompt`` column) or implicit (the
beginning both share).  HH-RLHF rows hold two whole transcripts that differ only
in the final ``\\n\\nAssistant:`` turn.  Either way a row is a ranking of K = 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from rlhf_core.importers.assemble import RankedItem, RecordError, annotator_of, require_text
from rlhf_core.importers.dialogue import (
    HH_ASSISTANT,
    HH_HUMAN,
    check_messages,
    common_prefix_length,
    hh_turns,
    last_assistant,
    render_prompt,
    shared_text_prompt,
)
from rlhf_core.rowfiles import UnusableValue, decode_json

PAIR_FIELDS = ("chosen", "rejected")


def _text_or_messages(row: dict, key: str) -> str | list:
    value = row.get(key)
    if value is None:
        raise RecordError(key, "missing")
    if isinstance(value, str):
        messages = _encoded_messages(value)
        return value if messages is None else check_messages(messages, key)
    return check_messages(value, key)


def _encoded_messages(text: str) -> list | None:
    """The chat messages a text holds as JSON (a list of {role, content} objects encoded once more, as a JSON
    lines or Parquet export of a string column does), else None: read as text, its JSON would become the answer
    and its opening turns the prompt."""
    if not text.lstrip().startswith("[{"):
        return None
    try:
        value = decode_json(text)
    except (json.JSONDecodeError, UnusableValue):
        return None
    is_message = lambda item: isinstance(item, dict) and {"role", "content"} <= item.keys()  # noqa: E731
    return value if isinstance(value, list) and value and all(map(is_message, value)) else None


def parse_trl(row: dict) -> Iterator[RankedItem]:
    chosen, rejected = _text_or_messages(row, "chosen"), _text_or_messages(row, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RecordError("rejected", "chosen and rejected must both be text or both be messages")
    if chosen == rejected:
        raise RecordError("rejected", "identical to chosen", "identical")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        check_messages(prompt, "prompt")
    elif prompt is not None and not isinstance(prompt, str):
        raise RecordError("prompt", f"expected text or messages, got {type(prompt).__name__}")
    # As TRL's maybe_extract_prompt: a prompt column of the other kind (text beside messages) is not the prompt.
    explicit = prompt is not None and isinstance(prompt, str) == isinstance(chosen, str)
    if isinstance(chosen, str):
        texts = (prompt, chosen, rejected) if explicit else _implicit_text(chosen, rejected)
    else:
        texts = _explicit_messages(prompt, chosen, rejected) if explicit else _implicit_messages(chosen, rejected)
    prompt_text, chosen_text, rejected_text = texts
    yield RankedItem(
        prompt_text,
        (chosen_text, rejected_text),
        PAIR_FIELDS,
        prompt_field="prompt" if explicit else "chosen",
        annotator=annotator_of(row),
    )


def _implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    cut = shared_text_prompt(chosen, rejected)
    if not chosen[:cut].strip():
        raise RecordError("chosen", "no prompt: chosen and rejected share no beginning and there is no prompt column")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _explicit_messages(prompt: list, chosen: list, rejected: list) -> tuple[str, str, str]:
    turns = check_messages(prompt, "prompt")
    return render_prompt(turns), last_assistant(chosen, "chosen"), last_assistant(rejected, "rejected")


def _implicit_messages(chosen: list, rejected: list) -> tuple[str, str, str]:
    shared = common_prefix_length(
        [(m["role"], m["content"]) for m in chosen], [(m["role"], m["content"]) for m in rejected]
    )
    if not shared:
        raise RecordError("chosen", "no prompt: chosen and rejected share no first turn and there is no prompt column")
    prompt = render_prompt(chosen[:shared])
    return prompt, last_assistant(chosen[shared:], "chosen"), last_assistant(rejected[shared:], "rejected")


def parse_hh(row: dict) -> Iterator[RankedItem]:
    """The shared transcript up to the last common ``\\n\\nAssistant:`` is the prompt; what follows are the answers."""
    chosen, rejected = require_text(row, "chosen"), require_text(row, "rejected")
    if chosen == rejected:
        raise RecordError("rejected", "identical to chosen", "identical")
    cut = chosen.rfind(HH_ASSISTANT, 0, common_prefix_length(chosen, rejected))
    if cut < 0:
        raise RecordError("chosen", "chosen and rejected share no '\\n\\nHuman: … \\n\\nAssistant:' beginning")
    answers = (chosen[cut + len(HH_ASSISTANT) :], rejected[cut + len(HH_ASSISTANT) :])
    for field, answer in zip(PAIR_FIELDS, answers):
        if HH_HUMAN in answer:
            raise RecordError(field, "the two dialogues differ before their final assistant turn")
    yield RankedItem(
        render_prompt(hh_turns(chosen[:cut], "chosen")),
        answers,
        PAIR_FIELDS,
        prompt_field="chosen",
        annotator=annotator_of(row),
    )
