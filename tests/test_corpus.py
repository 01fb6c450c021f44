"""A salted corpus of malformed input files, thrown at every reader.

Each case is one entry of :data:`CASES` (a file of good records with damaged ones
mixed in) or :data:`REFUSED` (a file that cannot be read at all).  The good
records, where the damage goes and the line ends are drawn from a seeded random
generator, so every case is a fresh variation of its kind (set
``RLHF_CORPUS_SEED`` for another draw).  Every case runs through the Python API
(``import_preferences``, ``import_prompts``), the ``rlhf preferences import``
command and the ``collect_preferences`` import backend, which must agree: every
good record kept, each bad one reported with its file, line and reason, no
traceback, exit status 2 for a refused file.  A bug found later adds its case.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import random
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhf_core.errors import DataError
from rlhf_core.importers import import_preferences
from rlhf_core.prompts import import_prompts

BASE_SEED = int(os.environ.get("RLHF_CORPUS_SEED", "0"))
WORDS = ["apple", "river", "café", "naïve", "日本", "stone", "🙂", "window", "Ωmega", "tea"]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))


# --- good records of each format ------------------------------------------------------------------------------


def good_record(fmt: str, rng: random.Random, i: int) -> dict:
    """A record of ``fmt`` that gives exactly one ranking (or one prompt), distinct from every other ``i``."""
    prompt = f"Question {i}: {sentence(rng)}?"
    good, bad = f"Good answer {i}, {sentence(rng)}.", f"Bad answer {i}."
    if fmt in ("trl", "csv_trl"):
        return {"prompt": prompt, "chosen": good, "rejected": bad}
    if fmt == "hh":
        return {"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {bad}"}
    if fmt == "ratings":
        return {"prompt": prompt, "responses": [good, bad], "scores": [rng.randint(5, 9), rng.uniform(0, 4.5)]}
    if fmt == "label_studio":
        ranker = {"type": "ranker", "from_name": "rank", "to_name": "items", "value": {"ranker": {"rank": ["a", "b"]}}}
        items = [{"id": "a", "text": good}, {"id": "b", "text": bad}]
        return {"data": {"prompt": prompt, "items": items}, "annotations": [{"completed_by": i, "result": [ranker]}]}
    if fmt == "prompts":
        return {"prompt": prompt}
    raise AssertionError(fmt)


# --- damage: (bytes of one bad record made from a good one, fragment its reject reason must hold) ------------


def with_key(record: dict, key: str, raw_value: bytes) -> bytes:
    """The record's JSON with one more key whose value is given as raw bytes (to say what json.dumps cannot)."""
    return json.dumps(record, ensure_ascii=False).encode()[:-1] + b', "' + key.encode() + b'": ' + raw_value + b"}"


Damage = Callable[[dict, random.Random], bytes]

JSON_DAMAGE: dict[str, tuple[Damage, str]] = {
    "bad_json": (lambda r, rng: json.dumps(r).encode()[: rng.randint(1, 30)], "not valid JSON"),
    "deep_nesting": (lambda r, rng: with_key(r, "deep", b"[" * 100_000 + b"]" * 100_000), "nested deeper"),
    "huge_integer": (lambda r, rng: with_key(r, "n", b"7" * rng.randint(5000, 6000)), "digits"),
    "lone_surrogate": (lambda r, rng: with_key(r, "note", rng.choice([b'"\\ud800"', b'"x\\udfff y"'])), "lone surrogate"),
    "invalid_utf8": (lambda r, rng: with_key(r, "note", b'"caf\xe9 ' + bytes([rng.randint(0x80, 0xBF)]) + b'"'), "not valid UTF-8"),
    "nul_byte": (lambda r, rng: with_key(r, "note", b'"a\x00b"'), "not valid JSON"),
    "nan": (lambda r, rng: with_key(r, "score", rng.choice([b"NaN", b"Infinity", b"-Infinity"])), "finite"),
    "overflowing_float": (lambda r, rng: with_key(r, "score", b"1e999"), "finite"),
    "not_an_object": (lambda r, rng: rng.choice([b"[1, 2, 3]", b'"text"', b"42", b"null"]), "object"),
    "repeated_key": (lambda r, rng: with_key(r, next(iter(r)), b'"which one counts?"'), "twice in one object"),
}

