"""Rows of a record file, read the one way every reader of this package reads them.

JSON lines (optionally gzip-compressed), a JSON array, CSV or Parquet: each row
comes with its line (text files) or row number (Parquet), either as the value
it holds or as an :class:`UnreadableRow` saying why it cannot be used, so that
a bad row is reported and never skipped or fatal.  A file that cannot be read
at all (not gzip, truncated, corrupt Parquet, binary or of an unknown
encoding) raises one :class:`~rlhf_core.errors.DataError` naming it.

Text is UTF-8 unless a byte-order mark says UTF-16 or UTF-32 (the mark is
dropped, so Excel's UTF-8 BOM does not rename the first CSV column, and so is
one starting a later JSON line, where ``cat a.jsonl b.jsonl`` puts b's); BOM-less
UTF-16/32 is recognised from its first bytes, as RFC 4627 section 3 does for
JSON.  JSON text is read as lines unless it is an array (a ``.json`` file, or
any file whose first line is a lone ``[``) or pretty-printed objects (a first
line that is a lone ``{``, as ``jq`` and ``json.dump(indent=...)`` write), whose
values are read one after another.  Invalid bytes reject their line with the byte named, instead of turning
silently into U+FFFD.  JSON values are held to limits that keep one hostile
record from crashing the reader or a later writer: nesting depth, integer
digits, non-finite numbers (``NaN``, ``Infinity``, ``1e999``), lone UTF-16
surrogates (``"\\ud800"``), which no UTF-8 file can hold, and keys repeated in
one object (JSON says nothing of which one counts; Python keeps the last).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.errors import DataError

#: Deeper than any record this pipeline reads (Label Studio tasks nest about 8 levels); far below the
#: depth at which Python's JSON decoder runs out of stack.
MAX_DEPTH = 100
#: Integers longer than this are ids or garbage, never counts or scores; Python refuses to parse
#: over 4300 digits and float() overflows past 308.
MAX_INT_DIGITS = 100
#: Share of NUL bytes in a file's first block above which it is binary data rather than text.
BINARY_NUL_SHARE = 0.1
#: Share of invalid UTF-8 bytes in a file's first block above which it is not UTF-8 at all.
FOREIGN_BYTE_SHARE = 0.3
HEAD_BYTES = 4096
GZIP_MAGIC = b"\x1f\x8b"

#: (byte-order mark, codec, name); UTF-32-LE's mark begins with UTF-16-LE's, so it is tried first.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


@dataclass(frozen=True)
class UnreadableRow:
    """A row that holds no usable value: a preview of its text and why, for a reject."""

    text: str
    reason: str


class UnusableValue(ValueError):
    """Valid JSON holding a value the pipeline cannot keep (see the module docstring); the message says which."""


def iter_raw_rows(path: Path, kind: str | None = None) -> Iterator[tuple[int, object]]:
    """(line or row number, decoded value or :class:`UnreadableRow`) of every row of ``path``.

    ``kind`` is ``jsonl``, ``csv`` or ``parquet``; None tells it from the suffix.
    Blank lines of JSON lines files are no rows.
    """
    kind = kind or kind_of(path)
    if kind == "parquet":
        yield from _parquet_rows(path)
        return
    text = TextFile(path)
    if kind == "csv":
        yield from _csv_rows(text)
        return
    head = text.head().lstrip()
    first_line = head.split("\n", 1)[0].strip()
    if head.startswith("[") and (path.suffix.lower() == ".json" or first_line == "["):
        yield from _json_array_rows(text)
    elif first_line == "{":  # no JSON line is a lone brace: pretty-printed objects
        yield from _json_value_rows(text)
    else:
        yield from _json_line_rows(text)


def kind_of(path: Path) -> str:
    """``jsonl``, ``csv`` or ``parquet``, from the file's name (``.csv.gz`` is CSV, ``.jsonl.gz`` JSON lines)."""
    name = path.name.lower()
    return "parquet" if name.endswith(".parquet") else "csv" if name.endswith((".csv", ".csv.gz")) else "jsonl"


