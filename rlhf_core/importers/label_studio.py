"""Label Studio task exports (JSON or JSONL) with ranking or pairwise annotations.

A task is ``{"data": {...}, "annotations": [{"result": [...], "completed_by": …}, …]}``
(older exports call ``annotations`` ``completions``).  The prompt is a text field of
``data`` (``prompt``, ``instruction``, ``question`` or ``query``).  Every ``ranker`` or
``pairwise`` result of every annotation becomes one ranking:

- ``ranker`` over a ``List`` of items (``data.items``: ``[{"id", "text"|"body"|…}]``):
  ``value.ranker`` maps the ranker's name to item ids best first, or, with ``Bucket``
  tags, each bucket's name to the ids in it; buckets are taken best first in the
  order the export lists them and the items of one bucket tie.  Items left
  unsorted (Label Studio's internal ``_`` column) are not ranked.
- ``pairwise`` over two ``Text`` objects: ``value.selected`` is ``left`` or ``right``
  (or the chosen side's value); the two texts are the ``data`` fields named by
  ``to_name``, else the only two text fields of ``data`` besides the prompt.

A cancelled annotation, or one without such a result, becomes a reject.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from rlhf_core.importers.assemble import DEFAULT_ANNOTATOR, RankedItem, RecordError, first_text

PROMPT_KEYS = ("prompt", "instruction", "question", "query")
ITEM_TEXT_KEYS = ("text", "body", "content", "response", "completion", "output")
UNSORTED_BUCKET = "_"


def parse_label_studio(row: dict) -> Iterator[RankedItem | RecordError]:
    data = row.get("data")
    if not isinstance(data, dict):
        raise RecordError("data", "missing" if data is None else "expected an object")
    key = "annotations" if "annotations" in row else "completions"
    annotations = row.get(key)
    if not isinstance(annotations, list):
        raise RecordError(key, "missing" if annotations is None else "expected a list")
    if not annotations:
        raise RecordError(key, "task has no annotations", "unlabelled")
    prompt_key, prompt = first_text(data, PROMPT_KEYS, "data.")
    for index, annotation in enumerate(annotations):
        where = f"{key}[{index}]"
        try:
            yield from _annotation_rankings(data, prompt_key, prompt, annotation, where)
        except RecordError as error:
            yield error


def _annotation_rankings(data: dict, prompt_key: str, prompt: str, annotation: object, where: str) -> Iterator:
    if not isinstance(annotation, dict):
        raise RecordError(where, "expected an object")
    if annotation.get("was_cancelled"):
        raise RecordError(where, "annotation was cancelled (skipped by the annotator)", "skipped")
    results = annotation.get("result")
    if not isinstance(results, list):
        raise RecordError(f"{where}.result", "missing" if results is None else "expected a list")
    found = [(i, r) for i, r in enumerate(results) if isinstance(r, dict) and r.get("type") in ("ranker", "pairwise")]
    if not found:
        raise RecordError(f"{where}.result", "no ranker or pairwise result")
    annotator, created_at = _annotator(annotation), _created_at(annotation)
    for index, result in found:
        field = f"{where}.result[{index}]"
        try:
            if result["type"] == "ranker":
                texts, fields, ranks = _ranker(data, result, field)
            else:
                texts, fields, ranks = _pairwise(data, prompt_key, result, field)
        except RecordError as error:
            yield error
            continue
        yield RankedItem(
            prompt, texts, fields, f"data.{prompt_key}", ranks=ranks, annotator=annotator, created_at=created_at
        )


def _ranker(data: dict, result: dict, where: str) -> tuple[tuple, tuple, tuple | None]:
    value = result.get("value")
    groups = value.get("ranker") if isinstance(value, dict) else None
    if not isinstance(groups, dict) or not all(isinstance(ids, list) for ids in groups.values()):
        raise RecordError(f"{where}.value.ranker", "expected an object of id lists")
    list_key, items = _list_items(data, result.get("to_name"))
    if list(groups) == [result.get("from_name")]:  # no buckets: one list, best first
        ordered = [[item_id] for item_id in groups[result.get("from_name")]]
    else:
        ordered = [ids for name, ids in groups.items() if name != UNSORTED_BUCKET and ids]
    texts, fields, ranks, seen = [], [], [], set()
    for rank, bucket in enumerate(ordered, start=1):
        for item_id in bucket:
            item_id = str(item_id)
            if item_id not in items:
                raise RecordError(f"{where}.value.ranker", f"names unknown item {item_id!r}")
            if item_id in seen:
                raise RecordError(f"{where}.value.ranker", f"repeats item {item_id!r}")
            seen.add(item_id)
            field, text = items[item_id]
            texts.append(text)
            fields.append(f"data.{list_key}{field}")
            ranks.append(rank)
    if len(texts) < 2:
        raise RecordError(f"{where}.value.ranker", f"fewer than 2 completions ranked ({len(texts)})")
    return tuple(texts), tuple(fields), tuple(ranks)


def _list_items(data: dict, to_name: object) -> tuple[str, dict[str, tuple[str, str]]]:
    """The list a ranker ranks (named like the List tag, else the task's only list of items): id -> (field, text)."""
    lists = {
        key: value
        for key, value in data.items()
        if isinstance(value, list) and value and all(isinstance(item, dict) and "id" in item for item in value)
    }
    if isinstance(to_name, str) and to_name in lists:
        key = to_name
    elif len(lists) == 1:
        key = next(iter(lists))
    elif "items" in lists:
        key = "items"
    else:
        raise RecordError("data", "cannot tell which list of items the ranker ranks (expected data.items)")
    items = {}
    for index, item in enumerate(lists[key]):
        text_key, text = first_text(item, ITEM_TEXT_KEYS, f"data.{key}[{index}].")
        items[str(item["id"])] = (f"[{index}].{text_key}", text)
    return key, items


def _pairwise(data: dict, prompt_key: str, result: dict, where: str) -> tuple[tuple, tuple, tuple | None]:
    names = [name.strip() for name in str(result.get("to_name", "")).split(",")]
    if not (len(names) == 2 and all(isinstance(data.get(name), str) for name in names)):
        names = [key for key, value in data.items() if isinstance(value, str) and key != prompt_key]
        if len(names) != 2:
            raise RecordError(f"{where}.to_name", "cannot tell which two data fields the pairwise result compares")
    value = result.get("value")
    selected = value.get("selected") if isinstance(value, dict) else None
    sides = {"left": 0, names[0]: 0, "right": 1, names[1]: 1}
    if not isinstance(selected, str) or selected not in sides:
        raise RecordError(f"{where}.value.selected", f"expected 'left' or 'right', got {selected!r}")
    winner, loser = (names[0], names[1]) if sides[selected] == 0 else (names[1], names[0])
    return (data[winner], data[loser]), (f"data.{winner}", f"data.{loser}"), None


def _annotator(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    if isinstance(who, (str, int)) and not isinstance(who, bool) and str(who).strip():
        return str(who)
    return DEFAULT_ANNOTATOR


def _created_at(annotation: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(str(annotation["created_at"]))
    except (KeyError, ValueError):
        return None