#: Damage to one field, for the formats that have it (named by the cases that use it).
FIELD_DAMAGE: dict[str, tuple[Damage, str]] = {
    "invisible_prompt": (
        lambda r, rng: json.dumps({**r, "prompt": rng.choice(["\u200b", "\u200b\u200d", "\u2060\ufeff\u202e"])}).encode(),
        "no visible text",
    ),
    "id_of_another_type": (
        lambda r, rng: json.dumps({**r, "id": rng.choice([True, {"a": 1}, [1], 1.5])}).encode(),
        "expected text or an integer",
    ),
    "ratings_overflow": (
        lambda r, rng: json.dumps({**r, "scores": [1e308, -rng.uniform(1e308, 1.7e308)]}).encode(),
        "differ by more than a number can hold",
    ),
}
DAMAGE = {**JSON_DAMAGE, **FIELD_DAMAGE}


@dataclass(frozen=True)
class Case:
    """One file: ``good`` records of ``fmt`` in ``container`` with one record per damage mixed in."""

    fmt: str  # trl, hh, ratings, label_studio, prompts, csv_trl
    container: str  # jsonl, jsonl.gz, json (an array), csv
    damage: tuple[str, ...] = ()
    encoding: str = "utf-8"
    blank_lines: bool = False  # empty and whitespace-only lines between records (no rows, no rejects)
    repeat: bool = False  # a record given twice: the second is a duplicate
    long_line: bool = False  # a good record padded to a megabyte
    good: tuple[int, int] = (2, 6)
    layout: str = "lines"  # lines; pretty (indented objects one after another); pretty_array (an indented array)
    extra: dict = field(default_factory=dict)


