"""Rows of a preference source: JSONL(.gz), a JSON array, CSV, Parquet or a Hugging Face ``datasets`` folder.

Each row comes with its line (files) or row number (Parquet, ``datasets``); a
row that cannot be decoded comes as a :class:`~rlhf_core.rowfiles.UnreadableRow`
so that it can be reported, never skipped.  Files are read by
:mod:`rlhf_core.rowfiles`, the one reader of encodings, compression and limits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from rlhf_core.errors import DataError
from rlhf_core.prompts import iter_rows
from rlhf_core.rowfiles import UnreadableRow, UnusableValue, decode_json, iter_raw_rows


def iter_source_rows(path: Path) -> Iterator[tuple[int, object]]:
    if path.is_dir():
        yield from _dataset_rows(path)
        return
    for line, row in iter_raw_rows(path):
        yield line, _lists_from_json(row) if isinstance(row, dict) and _is_csv(path) else row


def _is_csv(path: Path) -> bool:
    return path.name.lower().endswith((".csv", ".csv.gz"))


def _dataset_rows(path: Path) -> Iterator[tuple[int, object]]:
    if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: neither a preference bundle (rankings.jsonl) nor a Hugging Face datasets folder")
    yield from iter_rows(path, "hf")


def _lists_from_json(row: dict) -> dict | UnreadableRow:
    """CSV cells cannot hold lists, so conversations and score lists travel in them as JSON text."""
    out = {}
    for key, value in row.items():
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                decoded = decode_json(value)
            except json.JSONDecodeError:  # text that happens to start with "["
                decoded = value
            except UnusableValue as exc:
                return UnreadableRow(json.dumps(row, ensure_ascii=False)[:500], f"{key}: {exc}")
            value = decoded if isinstance(decoded, list) else value
        out[key] = value
    return out
