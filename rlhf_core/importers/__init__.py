"""Public preference data in and out: importers into a :class:`PreferenceBundle`, exporters to TRL.

Formats (``fmt``):

- ``trl``: TRL's preference format, ``chosen``/``rejected`` as text or chat messages,
  with an explicit ``prompt`` or an implicit one (their shared beginning);
- ``hh``: Anthropic HH-RLHF ``chosen``/``rejected`` transcripts;
- ``ratings``: per-response scores (UltraFeedback style), ranked by score with ties;
- ``label_studio``: Label Studio task exports with ranker or pairwise results;
- ``rankings``: this project's own bundle folder (prompts, completions, rankings);
- ``auto``: chosen from the columns of the first record that fits one of the above.

Sources: JSONL, JSONL.gz, JSON arrays, CSV, Parquet, or a local Hugging Face
``datasets`` folder.  Every record that cannot be used becomes a reject with its
file, line, field and reason; ids are content hashes, so a re-import gives the
same ids and exact repeats are rejected as ``duplicate of line N``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

from tqdm import tqdm

from rlhf_core.errors import DataError
from rlhf_core.importers.assemble import BundleBuilder, Parser
from rlhf_core.importers.dialogue import HH_ASSISTANT
from rlhf_core.importers.export import export_hf, export_trl, preference_rows
from rlhf_core.importers.label_studio import parse_label_studio
from rlhf_core.importers.ratings import LIST_KEYS as RATING_LIST_KEYS
from rlhf_core.importers.ratings import parse_ratings
from rlhf_core.importers.sources import iter_source_rows
from rlhf_core.importers.trl import parse_hh, parse_trl
from rlhf_core.preferences import BUNDLE_FILES, PreferenceBundle, validate_bundle

__all__ = [
    "FORMATS",
    "detect_format",
    "export_hf",
    "export_trl",
    "import_preferences",
    "load_preferences",
    "preference_rows",
]

PARSERS: dict[str, Parser] = {
    "trl": parse_trl,
    "hh": parse_hh,
    "ratings": parse_ratings,
    "label_studio": parse_label_studio,
}
FORMATS = ("auto", *PARSERS, "rankings")


def load_preferences(path: str | Path, fmt: str = "auto", max_text_chars: int = 8000) -> PreferenceBundle:
    """Read a preference source into a bundle; unusable records are in ``bundle.rejects``.

    Raises :class:`DataError` only when the source itself is unusable (missing,
    unreadable as :mod:`rlhf_core.rowfiles` reads files, of an unknown kind, or
    of a format that cannot be told); a source whose every
    record was rejected gives a bundle without rankings, for the caller to judge.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: preference source not found")
    if fmt not in FORMATS:
        raise DataError(f"unknown preference format {fmt!r}; expected one of {', '.join(FORMATS)}")
    is_bundle = path.is_dir() and (path / BUNDLE_FILES["rankings"]).exists()
    if fmt == "rankings" or (fmt == "auto" and is_bundle):
        if not is_bundle:
            raise DataError(f"{path}: format 'rankings' reads a bundle folder holding {BUNDLE_FILES['rankings']}")
        return PreferenceBundle.read(path)
    rows: Iterable[tuple[int, object]] = iter_source_rows(path)
    if fmt == "auto":
        fmt, rows = _detect(path, rows)
    builder = BundleBuilder(path, max_text_chars)
    for line, raw in tqdm(rows, desc=f"import {path.name}", unit=" rows", disable=None):
        builder.consume(line, raw, PARSERS[fmt])
    return builder.bundle()


def import_preferences(path: str | Path, fmt: str = "auto", max_text_chars: int = 8000) -> PreferenceBundle:
    """A source read by :func:`load_preferences`, then checked as a whole by
    :func:`~rlhf_core.preferences.validate_bundle` (unknown or another prompt's
    completions, duplicates, text lengths): what ``rlhf preferences import`` and
    the ``collect_preferences`` stage both keep."""
    loaded = load_preferences(path, fmt, max_text_chars)
    return validate_bundle(loaded, max_text_chars=max_text_chars, source=str(path))


def detect_format(row: dict) -> str | None:
    """The format a record's columns belong to, or None when they fit none."""
    if isinstance(row.get("data"), dict) and ("annotations" in row or "completions" in row):
        return "label_studio"
    if "chosen" in row and "rejected" in row:
        chosen = row["chosen"]
        return "hh" if "prompt" not in row and isinstance(chosen, str) and HH_ASSISTANT in chosen else "trl"
    if any(isinstance(row.get(key), list) for key in RATING_LIST_KEYS):
        return "ratings"
    return None


def _detect(path: Path, rows: Iterator[tuple[int, object]]) -> tuple[str, Iterable[tuple[int, object]]]:
    """The format of the first record that fits one, and all rows (those looked at included)."""
    seen: list[tuple[int, object]] = []
    first_columns = None
    for line, raw in rows:
        seen.append((line, raw))
        if isinstance(raw, dict):
            first_columns = first_columns or sorted(map(str, raw))
            fmt = detect_format(raw)
            if fmt is not None:
                return fmt, chain(seen, rows)
    if first_columns is None:  # no record could be read at all: each row becomes a reject whatever the format
        return "trl", seen
    raise DataError(
        f"{path}: cannot tell the preference format from the columns {first_columns}; "
        f"give the format explicitly ({', '.join(f for f in FORMATS if f != 'auto')})"
    )