CASES: dict[str, Case] = {
    "jsonl_every_damage": Case("trl", "jsonl", tuple(JSON_DAMAGE), blank_lines=True, repeat=True),
    "jsonl_gz_every_damage": Case("trl", "jsonl.gz", tuple(JSON_DAMAGE), repeat=True),
    "hh_damage": Case("hh", "jsonl", ("bad_json", "lone_surrogate", "invalid_utf8", "deep_nesting")),
    "ratings_damage": Case("ratings", "jsonl", ("nan", "huge_integer", "not_an_object"), repeat=True),
    "ratings_nan_score": Case("ratings", "jsonl", extra={"nan_score": True}),
    "label_studio_array": Case("label_studio", "json", ("deep_nesting", "lone_surrogate", "invalid_utf8", "nan")),
    "label_studio_truncated_array": Case("label_studio", "json", extra={"truncate": True}),
    "array_without_closing_bracket": Case("trl", "json", extra={"no_bracket": True}),
    "utf8_bom_jsonl": Case("trl", "jsonl", ("bad_json",), encoding="utf-8-sig"),
    "utf16_jsonl": Case("trl", "jsonl", ("bad_json", "lone_surrogate"), encoding="utf-16"),
    "utf16le_without_bom": Case("trl", "jsonl", ("not_an_object",), encoding="utf-16-le"),
    "utf32_jsonl": Case("trl", "jsonl", ("nan",), encoding="utf-32"),
    "crlf_and_blank_lines": Case("trl", "jsonl", ("bad_json",), blank_lines=True, extra={"newline": "\r\n"}),
    "very_long_line": Case("trl", "jsonl", ("huge_integer",), long_line=True),
    "empty_file": Case("trl", "jsonl", good=(0, 0)),
    "only_whitespace": Case("trl", "jsonl", blank_lines=True, good=(0, 0)),
    "only_bad_records": Case("trl", "jsonl", ("bad_json", "nan"), good=(0, 0)),
    "excel_csv_with_bom": Case("csv_trl", "csv", encoding="utf-8-sig", extra={"newline": "\r\n"}),
    "csv_damage": Case("csv_trl", "csv", extra={"csv_damage": ("invalid_utf8", "short_row", "long_row")}, repeat=True),
    "csv_huge_cell": Case("csv_trl", "csv", extra={"csv_damage": ("huge_cell",)}),
    "csv_unclosed_quote_at_end": Case("csv_trl", "csv", extra={"csv_damage": ("unclosed_quote",)}),
    "latin1_csv": Case("csv_trl", "csv", extra={"csv_damage": ("latin1",)}),
    "utf16_csv": Case("csv_trl", "csv", encoding="utf-16"),
    "prompts_jsonl": Case("prompts", "jsonl", tuple(JSON_DAMAGE), blank_lines=True),
    "prompts_csv": Case("prompts", "csv", encoding="utf-8-sig", extra={"csv_damage": ("invalid_utf8", "long_row")}),
    "prompts_json_array": Case("prompts", "json", ("lone_surrogate", "huge_integer")),
    # found by throwing a fresh corpus at the readers
    "byte_order_marks_starting_lines": Case("trl", "jsonl", ("bad_json",), extra={"bom_lines": True}),
    "prompts_byte_order_marks_starting_lines": Case("prompts", "jsonl", extra={"bom_lines": True}),
    "repeated_keys_and_invisible_prompts": Case("trl", "jsonl", ("repeated_key", "invisible_prompt"), repeat=True),
    "messages_encoded_as_json_text": Case("trl", "jsonl", ("repeated_key",), extra={"encoded_messages": True}),
    "ratings_too_far_apart": Case("ratings", "jsonl", ("ratings_overflow", "invisible_prompt", "repeated_key")),
    "pretty_printed_objects": Case("trl", "jsonl", ("lone_surrogate", "nan", "repeated_key"), layout="pretty"),
    "pretty_printed_array_in_jsonl": Case("trl", "jsonl", ("repeated_key", "huge_integer"), layout="pretty_array"),
    "pretty_printed_label_studio": Case("label_studio", "json", ("repeated_key",), layout="pretty"),
    "csv_blank_lines_before_header": Case("csv_trl", "csv", extra={"blank_before_header": 2, "csv_damage": ("short_row",)}),
    "prompts_ids_and_invisible_text": Case("prompts", "jsonl", ("id_of_another_type", "invisible_prompt", "repeated_key")),
    "prompts_pretty_printed": Case("prompts", "json", ("repeated_key",), layout="pretty_array"),
}


@dataclass
class Corpus:
    path: Path
    good: int
    bad: dict[int, str]  # line -> fragment of its reject reason


def _encode(text_lines: list[bytes], case: Case, newline: str) -> bytes:
    data = newline.encode().join(text_lines) + newline.encode()
    if case.encoding == "utf-8-sig":  # a mark before bytes that may be invalid on purpose
        data = codecs.BOM_UTF8 + data
    elif case.encoding != "utf-8":
        data = data.decode("utf-8").encode(case.encoding)
    return gzip.compress(data, mtime=0) if case.container.endswith(".gz") else data


