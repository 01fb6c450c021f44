"""Prompt sets: import from JSONL/CSV/Parquet/HF-datasets folders, clean, split by seed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from rlhf_core.errors import DataError
from rlhf_core.records import Reject, iter_raw_rows, validation_rejects
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
    """(row number, raw row) from any supported prompt source."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "hf":
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take the train split, else the first
            dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset.keys()))]
        for number, row in enumerate(dataset, start=1):
            yield number, row
    else:
        yield from iter_raw_rows(path)


def stable_id(text: str) -> str:
    return "p" + hashlib.sha256(text.strip().encode()).hexdigest()[:12]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


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
        if not isinstance(raw, dict):
            reason = getattr(raw, "message", "expected an object")
            out.rejects.append(Reject(str(path), number, f"not a valid record ({reason})"))
            continue
        text = raw.get(text_field)
        if not isinstance(text, str):
            reason = "missing" if text is None else f"expected text, got {type(text).__name__}"
            out.rejects.append(Reject(str(path), number, reason, text_field, str(raw)[:500]))
            continue
        if not text.strip():
            out.rejects.append(Reject(str(path), number, "empty prompt", text_field, kind="empty"))
            continue
        key = normalise(text)
        if key in first_line:
            out.rejects.append(Reject(str(path), number, f"duplicate of line {first_line[key]}", text_field, text[:500], "duplicate"))
            continue
        tokens = count_tokens(text)
        if tokens > max_tokens:
            out.rejects.append(Reject(str(path), number, f"too long: {tokens} tokens > {max_tokens}", text_field, text[:500], "too_long"))
            continue
        prompt_id = str(raw.get("id") or stable_id(text))
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


def in_eval_split(prompt_id: str, eval_fraction: float, seed: int) -> bool:
    """Deterministic by (seed, id): adding prompts never moves existing ones between splits."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split_prompts(prompts: list[Prompt], eval_fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    train, evaluation = [], []
    for prompt in prompts:
        (evaluation if in_eval_split(prompt.id, eval_fraction, seed) else train).append(prompt)
    return train, evaluation
