"""Demonstrations for supervised fine-tuning: imported from TRL's SFT formats, cleaned, kept off eval prompts, exported.

Sources: JSONL, JSONL.gz, JSON arrays, CSV, Parquet or a saved Hugging Face
``datasets`` folder (read by :mod:`rlhf_core.rowfiles`, the one decoder of this
package).  Each row is one of TRL's SFT forms, told apart by its columns:

- prompt-completion: ``prompt`` and ``completion`` as text (the project's own
  ``{"prompt_id", "prompt", "completion"}`` rows are this form);
- conversational: ``messages``, a list of system/user/assistant turns ending in
  the assistant's: the turns before it are the prompt, its text the completion;
- conversational prompt-completion: ``prompt`` as a list of turns and
  ``completion`` as a list holding the one assistant turn.

A prompt of a single user turn is that turn's text; a longer conversation is
kept as ``prompt_messages`` and rendered as ``Human: …\\n\\nAssistant: …`` text
(:mod:`rlhf_core.importers.dialogue`), as the preference importers do.  CSV
cells hold turn lists as JSON text.

Every row ends up as exactly one :class:`~rlhf_core.schemas.Demonstration` or
one :class:`~rlhf_core.records.Reject` with its file, line, field, reason and a
``kind`` from :data:`REJECT_KINDS`; :meth:`DemonstrationSet.counts` gives the
stage its metrics.  Reading, cleaning and the eval guard are separate steps, so
the SFT stage can take each threshold from ``params.yaml``:
:func:`read_demonstrations` -> :func:`clean_demonstrations` -> :func:`exclude_eval_prompts`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from rlhf_core.errors import ConfigError, DataError
from rlhf_core.importers.assemble import RecordError, content_id
from rlhf_core.importers.dialogue import render_prompt
from rlhf_core.prompts import blank_reason, iter_rows, normalise, stable_id
from rlhf_core.records import Reject, preview, write_jsonl
from rlhf_core.rowfiles import UnreadableRow, UnusableValue, decode_json, iter_raw_rows
from rlhf_core.schemas import MAX_TEXT_CHARS, ChatTurn, Demonstration, Prompt

#: Why a row was not kept, in the order the steps look (a row is counted once, by the first that removes it).
REJECT_KINDS = (
    "unreadable",  # the row cannot be decoded (bad JSON or bytes, NaN or Infinity in JSON)
    "invalid",  # no recognised columns, malformed turns, conflicting prompt ids
    "non_text",  # a text field holding null, NaN, a number or an object
    "empty",  # an empty or whitespace-only prompt or answer
    "too_long",  # over the schema's limit, or over the length the caller allows
    "markup",  # chat-template tokens or role headers inside the text
    "restates_prompt",  # the answer mostly repeats the prompt
    "duplicate",  # same prompt and answer (after whitespace normalisation) as an earlier row, or a repeated id
    "near_duplicate",  # same prompt and a nearly identical answer
    "eval_prompt",  # the prompt is an eval-split prompt
)

ROLES = ("system", "user", "assistant")
#: The form :func:`export_demonstrations` writes: TRL's prompt-completion or conversational rows.
EXPORT_FORMS = ("prompt-completion", "messages")

#: Template tokens of common chat formats: ChatML and Llama 3 (<|im_start|>, <|eot_id|>), Llama 2 ([INST],
#: <<SYS>>, <s>), Gemma (<start_of_turn>).  In training text they teach the model to emit template syntax.
#: An HTML strikethrough (<s>) matches too: rare in an answer, and Llama 2's sequence start where it is not.
SPECIAL_TOKEN = re.compile(r"<\|[^\s|<>]{1,40}\|>|\[/?INST\]|<</?SYS>>|</?s>|<(?:start|end)_of_turn>")
#: Instruction-tuning headers (Alpaca's "### Instruction:" and kin) at the start of a line.
TEMPLATE_HEADER = re.compile(r"(?im)^[ \t]*#{2,}[ \t]*(?:instruction|response|input|human|assistant)\b")
#: HH-style role headers at the start of a line: an answer holding one has run into the next turn.  Only
#: answers are searched: a prompt of several turns is written in this very convention.
ROLE_HEADER = re.compile(r"(?m)^[ \t]*(?:Human|Assistant)[ \t]*:")
_WORD = re.compile(r"\w+")


@dataclass
class DemonstrationSet:
    """Kept demonstrations, every row not kept as a reject, and where each kept one came from."""

    demonstrations: list[Demonstration] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    origins: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Demonstration id -> (file, line) of its source row, so later steps reject it where it was read."""
    rows: int = 0
    """Rows read from the source: ``rows == kept + rejected`` after every step."""

    def counts(self) -> dict[str, int]:
        """``rows``, ``kept`` and one count per reject kind (zeros included, so metrics keep their keys)."""
        by_kind = dict.fromkeys(REJECT_KINDS, 0)
        for reject in self.rejects:
            by_kind[reject.kind] += 1
        return {"rows": self.rows, "kept": len(self.demonstrations), **by_kind}

    def _without(self, removed: dict[str, Reject]) -> DemonstrationSet:
        """This set less the demonstrations ``removed`` maps (by id) to their rejects."""
        kept = [demo for demo in self.demonstrations if demo.id not in removed]
        return replace(self, demonstrations=kept, rejects=[*self.rejects, *removed.values()])

    def _reject(self, demo: Demonstration, kind: str, reason: str, field_name: str = "completion") -> Reject:
        file, line = self.origins[demo.id]
        raw = demo.prompt if field_name == "prompt" else demo.completion
        return Reject(file, line, reason, field_name, preview(raw), kind)