class TextFile:
    """A text file, gzip-compressed or not, decoded with the encoding its first bytes show."""

    def __init__(self, path: Path):
        self.path = path
        self.codec, self.encoding = "utf-8", "UTF-8"
        self.compressed = self._guard(lambda: _starts_with(path, GZIP_MAGIC), 0)
        if path.name.lower().endswith(".gz") and not self.compressed:
            raise DataError(f"{path}: not gzip data (the name ends in .gz but the file has no gzip header)")
        with self._binary() as handle:
            head = self._guard(lambda: handle.read(HEAD_BYTES), 0)
        if self.compressed and head.startswith(GZIP_MAGIC):
            raise DataError(f"{path}: gzip data compressed twice (decompressed, it is gzip again); gunzip it once")
        self.codec, self.encoding = detect_encoding(path, head)

    def lines(self) -> Iterator[tuple[int, str]]:
        """(line number from 1, line with ``\\n`` as its end); ``\\r\\n`` and a lone ``\\r`` end lines too."""
        number = 0
        with self._binary() as binary:
            text = io.TextIOWrapper(binary, encoding=self.codec, errors="surrogateescape", newline=None)
            lines = iter(text)
            while True:
                line = self._guard(lambda: next(lines, None), number)
                if line is None:
                    return
                number += 1
                yield number, line

    def read(self) -> str:
        with self._binary() as binary:
            text = io.TextIOWrapper(binary, encoding=self.codec, errors="surrogateescape", newline=None)
            return self._guard(text.read, 0)

    def head(self) -> str:
        """The first characters of the text (enough to tell a JSON array from JSON lines)."""
        with self._binary() as binary:
            text = io.TextIOWrapper(binary, encoding=self.codec, errors="surrogateescape", newline=None)
            return self._guard(lambda: text.read(HEAD_BYTES), 0)

    def invalid_bytes(self, text: str) -> str | None:
        """Why ``text`` (as :meth:`lines` or :meth:`read` gave it) is not valid in the file's encoding, or None."""
        position = _lone_surrogate(text)
        if position is None:
            return None
        byte = ord(text[position]) - 0xDC00
        return f"not valid {self.encoding} (byte 0x{byte:02X} at character {position + 1})"

    def _binary(self):
        return gzip.open(self.path, "rb") if self.compressed else self.path.open("rb")

    def _guard(self, read, line: int):
        """Run one read of the file; what makes the file as a whole unreadable becomes one DataError."""
        where = f" after line {line}" if line else ""
        try:
            return read()
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise DataError(f"{self.path}: truncated or corrupt gzip data{where} ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path}: not valid {self.encoding}{where} ({exc.reason})") from None
        except OSError as exc:
            raise DataError(f"{self.path}: cannot be read{where} ({exc.strerror or exc})") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(magic)) == magic


def detect_encoding(path: Path, head: bytes) -> tuple[str, str]:
    """(codec, name) of a text whose first bytes are ``head``; DataError for binary data."""
    for bom, codec, name in BOMS:
        if head.startswith(bom):
            return codec, name
    # Text of these formats starts with an ASCII character, so the NUL bytes around it give the encoding away.
    nul = [byte == 0 for byte in head[:4]]
    if len(nul) == 4:
        for pattern, codec in (
            ([True, True, True, False], "utf-32-be"),
            ([False, True, True, True], "utf-32-le"),
            ([True, False, True, False], "utf-16-be"),
            ([False, True, False, True], "utf-16-le"),
        ):
            if nul == pattern:
                return codec, codec.upper()
    if head.count(0) > BINARY_NUL_SHARE * len(head):
        raise DataError(
            f"{path}: binary data, not text ({head.count(0)} of the first {len(head)} bytes are NUL); "
            "expected UTF-8, or UTF-16/UTF-32 with a byte-order mark"
        )
    decoded = head.decode("utf-8", "surrogateescape")
    foreign = sum(1 for char in decoded if "\udc80" <= char <= "\udcff")
    if foreign > FOREIGN_BYTE_SHARE * len(head):
        raise DataError(
            f"{path}: not UTF-8 text ({foreign} of the first {len(head)} bytes are not valid UTF-8); "
            "save it as UTF-8, or as UTF-16/UTF-32 with a byte-order mark"
        )
    return "utf-8", "UTF-8"


# --- JSON with limits ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Refused:
    """Stands in for a JSON token the decoder must not turn into a value; the walk after decoding reports it."""

    reason: str


def _bounded_int(digits: str) -> int | _Refused:
    count = len(digits.lstrip("-"))
    if count > MAX_INT_DIGITS:
        return _Refused(f"an integer of {count} digits (more than {MAX_INT_DIGITS})")
    return int(digits)


def _constant(name: str) -> _Refused:
    return _Refused(f"{name}, which is not a finite number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict | _Refused:
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    seen: set[str] = set()
    repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
    return _Refused(f"the key {repeated!r} twice in one object")


#: Tokens that would fail later (huge integers, NaN, a repeated key) come back as markers, so that a
#: JSON array's element still decodes to its end and the next element can be read.
DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_constant, object_pairs_hook=_unique_keys)


def decode_json(text: str) -> object:
    """The value of one JSON text; JSONDecodeError for bad syntax, :class:`UnusableValue` past the limits."""
    try:
        value = DECODER.decode(text)
    except RecursionError:
        raise UnusableValue(f"nested deeper than {MAX_DEPTH} levels") from None
    check_value(value)
    return value


def check_value(value: object) -> None:
    """Raise :class:`UnusableValue` if a decoded JSON value breaks a limit (see the module docstring)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise UnusableValue(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                stack.extend((inner, depth + 1) for inner in item.values())
            else:
                stack.extend((inner, depth + 1) for inner in item)
        elif isinstance(item, str):
            _check_text(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise UnusableValue(f"holds the number {item}, which is not finite")
        elif isinstance(item, _Refused):
            raise UnusableValue(f"holds {item.reason}")


def _check_text(text: str) -> None:
    position = _lone_surrogate(text)
    if position is not None:
        raise UnusableValue(
            f"holds a lone surrogate {text[position]!r} (half of a UTF-16 pair), which cannot be written as UTF-8"
        )


def _lone_surrogate(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate, or an invalid byte kept by
    ``surrogateescape``), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode written as escapes, safe to store in a reject."""
    return text if _lone_surrogate(text) is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- formats -------------------------------------------------------------------------------------------------


