"""Rows of a preference source: JSONL(.gz), a JSON array, CSV, Parquet or a Hugging Face ``datasets`` folder.

Each row comes with its line (files) or row number (Parquet, ``datasets``);
a line that is not valid JSON comes as an object with ``text`` and ``message``
so that it can be reported, never skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.errors import DataError
from rlhf_core.prompts import iter_rows
from rlhf_core.records import iter_raw_rows


@dataclass(frozen=True)
class UnreadableRow:
    text: str
    message: str


def iter_source_rows(path: Path) -> Iterator[tuple[int, object]]:
    if path.is_dir():
        yield from _dataset_rows(path)
    elif _is_json_array(path):
        yield from _json_array_rows(path)
    elif path.name.lower().endswith(".csv"):
        for line, row in iter_raw_rows(path):
            yield line, {key: _list_from_json(value) for key, value in row.items()}
    else:
        yield from iter_raw_rows(path)


def _dataset_rows(path: Path) -> Iterator[tuple[int, object]]:
    if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: neither a preference bundle (rankings.jsonl) nor a Hugging Face datasets folder")
    yield from iter_rows(path, "hf")


def _is_json_array(path: Path) -> bool:
    """A ``.json`` file holding one array (Label Studio's JSON export), as opposed to JSON lines."""
    if path.suffix.lower() != ".json":
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith("[")


def _json_array_rows(path: Path) -> Iterator[tuple[int, object]]:
    """The elements of a JSON array, each with the line it starts on.

    Decoding element by element keeps every good element before a broken one; a
    broken element ends the file, because JSON cannot be resynchronised after it.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = _skip_space(text, text.index("[") + 1)
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            element, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield line, UnreadableRow(text[pos : pos + 200], f"{exc.msg}; the rest of the file cannot be read")
            return
        yield line, element
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            line += text.count("\n", counted, pos)
            yield line, UnreadableRow(text[pos : pos + 200], "expected ',' or ']'; the rest of the file cannot be read")
            return


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _list_from_json(value: object) -> object:
    """CSV cells cannot hold lists, so conversations and score lists travel in them as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list):
            return decoded
    return value
