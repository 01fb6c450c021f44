"""Reading and writing record files without losing anything.

Every invalid record becomes a :class:`Reject` that names the file, the line
(or row) and the field at fault; every valid record is kept.  Rejects are
written next to the outputs of a stage so that nothing disappears silently.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

from rlhf_core.errors import DataError
from rlhf_core.rowfiles import UnreadableRow, iter_raw_rows, printable

T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class Reject:
    file: str
    line: int
    reason: str
    field: str | None = None
    raw: str | None = None
    kind: str = "invalid"

    def describe(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


@dataclass
class ReadResult(Generic[T]):
    records: list[T] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def preview(raw: object, limit: int = 500) -> str:
    """The start of a bad record as text for its reject, with what UTF-8 cannot hold escaped."""
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=False)
    return printable(text if len(text) <= limit else text[:limit] + "…")


def validation_rejects(exc: ValidationError, file: str, line: int, raw: object) -> list[Reject]:
    """One reject per problem pydantic found in a record."""
    out = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or None
        reason = "missing" if error["type"] == "missing" else error["msg"]
        out.append(Reject(file, line, reason, loc, preview(raw)))
    return out


def boolean_rejects(record: BaseModel, raw: dict, file: str, line: int) -> list[Reject]:
    """One reject per JSON ``true``/``false`` that validation turned into a number (pydantic's lax mode reads
    ``true`` as the rank 1 or the rating 1.0), so a miswritten file is reported rather than silently converted."""
    out = []
    stack = [("", raw, record.model_dump())]
    while stack:
        where, given, kept = stack.pop()
        if isinstance(given, bool) and not isinstance(kept, bool):
            reason = f"expected a number, got {str(given).lower()}"
            out.append(Reject(file, line, reason, where or None, preview(raw)))
        elif isinstance(given, dict) and isinstance(kept, dict):
            stack.extend((f"{where}.{key}".lstrip("."), value, kept.get(key)) for key, value in given.items())
        elif isinstance(given, list) and isinstance(kept, list):
            stack.extend((f"{where}.{index}", value, other) for index, (value, other) in enumerate(zip(given, kept)))
    return sorted(out, key=lambda reject: reject.field or "")


def read_records(path: str | Path, model: type[T], *, unique_field: str | None = "id") -> ReadResult[T]:
    """Validate every row of a JSONL(.gz)/JSON/CSV/Parquet file against ``model``.

    Rows that cannot be decoded (see :mod:`rlhf_core.rowfiles`), with missing or
    ill-typed fields (a boolean for a number too, see :func:`boolean_rejects`), or
    with a repeated ``unique_field`` become rejects; the rest are returned in file order.
    """
    path = Path(path)
    result: ReadResult[T] = ReadResult()
    if not path.exists():
        raise DataError(f"{path}: file not found")
    seen: set = set()
    for number, raw in iter_raw_rows(path):
        if isinstance(raw, UnreadableRow):
            result.rejects.append(Reject(str(path), number, raw.reason, None, preview(raw.text)))
            continue
        if not isinstance(raw, dict):
            result.rejects.append(Reject(str(path), number, "expected a JSON object", None, preview(raw)))
            continue
        try:
            record = model.model_validate(raw)
        except ValidationError as exc:
            result.rejects.extend(validation_rejects(exc, str(path), number, raw))
            continue
        converted = boolean_rejects(record, raw, str(path), number)
        if converted:
            result.rejects.extend(converted)
            continue
        if unique_field is not None:
            key = getattr(record, unique_field)
            if key in seen:
                result.rejects.append(Reject(str(path), number, f"duplicate {unique_field} {key!r}", unique_field, preview(raw)))
                continue
            seen.add(key)
        result.records.append(record)
    return result


def read_jsonl(path: str | Path, model: type[T]) -> list[T]:
    """Read a file this pipeline wrote itself; any invalid record is an error, not a reject."""
    result = read_records(path, model, unique_field=None)
    if result.rejects:
        first = result.rejects[0]
        raise DataError(f"{first.describe()} ({len(result.rejects)} invalid records in a pipeline output)")
    return result.records


def _atomic_write(path: Path, lines: Iterable[str]) -> None:
    _atomic_replace(path, lambda handle: handle.writelines((line + "\n").encode("utf-8") for line in lines))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (a figure, say: a kill leaves the old file or the new one)."""
    _atomic_replace(Path(path), lambda handle: handle.write(data))


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> int:
    """Atomically write records (pydantic models or dicts) as JSONL; returns the count."""
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        for record in records:
            count += 1
            if isinstance(record, BaseModel):
                yield record.model_dump_json()
            else:
                yield json.dumps(record, ensure_ascii=False, default=str)

    _atomic_write(Path(path), lines())
    return count


def write_rejects(path: str | Path, rejects: Iterable[Reject]) -> int:
    # A reject quotes bad input, which may hold what UTF-8 cannot encode; the rejects file must still be written.
    rows = ({k: printable(v) if isinstance(v, str) else v for k, v in asdict(reject).items()} for reject in rejects)
    return write_jsonl(path, rows)


def write_json(path: str | Path, data: dict) -> None:
    _atomic_write(Path(path), [json.dumps(data, indent=2, sort_keys=True, default=str)])


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text``, as is, in one rename (a kill leaves the old file or the new one)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json_record(path: str | Path, model: type[T], what: str, missing: str) -> T:
    """One validated JSON document (a stage's record of what it handed over); ``missing`` says how to make it.

    A missing, unreadable or invalid file is one DataError naming the file and the first problem.
    """
    path = Path(path)
    try:
        return model.model_validate_json(path.read_bytes())
    except OSError:
        raise DataError(f"{path}: no {what} ({missing})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DataError(f"{path}: invalid {what} ({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
