"""Prompt sets: import from JSONL/CSV/Parquet/HF-datasets folders, clean, split by seed."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from rlhf_core.errors import DataError
from rlhf_core.records import Reject, preview, validation_rejects
from rlhf_core.rowfiles import UnreadableRow, iter_raw_rows
from rlhf_core.schemas import Prompt

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".gz": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    try:
        return FORMAT_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise DataError(f"{path}: cannot tell the format from the suffix; set prompts.format") from None


def iter_rows(path: Path, fmt: str):
    """(row number, raw row) from any supported prompt source (see :func:`rlhf_core.rowfiles.iter_raw_rows`)."""
    chosen = detect_format(path) if fmt == "auto" else fmt
    if chosen == "hf":
        yield from _dataset_rows(path)
    else:  # by suffix, rowfiles also tells .csv.gz from .jsonl.gz
        yield from iter_raw_rows(path, None if fmt == "auto" else chosen)


def _dataset_rows(path: Path):
    """The rows of a ``datasets`` folder (its train split, else its first); DataError if it cannot be read."""
    import pyarrow as pa
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict
            dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset.keys()))]
        yield from enumerate(dataset, start=1)
    except (OSError, ValueError, KeyError, StopIteration, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Hugging Face datasets folder ({type(exc).__name__}: {exc})") from None


def stable_id(text: str) -> str:
    return "p" + hashlib.sha256(text.strip().encode()).hexdigest()[:12]


def visible(text: str) -> str:
    """``text`` without its format characters (Unicode category Cf: zero-width spaces and joiners, bidi marks,
    a stray byte-order mark), which show nothing, so that two texts that look alike compare alike."""
    if text.isascii():
        return text
    return "".join(char for char in text if unicodedata.category(char) != "Cf")


def blank_reason(text: str) -> str | None:
    """Why ``text`` shows nothing (empty, white space or format characters only), or None when it shows something."""
    if not text.strip():
        return "empty text"
    if not visible(text).strip():
        return "no visible text (only zero-width or other format characters)"
    return None


def normalise(text: str) -> str:
    """The key two texts share when a reader would call them the same (case, spacing, invisible characters)."""
    return " ".join(visible(text).lower().split())


@dataclass
class PromptSet:
    prompts: list[Prompt] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def import_prompts(path: str | Path, fmt: str, text_field: str, count_tokens, max_tokens: int) -> PromptSet:
    """Read a prompt source; empty, duplicate, over-long or malformed rows become rejects with their line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: prompt source not found")
    out = PromptSet()
    first_line: dict[str, int] = {}
    seen_ids: set[str] = set()
    for number, raw in iter_rows(path, fmt):
        if isinstance(raw, UnreadableRow):
            out.rejects.append(Reject(str(path), number, raw.reason, None, preview(raw.text)))
            continue
        if not isinstance(raw, dict):
            out.rejects.append(Reject(str(path), number, f"expected an object, got {type(raw).__name__}", None, preview(raw)))
            continue
        text = raw.get(text_field)
        if not isinstance(text, str):
            reason = "missing" if text is None else f"expected text, got {type(text).__name__}"
            out.rejects.append(Reject(str(path), number, reason, text_field, preview(raw)))
            continue
        blank = blank_reason(text)
        if blank:
            out.rejects.append(Reject(str(path), number, blank, text_field, preview(raw), "empty"))
            continue
        prompt_id = _given_id(raw.get("id"))
        if isinstance(prompt_id, Reject):
            out.rejects.append(replace(prompt_id, file=str(path), line=number, raw=preview(raw)))
            continue
        key = normalise(text)
        if key in first_line:
            out.rejects.append(Reject(str(path), number, f"duplicate of line {first_line[key]}", text_field, text[:500], "duplicate"))
            continue
        tokens = count_tokens(text)
        if tokens > max_tokens:
            out.rejects.append(Reject(str(path), number, f"too long: {tokens} tokens > {max_tokens}", text_field, text[:500], "too_long"))
            continue
        prompt_id = prompt_id or stable_id(text)
        if prompt_id in seen_ids:
            out.rejects.append(Reject(str(path), number, f"duplicate id {prompt_id!r}", "id", kind="duplicate"))
            continue
        try:
            prompt = Prompt(id=prompt_id, text=text.strip(), source=path.name, category=raw.get("category"))
        except ValidationError as exc:
            out.rejects.extend(validation_rejects(exc, str(path), number, raw))
            continue
        first_line[key] = number
        seen_ids.add(prompt_id)
        out.prompts.append(prompt)
    return out


def _given_id(value: object) -> str | None | Reject:
    """A row's own id as text (an integer counts: ``5`` is ``"5"``), None when it gives none, or a reject
    (without its place) for an id of another type, which would otherwise become ``"True"`` or ``"{'a': 1}"``."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return Reject("", 0, f"expected text or an integer, got {type(value).__name__}", "id")


def in_eval_split(prompt_id: str, eval_fraction: float, seed: int) -> bool:
    """Deterministic by (seed, id): adding prompts never moves existing ones between splits."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split_prompts(prompts: list[Prompt], eval_fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    train, evaluation = [], []
    for prompt in prompts:
        (evaluation if in_eval_split(prompt.id, eval_fraction, seed) else train).append(prompt)
    return train, evaluation