def build(case: Case, name: str, folder: Path) -> Corpus:
    rng = random.Random(f"{BASE_SEED}:{name}")
    newline = case.extra.get("newline", rng.choice(["\n", "\r\n"]))
    goods = [good_record(case.fmt, rng, i) for i in range(rng.randint(*case.good))]
    # entries: (bytes, fragment or None for a good record, or "" for a line that is no record)
    entries: list[tuple[bytes, str | None]] = [(json.dumps(r, ensure_ascii=rng.random() < 0.3).encode(), None) for r in goods]
    if case.long_line and goods:
        padded = json.dumps(good_record(case.fmt, rng, 10_000)).encode()
        entries.append((padded[:-1] + b" " * 1_000_000 + b"}", None))
    for damage in case.damage:
        make, fragment = DAMAGE[damage]
        entries.insert(rng.randint(0, len(entries)), (make(good_record(case.fmt, rng, 20_000 + len(entries)), rng), fragment))
    if case.extra.get("nan_score"):
        row = good_record("ratings", rng, 30_000)
        nan_scores = json.dumps(row).encode().replace(b'"scores": [', b'"scores": [NaN, ')
        entries.insert(rng.randint(0, len(entries)), (nan_scores, "finite"))
    if case.extra.get("encoded_messages"):  # chat messages given as JSON text: a good record all the same
        turns = [{"role": "user", "content": f"Encoded {sentence(rng)}?"}]
        pair = {side: json.dumps(turns + [{"role": "assistant", "content": f"{side} {sentence(rng)}"}]) for side in ("chosen", "rejected")}
        entries.insert(rng.randint(0, len(entries)), (json.dumps(pair).encode(), None))
    if case.extra.get("bom_lines"):  # files joined with cat: each one's byte-order mark starts a line
        starts = [k for k, (_, fragment) in enumerate(entries) if fragment is None]
        for k in rng.sample(starts, k=min(2, len(starts))):
            entries[k] = (codecs.BOM_UTF8 + entries[k][0], None)
    if case.repeat and goods:
        entries.append((json.dumps(goods[0]).encode(), "duplicate"))
    if case.blank_lines:
        for _ in range(rng.randint(1, 4)):
            entries.insert(rng.randint(0, len(entries)), (rng.choice([b"", b"   ", b"\t \t"]), ""))
    path = folder / f"{name}.{case.container}"
    if case.layout != "lines":
        return _build_pretty(case, entries, path, newline)
    if case.container == "csv":
        return _build_csv(case, goods, rng, path, newline)
    if case.container == "json":
        return _build_array(case, entries, rng, path, newline)
    lines, bad, good = [], {}, 0
    for number, (data, fragment) in enumerate(entries, start=1):
        lines.append(data)
        good += fragment is None
        if fragment:
            bad[number] = fragment
    path.write_bytes(_encode(lines, case, newline))
    return Corpus(path, good, bad)


def _build_array(case: Case, entries, rng, path: Path, newline: str) -> Corpus:
    """One element per line after the opening ``[``: element k is on line k + 1."""
    entries = [(data, fragment) for data, fragment in entries if fragment != ""]
    lines = [b"["] + [data + (b"," if k < len(entries) - 1 else b"") for k, (data, _) in enumerate(entries)] + [b"]"]
    bad = {k + 2: fragment for k, (_, fragment) in enumerate(entries) if fragment}
    good = sum(fragment is None for _, fragment in entries)
    if case.extra.get("truncate"):  # cut inside the last element: the ones before it are kept
        last = lines[-2]
        lines[-2:] = [last[: rng.randint(1, len(last) - 2)]]
        good -= 1
        bad[len(lines)] = "not valid JSON"
    if case.extra.get("no_bracket"):
        lines[-2] += b","
        del lines[-1]
        bad[len(lines) + 1] = "closing ']'"
    path.write_bytes(_encode(lines, case, newline))
    return Corpus(path, good, bad)


def _build_pretty(case: Case, entries, path: Path, newline: str) -> Corpus:
    """Good records indented over several lines (the first one starts the file), damaged ones on one line each,
    one after another or as the elements of an array; a record's reject is on the line it starts on."""
    entries = [(data, fragment) for data, fragment in entries if fragment != ""]
    first = next(k for k, (_, fragment) in enumerate(entries) if fragment is None)
    entries.insert(0, entries.pop(first))
    array = case.layout == "pretty_array"
    lines: list[bytes] = [b"["] if array else []
    bad, good = {}, 0
    for k, (data, fragment) in enumerate(entries):
        text = json.dumps(json.loads(data), indent=2, ensure_ascii=False).encode() if fragment is None else data
        if array and k < len(entries) - 1:
            text += b","
        start = len(lines) + 1
        lines.extend(text.split(b"\n"))
        good += fragment is None
        if fragment:
            bad[start] = fragment
    if array:
        lines.append(b"]")
    path.write_bytes(_encode(lines, case, newline))
    return Corpus(path, good, bad)