# --- reading -----------------------------------------------------------------------------------------------------


def read_demonstrations(path: str | Path) -> DemonstrationSet:
    """Every row of a demonstrations source as a Demonstration or a reject (see the module docstring).

    Rejected here: undecodable rows (``unreadable``), rows of no SFT form or with
    malformed turns (``invalid``), text fields that are not text (``non_text``),
    empty prompts or answers (``empty``), texts over the schema's
    :data:`~rlhf_core.schemas.MAX_TEXT_CHARS` (``too_long``), repeated ids and
    exact repeats of a row (``duplicate``).  Raises :class:`DataError` only when the source itself
    cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: demonstrations source not found")
    out = DemonstrationSet()
    prompt_of_id: dict[str, tuple[str, int]] = {}
    for line, raw in _source_rows(path):
        out.rows += 1
        try:
            demo = _parse_row(raw, path)
            if demo.id in out.origins:
                earlier = out.origins[demo.id][1]
                if _optional_id(raw, "id"):
                    raise RecordError("id", f"duplicate id {demo.id!r} (line {earlier})", "duplicate")
                # a content id: the same prompt id, prompt and answer
                raise RecordError("completion", f"duplicate of line {earlier}", "duplicate")
            known, first = prompt_of_id.setdefault(demo.prompt_id, (normalise(demo.prompt), line))
            if known != normalise(demo.prompt):
                raise RecordError("prompt_id", f"prompt_id {demo.prompt_id!r} names another prompt on line {first}")
        except RecordError as error:
            text = raw.text if isinstance(raw, UnreadableRow) else raw
            out.rejects.append(Reject(str(path), line, error.reason, error.field, preview(text), error.kind))
            continue
        out.demonstrations.append(demo)
        out.origins[demo.id] = (str(path), line)
    return out


def _source_rows(path: Path) -> Iterator[tuple[int, object]]:
    if path.is_dir():
        yield from iter_rows(path, "hf")
        return
    csv = path.name.lower().endswith((".csv", ".csv.gz"))
    for line, row in iter_raw_rows(path):
        yield line, _turns_from_json(row) if csv and isinstance(row, dict) else row


def _turns_from_json(row: dict) -> dict | UnreadableRow:
    """CSV cells cannot hold lists, so turn lists travel in them as JSON text."""
    out = dict(row)
    for key in ("messages", "prompt", "completion", "prompt_messages"):
        value = row.get(key)
        if isinstance(value, str) and value.lstrip().startswith("[{"):
            try:
                decoded = decode_json(value)
            except json.JSONDecodeError:  # text that happens to start like a list
                continue
            except UnusableValue as exc:
                return UnreadableRow(json.dumps(row, ensure_ascii=False)[:500], f"{key}: {exc}")
            out[key] = decoded
    return out


def _parse_row(raw: object, path: Path) -> Demonstration:
    if isinstance(raw, UnreadableRow):
        raise RecordError(None, raw.reason, "unreadable")
    if not isinstance(raw, dict):
        raise RecordError(None, f"expected an object, got {type(raw).__name__}")
    if raw.get("messages") is not None:
        turns = _turns(raw["messages"], "messages")
        if turns[-1].role != "assistant":
            raise RecordError(f"messages[{len(turns) - 1}].role", "the last message is not the assistant's answer")
        prompt_turns, completion = turns[:-1], turns[-1].content
        _require_user_turn(prompt_turns, "messages")
    elif "prompt" in raw or "completion" in raw:
        prompt_turns, completion = _prompt_completion(raw)
    else:
        columns = ", ".join(sorted(map(str, raw))[:8])
        raise RecordError(None, f"expected prompt and completion, or messages (columns: {columns})")
    single = len(prompt_turns) == 1 and prompt_turns[0].role == "user"
    prompt = render_prompt([turn.model_dump() for turn in prompt_turns])
    if len(prompt) > MAX_TEXT_CHARS:
        raise RecordError("prompt", f"too long: {len(prompt)} characters > {MAX_TEXT_CHARS}", "too_long")
    prompt_id = _optional_id(raw, "prompt_id") or stable_id(prompt)
    try:
        return Demonstration(
            id=_optional_id(raw, "id") or content_id("d", prompt_id, prompt, completion),
            prompt_id=prompt_id,
            prompt=prompt,
            completion=completion,
            prompt_messages=None if single else prompt_turns,
            source=_optional_text(raw, "source") or f"import:{path.name}",
            annotator_id=_optional_text(raw, "annotator_id"),
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecordError(".".join(map(str, error["loc"])) or None, error["msg"]) from None


def _prompt_completion(raw: dict) -> tuple[list[ChatTurn], str]:
    prompt, completion = raw.get("prompt"), raw.get("completion")
    if "prompt" not in raw or "completion" not in raw:
        raise RecordError("completion" if "prompt" in raw else "prompt", "missing")
    # The project's own rows carry the conversation beside its rendering; the turns are the prompt then.
    if isinstance(prompt, str) and isinstance(raw.get("prompt_messages"), list):
        turns = _turns(raw["prompt_messages"], "prompt_messages")
        _require_user_turn(turns, "prompt_messages")
        return turns, _text(completion, "completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise RecordError("completion", "prompt and completion must both be text or both be lists of messages")
        turns = _turns(prompt, "prompt")
        _require_user_turn(turns, "prompt")
        answer = _turns(completion, "completion")
        if len(answer) != 1 or answer[0].role != "assistant":
            raise RecordError("completion", "expected one assistant message")
        return turns, answer[0].content
    return [ChatTurn(role="user", content=_text(prompt, "prompt"))], _text(completion, "completion")


def _turns(value: object, where: str) -> list[ChatTurn]:
    if not isinstance(value, list) or not value:
        raise RecordError(where, "expected a non-empty list of {role, content} messages")
    turns = []
    for index, message in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise RecordError(at, f"expected a message object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"{at}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        turns.append(ChatTurn(role=role, content=_text(message.get("content"), f"{at}.content")))
    return turns


def _require_user_turn(turns: list[ChatTurn], where: str) -> None:
    if not any(turn.role == "user" for turn in turns):
        raise RecordError(where, "no user message before the assistant's answer")


def _text(value: object, where: str) -> str:
    """Stripped text of a field; null, NaN (how pandas writes a missing cell) and non-text values are rejects."""
    if isinstance(value, float) and math.isnan(value):
        raise RecordError(where, "NaN, not text", "non_text")
    if value is None:
        raise RecordError(where, "null, not text", "non_text")
    if not isinstance(value, str):
        raise RecordError(where, f"expected text, got {type(value).__name__}", "non_text")
    blank = blank_reason(value)
    if blank:
        raise RecordError(where, blank, "empty")
    if len(value) > MAX_TEXT_CHARS:
        raise RecordError(where, f"too long: {len(value)} characters > {MAX_TEXT_CHARS}", "too_long")
    return value.strip()


def _optional_id(raw: dict, key: str) -> str | None:
    """The row's own id as text (an integer counts), None when it gives none; a reject for an id of another
    type, which would otherwise be replaced by a content id without a word."""
    value = raw.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is not None and not isinstance(value, str):
        raise RecordError(key, f"expected text or an integer, got {type(value).__name__}")
    return _optional_text(raw, key)


def _optional_text(raw: dict, key: str) -> str | None:
    value = raw.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


# --- cleaning ----------------------------------------------------------------------------------------------------


def clean_demonstrations(
    demos: DemonstrationSet,
    *,
    max_words: int | None = None,
    max_chars: int | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    restate_overlap: float = 0.8,
    restate_shingle_words: int = 3,
    near_duplicate_jaccard: float = 0.9,
    near_duplicate_shingle_words: int = 1,
) -> DemonstrationSet:
    """``demos`` less the demonstrations a user would not train on, each kept as a reject with its kind.

    Steps, in order (a demonstration is counted by the first that removes it):

    - ``markup``: chat-template tokens (``<|im_start|>``, ``[INST]``, ``<s>`` …) or
      ``### Instruction``-style headers in the prompt or the answer, or a
      ``Human:``/``Assistant:`` role header starting a line of the answer;
    - ``too_long``: an answer over ``max_words`` words, ``max_chars`` characters
      or ``max_tokens`` tokens as ``count_tokens`` counts them (each limit off
      when None, the default);
    - ``restates_prompt``: at least ``restate_overlap`` (default 0.8) of the
      answer's shingles of ``restate_shingle_words`` (default 3) words appear
      in the prompt, words compared as written (case kept, so fixing the
      capitals of a quoted text is no restatement); an answer shorter than one
      shingle (``Yes, it is.``) is not judged;
    - ``duplicate``: the same prompt and answer as an earlier demonstration once
      runs of whitespace are one space;
    - ``near_duplicate``: the same prompt and an answer whose shingles of
      ``near_duplicate_shingle_words`` (default 1: the set of its words) have a
      Jaccard similarity of at least ``near_duplicate_jaccard`` (default 0.9)
      with an earlier answer's; words compared lower-cased, without punctuation.
      With the defaults one word changed in a 20-word answer is a near duplicate,
      in a 10-word answer not.

    The first of a group of duplicates is the one kept.  Raises
    :class:`ConfigError` for a threshold out of range.
    """
    _check_limits(
        max_words=max_words,
        max_chars=max_chars,
        max_tokens=max_tokens,
        restate_shingle_words=restate_shingle_words,
        near_duplicate_shingle_words=near_duplicate_shingle_words,
    )
    _check_shares(restate_overlap=restate_overlap, near_duplicate_jaccard=near_duplicate_jaccard)
    if max_tokens is not None and count_tokens is None:
        raise ConfigError("demonstration cleaning: max_tokens needs a token counter (count_tokens)")
    removed: dict[str, Reject] = {}
    for demo in demos.demonstrations:
        reject = (
            _markup(demos, demo)
            or _too_long(demos, demo, max_words, max_chars, max_tokens, count_tokens)
            or _restatement(demos, demo, restate_overlap, restate_shingle_words)
        )
        if reject is not None:
            removed[demo.id] = reject
    rest = [demo for demo in demos.demonstrations if demo.id not in removed]
    removed.update(_duplicates(demos, rest, near_duplicate_jaccard, near_duplicate_shingle_words))
    return demos._without(removed)


def _check_limits(**limits: int | None) -> None:
    for name, limit in limits.items():
        if limit is not None and limit < 1:
            raise ConfigError(f"demonstration cleaning: {name} must be at least 1, got {limit}")


def _check_shares(**shares: float) -> None:
    for name, share in shares.items():
        if not 0 < share <= 1:
            raise ConfigError(f"demonstration cleaning: {name} must be in (0, 1], got {share}")


def find_markup(text: str, *, answer: bool) -> str | None:
    """The first chat markup in ``text`` (role headers only for an ``answer``), or None."""
    patterns = (SPECIAL_TOKEN, TEMPLATE_HEADER, ROLE_HEADER) if answer else (SPECIAL_TOKEN, TEMPLATE_HEADER)
    found = [match for pattern in patterns if (match := pattern.search(text))]
    return min(found, key=lambda match: match.start()).group().strip() if found else None


def _markup(demos: DemonstrationSet, demo: Demonstration) -> Reject | None:
    for field_name, text, answer in (("prompt", demo.prompt, False), ("completion", demo.completion, True)):
        marker = find_markup(text, answer=answer)
        if marker is not None:
            return demos._reject(demo, "markup", f"chat markup {marker!r} in the text", field_name)
    return None


def _too_long(
    demos: DemonstrationSet,
    demo: Demonstration,
    max_words: int | None,
    max_chars: int | None,
    max_tokens: int | None,
    count_tokens: Callable[[str], int] | None,
) -> Reject | None:
    text = demo.completion
    for unit, limit, measure in (
        ("words", max_words, lambda: len(text.split())),
        ("characters", max_chars, lambda: len(text)),
        ("tokens", max_tokens, lambda: count_tokens(text)),
    ):
        if limit is not None and (size := measure()) > limit:
            return demos._reject(demo, "too_long", f"too long: {size} {unit} > {limit}")
    return None


def _restatement(demos: DemonstrationSet, demo: Demonstration, share: float, n: int) -> Reject | None:
    if len(_words(demo.completion)) < n:
        return None
    answer = _shingles(demo.completion, n, fold_case=False)
    overlap = _containment(answer, _shingles(demo.prompt, n, fold_case=False))
    if overlap < share:
        return None
    return demos._reject(demo, "restates_prompt", f"{overlap:.0%} of the answer repeats the prompt")


def _duplicates(demos: DemonstrationSet, candidates: list[Demonstration], jaccard: float, n: int) -> dict[str, Reject]:
    removed: dict[str, Reject] = {}
    exact: dict[tuple[str, str], Demonstration] = {}
    kept_by_prompt: dict[str, list[tuple[Demonstration, frozenset]]] = {}
    for demo in candidates:
        prompt_key = " ".join(demo.prompt.split())
        key = (prompt_key, " ".join(demo.completion.split()))
        if key in exact:
            line = demos.origins[exact[key].id][1]
            removed[demo.id] = demos._reject(demo, "duplicate", f"duplicate of line {line}")
            continue
        exact[key] = demo
        shingles = _shingles(demo.completion, n)
        earlier = kept_by_prompt.setdefault(prompt_key, [])
        similar = next(((other, s) for other, s in earlier if _jaccard(shingles, s) >= jaccard), None)
        if similar is not None:
            other, other_shingles = similar
            line, similarity = demos.origins[other.id][1], _jaccard(shingles, other_shingles)
            reason = f"near-duplicate of line {line} (Jaccard {similarity:.2f})"
            removed[demo.id] = demos._reject(demo, "near_duplicate", reason)
            continue
        earlier.append((demo, shingles))
    return removed


def _words(text: str, fold_case: bool = True) -> list[str]:
    return _WORD.findall(text.lower() if fold_case else text)


def _shingles(text: str, n: int, fold_case: bool = True) -> frozenset[tuple[str, ...]]:
    """The ``n``-word shingles of ``text``; a text of fewer words is one shingle of them all."""
    words = _words(text, fold_case)
    return frozenset(tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1)))


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _containment(part: frozenset, whole: frozenset) -> float:
    return len(part & whole) / len(part) if part else 0.0


# --- the eval guard ----------------------------------------------------------------------------------------------


def exclude_eval_prompts(demos: DemonstrationSet, eval_prompts: Iterable[Prompt]) -> DemonstrationSet:
    """``demos`` less every demonstration whose prompt is an eval-split prompt (kind ``eval_prompt``).

    A prompt is an eval prompt when its id is one, or its text (or, in a
    conversation, any user turn's text) is one once lower-cased with runs of
    whitespace as one space: a file from elsewhere does not know this
    project's ids.
    """
    eval_prompts = list(eval_prompts)
    ids = {prompt.id for prompt in eval_prompts}
    texts = {normalise(prompt.text) for prompt in eval_prompts}
    removed = {}
    for demo in demos.demonstrations:
        turns = [turn.content for turn in demo.prompt_messages or () if turn.role == "user"]
        if demo.prompt_id in ids or any(normalise(text) in texts for text in (demo.prompt, *turns)):
            reason = f"prompt {demo.prompt_id!r} is an eval prompt"
            removed[demo.id] = demos._reject(demo, "eval_prompt", reason, "prompt")
    return demos._without(removed)


def import_demonstrations(path: str | Path, eval_prompts: Iterable[Prompt] = (), **cleaning) -> DemonstrationSet:
    """:func:`read_demonstrations`, :func:`clean_demonstrations` (``cleaning`` are its thresholds), then
    :func:`exclude_eval_prompts`."""
    return exclude_eval_prompts(clean_demonstrations(read_demonstrations(path), **cleaning), eval_prompts)


# --- export ------------------------------------------------------------------------------------------------------


def prompt_completion_row(demo: Demonstration) -> dict:
    """TRL's prompt-completion form; the id, the conversation and the provenance ride along (TRL ignores them)."""
    return demo.model_dump(mode="json")


def messages_row(demo: Demonstration) -> dict:
    """TRL's conversational form: the prompt's turns, then the answer as the assistant's."""
    turns = demo.prompt_messages or [ChatTurn(role="user", content=demo.prompt)]
    messages = [turn.model_dump() for turn in turns] + [{"role": "assistant", "content": demo.completion}]
    provenance = demo.model_dump(mode="json", include={"id", "prompt_id", "source", "annotator_id"})
    return {"messages": messages, **provenance}


def export_demonstrations(demos: Iterable[Demonstration], path: str | Path, form: str = "prompt-completion") -> int:
    """Write ``demos`` to a JSONL file in one of :data:`EXPORT_FORMS`, atomically; returns the count."""
    if form not in EXPORT_FORMS:
        raise ConfigError(f"unknown demonstration export form {form!r}; expected one of {', '.join(EXPORT_FORMS)}")
    if not str(path).endswith(".jsonl"):
        raise ConfigError(f"{path}: demonstrations are exported as JSON lines; give a path ending in .jsonl")
    to_row = prompt_completion_row if form == "prompt-completion" else messages_row
    return write_jsonl(path, (to_row(demo) for demo in demos))