def _json_row(source: TextFile, text: str) -> object:
    reason = source.invalid_bytes(text)
    if reason is not None:
        return UnreadableRow(printable(text), reason)
    try:
        return decode_json(text)
    except json.JSONDecodeError as exc:
        return UnreadableRow(text, f"not valid JSON ({exc.msg}, character {exc.pos + 1})")
    except UnusableValue as exc:
        return UnreadableRow(text, str(exc))


def _json_line_rows(source: TextFile) -> Iterator[tuple[int, object]]:
    for number, line in source.lines():
        line = line.removeprefix("\ufeff")
        if line.strip():
            yield number, _json_row(source, line.rstrip("\n"))


def _json_array_rows(source: TextFile) -> Iterator[tuple[int, object]]:
    """The elements of a JSON array, each with the line it starts on.

    Decoding element by element keeps every good element before a broken one; a
    broken element ends the file, because JSON cannot be resynchronised after it.
    """
    text = source.read()
    yield from _json_sequence_rows(source, text, text.index("[") + 1, array=True)


def _json_value_rows(source: TextFile) -> Iterator[tuple[int, object]]:
    """JSON values one after another, separated by white space only (pretty-printed records), as the elements of
    an array are read."""
    yield from _json_sequence_rows(source, source.read(), 0, array=False)


def _json_sequence_rows(source: TextFile, text: str, start: int, *, array: bool) -> Iterator[tuple[int, object]]:
    pos = _skip_space(text, start)
    line, counted = 1, 0
    while pos < len(text) and not (array and text[pos] == "]"):
        line, counted = line + text.count("\n", counted, pos), pos
        rest = "; the rest of the file cannot be read"
        reason = None
        try:
            element, end = DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield line, UnreadableRow(printable(text[pos : pos + 200]), f"not valid JSON ({exc.msg}){rest}")
            return
        except RecursionError:
            end = _bracket_end(text, pos)
            if end is None:
                yield line, UnreadableRow(text[pos : pos + 200], f"nested deeper than {MAX_DEPTH} levels{rest}")
                return
            reason = f"nested deeper than {MAX_DEPTH} levels"
        reason = reason or source.invalid_bytes(text[pos:end])
        if reason is None:
            try:
                check_value(element)
            except UnusableValue as exc:
                reason = str(exc)
        yield line, element if reason is None else UnreadableRow(printable(text[pos : min(end, pos + 500)]), reason)
        pos = _skip_space(text, end)
        if not array:
            continue
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            line += text.count("\n", counted, pos)
            found = "the end of the file" if pos >= len(text) else repr(text[pos])
            yield line, UnreadableRow(printable(text[pos : pos + 200]), f"expected ',' or ']', found {found}{rest}")
            return
    if array and pos >= len(text):
        line += text.count("\n", counted, pos)
        yield line, UnreadableRow("", "not valid JSON: the array ends without its closing ']' (a truncated file?)")


_BRACKET_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _bracket_end(text: str, pos: int) -> int | None:
    """Where the array or object starting at ``pos`` ends, found without recursion (None if it never does),
    so that an element too deep to decode is one reject and the elements after it are still read."""
    depth = 0
    for match in _BRACKET_OR_STRING.finditer(text, pos):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
        elif token in ("]", "}"):
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _csv_rows(source: TextFile) -> Iterator[tuple[int, object]]:
    """Rows as {column: cell}; a row of the wrong width, bad quoting or invalid bytes is an UnreadableRow."""
    # strict: an unclosed quote is reported where it ends instead of silently swallowing the lines after it
    reader = csv.reader((line for _, line in source.lines()), strict=True)
    try:
        header = next(reader, None)
        while header == []:  # blank lines before the header are no columns
            header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"{source.path}:{reader.line_num}: the CSV header cannot be read ({exc})") from None
    if header is None:
        return
    bad = source.invalid_bytes(",".join(header))
    if bad:
        raise DataError(f"{source.path}:{reader.line_num}: the CSV header is {bad}")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{source.path}:{reader.line_num}: the CSV header repeats the column {repeated[0]!r}")
    while True:
        try:
            cells = next(reader, None)
        except csv.Error as exc:
            yield reader.line_num, UnreadableRow("", f"not valid CSV ({exc})")
            continue
        if cells is None:
            return
        if not cells:  # a blank line
            continue
        text = printable(",".join(cells))[:500]
        if len(cells) != len(header):
            yield reader.line_num, UnreadableRow(text, f"{len(cells)} cells for the header's {len(header)} columns")
            continue
        bad = next(
            (f"{name}: {reason}" for name, cell in zip(header, cells) if (reason := source.invalid_bytes(cell))),
            None,
        )
        yield reader.line_num, UnreadableRow(text, bad) if bad else dict(zip(header, cells))


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    yield from enumerate(rows, start=1)