def _build_csv(case: Case, goods: list[dict], rng, path: Path, newline: str) -> Corpus:
    """Header on line 1, one row per line (no cell holds a line break)."""
    columns = list(goods[0]) if goods else ["prompt"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    rows: list[tuple[bytes, str | None]] = []
    for record in goods:
        text.seek(0), text.truncate()
        writer.writerow([record[c] for c in columns])
        rows.append((text.getvalue().rstrip("\n").encode(), None))
    first = b",".join(c.encode() for c in columns)
    damage = {
        "invalid_utf8": (lambda: b"caf\xe9" + b",x" * (len(columns) - 1), "not valid UTF-8"),
        "latin1": (lambda: "Café crème?".encode("latin-1") + b",x" * (len(columns) - 1), "not valid UTF-8"),
        "short_row": (lambda: b"Lonely question?" + b",x" * (len(columns) - 2), "cells for the header"),
        "long_row": (lambda: b"Question?" + b",x" * len(columns), "cells for the header"),
        "huge_cell": (lambda: b"Huge?," + b"y" * 200_000 + b",x" * (len(columns) - 2), "not valid CSV"),
    }
    for name in case.extra.get("csv_damage", ()):
        if name == "unclosed_quote":
            continue
        make, fragment = damage[name]
        rows.insert(rng.randint(0, len(rows)), (make(), fragment))
    if case.repeat and goods:
        rows.append((rows[[f for _, f in rows].index(None)][0], "duplicate"))
    blank = case.extra.get("blank_before_header", 0)
    lines = [b""] * blank + [first] + [data for data, _ in rows]
    bad = {k + 2 + blank: fragment for k, (_, fragment) in enumerate(rows) if fragment}
    if "unclosed_quote" in case.extra.get("csv_damage", ()):
        lines.append(b'"Never closed?,x' + b",x" * (len(columns) - 2))
        bad[len(lines)] = "not valid CSV"
    path.write_bytes(_encode(lines, case, newline))
    return Corpus(path, sum(f is None for _, f in rows), bad)


# --- refused files: (write it into a folder and return its path, fragment of the one error) -----------------


def _gzip_lines(rng: random.Random, count: int) -> bytes:
    return gzip.compress("".join(json.dumps(good_record("trl", rng, i)) + "\n" for i in range(count)).encode())


def _parquet(folder: Path, rng: random.Random, corrupt: Callable[[bytes], bytes]) -> Path:
    import pandas as pd

    path = folder / "prefs.parquet"
    pd.DataFrame([good_record("trl", rng, i) for i in range(5)]).to_parquet(path)
    path.write_bytes(corrupt(path.read_bytes()))
    return path


def _hf_folder(folder: Path, rng: random.Random, damage: Callable[[Path], None]) -> Path:
    from datasets import Dataset

    path = folder / "hf"
    Dataset.from_list([good_record("trl", rng, i) for i in range(3)]).save_to_disk(str(path))
    damage(path)
    return path


def _write(name: str, data: bytes) -> Callable[[Path, random.Random], Path]:
    return _write_drawn(name, lambda rng: data)


def _write_drawn(name: str, data: Callable[[random.Random], bytes]) -> Callable[[Path, random.Random], Path]:
    def make(folder: Path, rng: random.Random) -> Path:
        (folder / name).write_bytes(data(rng))
        return folder / name

    return make


REFUSED: dict[str, tuple[Callable[[Path, random.Random], Path], str]] = {
    "not_gzip": (_write_drawn("p.jsonl.gz", lambda rng: json.dumps(good_record("trl", rng, 1)).encode()), "not gzip"),
    "truncated_gzip": (
        _write_drawn("p.jsonl.gz", lambda rng: (d := _gzip_lines(rng, 300))[: rng.randint(20, len(d) - 20)]),
        "truncated or corrupt gzip",
    ),
    "gzip_bad_crc": (
        _write_drawn("p.jsonl.gz", lambda rng: _gzip_lines(rng, 3)[:-8] + bytes(8)),
        "truncated or corrupt gzip",
    ),
    "corrupt_parquet": (lambda f, rng: _parquet(f, rng, lambda d: d[: len(d) // 2]), "not a readable Parquet"),
    "text_named_parquet": (lambda f, rng: _parquet(f, rng, lambda d: b'{"prompt": "x"}\n'), "not a readable Parquet"),
    "random_bytes": (_write_drawn("p.jsonl", lambda rng: b"\x80" + rng.randbytes(5000)), "not UTF-8 text|binary data"),
    "binary_with_nuls": (_write("p.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(2000)), "binary data"),
    "utf16_odd_length": (_write("p.jsonl", '{"prompt": "a"}\n'.encode("utf-16") + b"\x00"), "not valid UTF-16"),
    "csv_header_repeats": (_write("p.csv", b"prompt,chosen,prompt\na,b,c\n"), "repeats the column 'prompt'"),
    "csv_wrong_columns": (_write("p.csv", b"Question,Good,Bad\na?,b,c\n"), "cannot tell the preference format"),
    "hf_corrupt_arrow": (
        lambda f, rng: _hf_folder(f, rng, lambda p: next(p.glob("*.arrow")).write_bytes(b"garbage" * 9)),
        "not a readable Hugging Face datasets folder",
    ),
    "gzip_twice": (_write_drawn("p.jsonl.gz", lambda rng: gzip.compress(_gzip_lines(rng, 3))), "compressed twice"),
    "hf_broken_state": (
        lambda f, rng: _hf_folder(f, rng, lambda p: (p / "state.json").write_text("{oops")),
        "not a readable Hugging Face datasets folder",
    ),
}


# --- runners --------------------------------------------------------------------------------------------------


def assert_reports(corpus: Corpus, kept: int, rejects, file: str | None = None) -> None:
    """Every good record kept; each bad one reported once, at its line, with the reason's fragment."""
    by_line = {}
    for reject in rejects:
        assert reject.line not in by_line, f"two rejects for line {reject.line}: {rejects}"
        by_line[reject.line] = reject
        assert reject.file == (file or str(corpus.path)), reject
    assert sorted(by_line) == sorted(corpus.bad), [r.describe() for r in rejects]
    for line, fragment in corpus.bad.items():
        assert fragment in by_line[line].reason, by_line[line].describe()
    assert kept == corpus.good


PREFERENCE_CASES = [name for name, case in CASES.items() if case.fmt != "prompts"]
PROMPT_CASES = [name for name, case in CASES.items() if case.fmt == "prompts"]


@pytest.mark.parametrize("name", PREFERENCE_CASES)
def test_importer_keeps_good_records_and_reports_bad_ones(name, tmp_path):
    corpus = build(CASES[name], name, tmp_path)
    bundle = import_preferences(corpus.path)
    assert_reports(corpus, len(bundle.rankings), bundle.rejects)


@pytest.mark.parametrize("name", PROMPT_CASES)
def test_prompt_import_keeps_good_records_and_reports_bad_ones(name, tmp_path):
    corpus = build(CASES[name], name, tmp_path)
    imported = import_prompts(corpus.path, "auto", "prompt", len, 10_000)
    assert_reports(corpus, len(imported.prompts), imported.rejects)


@pytest.mark.parametrize("name", PREFERENCE_CASES)
def test_cli_import_writes_the_good_records_and_every_reject(name, work_env, capsys):
    from rlhf_core.cli import main

    corpus = build(CASES[name], name, work_env)
    status = main(["preferences", "import", str(corpus.path), "--out", "bundle"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "unexpected error" not in err
    rejects = [json.loads(line) for line in (work_env / "bundle" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == sorted(corpus.bad)
    assert all(r["file"] == str(corpus.path) and r["reason"] for r in rejects)
    if corpus.good:
        assert status == 0, err
        assert len((work_env / "bundle" / "rankings.jsonl").read_text().splitlines()) == corpus.good
    else:
        assert status == 2 and err.count("\n") == 1 and "no usable preferences" in err


@pytest.mark.parametrize("name", PREFERENCE_CASES)
def test_collect_preferences_import_backend_agrees(name, tmp_path):
    from rlhf_core.config import LabelingConfig
    from rlhf_core.stages.collect_preferences import imported_bundle

    corpus = build(CASES[name], name, tmp_path)
    cfg = LabelingConfig(backend="import", import_file=corpus.path.name)
    bundle = imported_bundle(tmp_path, cfg)
    assert_reports(corpus, len(bundle.rankings), bundle.rejects)


@pytest.mark.parametrize("name", REFUSED)
def test_unreadable_file_is_one_clear_error(name, tmp_path, work_env, capsys):
    import re

    from rlhf_core.cli import main

    make, pattern = REFUSED[name]
    (tmp_path / "in").mkdir()
    path = make(tmp_path / "in", random.Random(f"{BASE_SEED}:{name}"))
    with pytest.raises(DataError, match=pattern) as caught:
        import_preferences(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    capsys.readouterr()  # what building the file printed
    assert main(["preferences", "import", str(path), "--out", "bundle"]) == 2
    out, err = capsys.readouterr()
    assert re.search(pattern, err) and err.count("\n") == 1 and "Traceback" not in out + err
    if name.startswith(("not_gzip", "truncated", "random", "binary", "utf16")):  # the prompt reader refuses it alike
        with pytest.raises(DataError, match=pattern):
            import_prompts(path, "auto", "prompt", len, 10_000)


# --- bundle folders: the same validation through the API, the command and the stage ------------------------


def salted_bundle(folder: Path, rng: random.Random) -> tuple[int, dict[int, str]]:
    """A bundle of good rankings with bad ones mixed in; (good rankings, rankings.jsonl line -> reason fragment)."""
    folder.mkdir(parents=True)
    prompts = [{"id": f"p{i}", "text": f"Prompt {i}: {sentence(rng)}"} for i in range(rng.randint(2, 4))]
    completions = [
        {"id": f"{p['id']}c{k}", "prompt_id": p["id"], "text": f"Answer {k}: {sentence(rng)}", "policy_version": "v"}
        for p in prompts
        for k in range(3)
    ]

    def ranking(rid: str, pid: str, ids: list[str], **extra) -> str:
        return json.dumps({"id": rid, "prompt_id": pid, "completion_ids": ids, "annotator_id": "a", **extra})

    lines: list[tuple[str, str | None]] = []
    for p in prompts:
        ids = [f"{p['id']}c{k}" for k in range(3)]
        rng.shuffle(ids)
        lines.append((ranking(f"r{p['id']}", p["id"], ids, ratings=[3.0, 2.0, rng.uniform(0, 1)]), None))
    bad = [
        (ranking("ru", "p0", ["p0c0", "nope"]), "unknown completion"),
        (ranking("rf", "p0", ["p0c0", "p1c0"]), "belongs to prompt"),
        (ranking("rn", "p0", ["p0c1", "p0c2"], ratings=[1.0, 2.0]).replace("[1.0, 2.0]", "[NaN, 2.0]"), "finite"),
        (ranking("ri", "p1", ["p1c1", "p1c2"], ratings=[1.0, 2.0]).replace("[1.0, 2.0]", "[1e999, 2.0]"), "finite"),
        (ranking("rs", "p0", ["p0c0", "p0c1"], note="\ud800"), "lone surrogate"),
        (ranking("rb", "p1", ["p1c0", "p1c1"], ranks=rng.choice([[True, 2], [1, True]])), "expected a number, got true"),
        (ranking("ro", "p1", ["p1c0", "p1c2"], ratings=[1e308, -1e308]), "differ by more than a number can hold"),
        (ranking("rh", "p0", [f"x{k}" for k in range(rng.randint(20_000, 30_000))]), "unknown completion 'x2' and"),
        (ranking("rk", "p0", ["p0c2", "p0c0"])[:-1] + ', "prompt_id": "p1"}', "'prompt_id' twice"),
    ]
    for entry in bad:
        lines.insert(rng.randint(0, len(lines)), entry)
    lines.append((ranking("rp0", "p0", ["p0c1", "p0c0"]), "duplicate"))  # the id of the first good ranking again
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (folder / "completions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in completions))
    (folder / "rankings.jsonl").write_text("".join(text + "\n" for text, _ in lines))
    return len(prompts), {number: fragment for number, (_, fragment) in enumerate(lines, start=1) if fragment}


def test_bundle_folder_is_validated_alike_by_api_command_and_stage(tmp_path, work_env, capsys):
    from rlhf_core.cli import main
    from rlhf_core.config import LabelingConfig
    from rlhf_core.stages.collect_preferences import imported_bundle

    folder = tmp_path / "exports" / "bundle"
    good, expected = salted_bundle(folder, random.Random(f"{BASE_SEED}:bundle"))
    rankings_file = str(folder / "rankings.jsonl")
    for bundle in (
        import_preferences(folder),
        imported_bundle(tmp_path / "exports", LabelingConfig(backend="import", import_file="bundle")),
    ):
        assert len(bundle.rankings) == good
        assert {r.line: r.file for r in bundle.rejects} == {line: rankings_file for line in expected}
        for reject in bundle.rejects:
            assert expected[reject.line] in reject.reason and len(reject.reason) < 300, reject.describe()
    assert main(["preferences", "import", str(folder), "--out", "out"]) == 0
    assert "Traceback" not in "".join(capsys.readouterr())
    written = [json.loads(line) for line in (work_env / "out" / "rankings.jsonl").read_text().splitlines()]
    assert len(written) == good and all(r["ratings"] is None or None not in r["ratings"] for r in written)
    rejects = [json.loads(line) for line in (work_env / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == sorted(expected)


def test_demonstration_reader_keeps_good_rows_and_reports_bad_ones(tmp_path):
    """The demonstrations reader shares the decoder: the same damage, the same rejects, and its own fields."""
    from rlhf_core.demonstrations import read_demonstrations

    rng = random.Random(f"{BASE_SEED}:demonstrations")
    good = [{"prompt": f"Question {i}: {sentence(rng)}?", "completion": f"Answer {i}: {sentence(rng)}."} for i in range(4)]
    bad = [
        (json.dumps({"prompt": "\u200b\u2060", "completion": "Visible answer."}), "no visible text"),
        (json.dumps({"prompt": "Seen?", "completion": rng.choice(["\ufeff", "\u200b \u200d"])}), "no visible text"),
        (json.dumps({**good[0], "prompt_id": rng.choice([1.5, True, ["p"]])}), "expected text or an integer"),
        ('{"prompt": "Twice?", "completion": "One.", "completion": "Two."}', "twice in one object"),
    ]
    lines = [json.dumps(row) for row in good[1:]]
    for text, _ in bad:
        lines.insert(rng.randint(0, len(lines)), text)
    expected = {lines.index(text) + 1: fragment for text, fragment in bad}
    joined = rng.choice([k for k in range(len(lines)) if k + 1 not in expected])
    lines[joined] = "\ufeff" + lines[joined]  # two files joined with cat: the second one's mark starts a line
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n")
    demos = read_demonstrations(path)
    assert {r.line: r.reason for r in demos.rejects}.keys() == expected.keys(), [r.describe() for r in demos.rejects]
    for reject in demos.rejects:
        assert expected[reject.line] in reject.reason, reject.describe()
    assert len(demos.demonstrations) == len(lines) - len(bad)


def test_the_command_run_as_a_program_prints_one_line_and_exits_2(tmp_path):
    """No traceback even outside pytest's in-process run (stderr is what a user sees)."""
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(zlib.compress(b'{"prompt": "x"}\n'))
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_core.cli", "preferences", "import", str(path), "--out", str(tmp_path / "b"),
         "--params", str(Path(__file__).resolve().parents[1] / "params.yaml")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "RLHF_PROJECT_ROOT": str(tmp_path)},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "not gzip" in done.stderr and "Traceback" not in done.stderr
