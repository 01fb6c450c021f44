"""Dialogues as public preference data writes them: lists of chat messages or Human/Assistant transcripts.

A prompt of several turns becomes one text, ``Human: …\\n\\nAssistant: …\\n\\nHuman: …``
(the Anthropic HH-RLHF convention), so earlier turns stay visible to the policy and
the annotators; a prompt of a single user turn is just that turn's text.
"""

from __future__ import annotations

import re

from rlhf_core.importers.assemble import RecordError

ROLE_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")

Message = dict[str, str]


def check_messages(value: object, field: str) -> list[Message]:
    """A list of ``{"role", "content"}`` messages with text in both, or a reject naming the first bad one."""
    if not isinstance(value, list) or not value:
        raise RecordError(field, "expected text or a non-empty list of {role, content} messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise RecordError(f"{field}[{index}]", f"expected a message object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                reason = "missing" if message.get(key) is None else "expected text"
                raise RecordError(f"{field}[{index}].{key}", reason)
    return value


def render_prompt(messages: list[Message]) -> str:
    """One prompt text from chat turns (see the module docstring)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"].strip()
    labels = [ROLE_LABELS.get(m["role"], m["role"].capitalize()) for m in messages]
    return "\n\n".join(f"{label}: {m['content'].strip()}" for label, m in zip(labels, messages))


def last_assistant(messages: list[Message], field: str) -> str:
    for message in reversed(messages):
        if message["role"] == "assistant":
            return message["content"]
    raise RecordError(field, "no assistant message")


def common_prefix_length(a, b) -> int:
    """Length of the longest common prefix of two strings or two lists."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def shared_text_prompt(chosen: str, rejected: str) -> int:
    """Where the prompt ends in two texts that share it (TRL's implicit-prompt format).

    TRL's ``extract_prompt`` cuts at the first differing character, which can split
    a word ("…is bl|ue" / "…is bl|ack"); cutting at the last whitespace before that
    keeps whole words in the completions.
    """
    cut = common_prefix_length(chosen, rejected)
    if cut and not chosen[cut - 1].isspace():
        boundary = max(chosen.rfind(" ", 0, cut), chosen.rfind("\n", 0, cut))
        cut = boundary + 1 if boundary >= 0 else 0
    return cut


def hh_turns(text: str, field: str) -> list[Message]:
    """Chat messages from an HH-RLHF transcript (``\\n\\nHuman: …\\n\\nAssistant: …``)."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RecordError(field, "text before the first '\\n\\nHuman:' turn")
    turns = [
        {"role": "user" if label == "Human" else "assistant", "content": content.strip()}
        for label, content in zip(parts[1::2], parts[2::2])
    ]
    if not any(turn["role"] == "user" for turn in turns):
        raise RecordError(field, "no '\\n\\nHuman:' turn before the final '\\n\\nAssistant:'")
    return turns
