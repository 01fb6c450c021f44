import json

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_core.records import read_records, write_jsonl, write_rejects
from rlhf_core.schemas import Completion, PreferencePair, Ranking


def test_jsonl_reader_keeps_good_records_and_reports_bad_ones(tmp_path):
    path = tmp_path / "completions.jsonl"
    good = {"id": "c1", "prompt_id": "p1", "text": "hello", "policy_version": "base"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"id": "c2", "prompt_id": "p1", "policy_version": "base"}),  # missing text
        json.dumps({**good, "id": "c3", "num_tokens": "many"}),  # wrong type
        json.dumps(good),  # duplicate id
        "",
        json.dumps({**good, "id": "c4"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    result = read_records(path, Completion)
    assert [r.id for r in result.records] == ["c1", "c4"]
    by_line = {r.line: r for r in result.rejects}
    assert set(by_line) == {2, 3, 4, 5}
    assert "JSON" in by_line[2].reason
    assert by_line[3].field == "text" and by_line[3].reason == "missing"
    assert by_line[4].field == "num_tokens"
    assert "duplicate" in by_line[5].reason
    assert all(r.file == str(path) for r in result.rejects)


def test_ranking_rules():
    import pytest
    from pydantic import ValidationError

    Ranking(id="r", prompt_id="p", completion_ids=["a", "b", "c"], ranks=[1, 1, 2], annotator_id="x")
    with pytest.raises(ValidationError, match="repeats"):
        Ranking(id="r", prompt_id="p", completion_ids=["a", "a"], annotator_id="x")
    with pytest.raises(ValidationError):
        Ranking(id="r", prompt_id="p", completion_ids=["a"], annotator_id="x")
    with pytest.raises(ValidationError, match="non-decreasing"):
        Ranking(id="r", prompt_id="p", completion_ids=["a", "b"], ranks=[2, 1], annotator_id="x")


def test_parquet_reader_reports_rows(tmp_path):
    path = tmp_path / "c.parquet"
    table = pa.table(
        {
            "id": ["c1", "c2", "c3"],
            "prompt_id": ["p", "p", "p"],
            "text": ["ok", "", "fine"],
            "policy_version": ["v1", "v1", None],
        }
    )
    pq.write_table(table, path)
    result = read_records(path, Completion)
    assert [r.id for r in result.records] == ["c1", "c2"]
    assert [(r.line, r.field) for r in result.rejects] == [(3, "policy_version")]


def test_writers_round_trip(tmp_path):
    records = [Completion(id=f"c{i}", prompt_id="p", text="t", policy_version="v") for i in range(3)]
    assert write_jsonl(tmp_path / "out.jsonl", records) == 3
    assert read_records(tmp_path / "out.jsonl", Completion).records == records
    from rlhf_core.records import Reject

    write_rejects(tmp_path / "rejects.jsonl", [Reject("f", 3, "bad", "text")])
    row = json.loads((tmp_path / "rejects.jsonl").read_text())
    assert row["line"] == 3 and row["field"] == "text"


def test_text_encodings_are_detected_and_their_marks_dropped(tmp_path):
    import codecs

    lines = [
        '{"id": "c1", "prompt_id": "p", "text": "café 🙂", "policy_version": "v"}',
        '{"id": "c2", "prompt_id": "p", "text": "tea", "policy_version": "v"}',
    ]
    text = "\n".join(lines) + "\n"
    for name, data in {
        "bom.jsonl": codecs.BOM_UTF8 + text.encode(),
        "u16.jsonl": text.encode("utf-16"),
        "u16be.jsonl": text.encode("utf-16-be"),
        "u32.jsonl": text.encode("utf-32"),
        "gzip_without_gz_name.jsonl": __import__("gzip").compress(text.encode()),
    }.items():
        (tmp_path / name).write_bytes(data)
        result = read_records(tmp_path / name, Completion)
        assert [c.text for c in result.records] == ["café 🙂", "tea"] and result.rejects == [], name


def test_limits_reject_the_record_not_the_file(tmp_path):
    good = '{"id": "c%d", "prompt_id": "p", "text": "t", "policy_version": "v"}'
    lines = [
        good % 1,
        '{"id": "c2", "prompt_id": "p", "text": "t", "policy_version": "v", "x": ' + "[" * 150 + "]" * 150 + "}",
        '{"id": "c3", "prompt_id": "p", "text": "t", "policy_version": "v", "num_tokens": ' + "1" * 101 + "}",
        '{"id": "c4", "prompt_id": "p", "text": "t\\udc00", "policy_version": "v"}',
        good % 5,
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    result = read_records(tmp_path / "c.jsonl", Completion)
    assert [c.id for c in result.records] == ["c1", "c5"]
    assert [(r.line, r.reason.split(" (")[0]) for r in result.rejects] == [
        (2, "nested deeper than 100 levels"),
        (3, "holds an integer of 101 digits"),
        (4, "holds a lone surrogate '\\udc00'"),
    ]


def test_non_finite_numbers_are_rejected_by_the_schema_whatever_the_format(tmp_path):
    header = "prompt_id,prompt,chosen_id,chosen,rejected_id,rejected,ranking_id,annotator_id,margin,weight\n"
    row = "p,P,a,A,b,B,r{n},x,{margin},{weight}\n"
    rows = [row.format(n=1, margin=0, weight=0.5), row.format(n=2, margin="nan", weight=1)]
    rows.append(row.format(n=3, margin=1, weight="inf"))
    (tmp_path / "pairs.csv").write_text(header + "".join(rows))
    result = read_records(tmp_path / "pairs.csv", PreferencePair, unique_field=None)
    assert [p.ranking_id for p in result.records] == ["r1"]
    assert [(r.line, r.field, r.reason) for r in result.rejects] == [
        (3, "margin", "Input should be a finite number"),
        (4, "weight", "Input should be a finite number"),
    ]


def test_rejects_quoting_undecodable_bytes_can_be_written(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'{"id": "c1", "text": "caf\xe9"}\n')
    (reject,) = read_records(tmp_path / "c.jsonl", Completion).rejects
    assert reject.reason == "not valid UTF-8 (byte 0xE9 at character 26)"
    from rlhf_core.records import Reject

    write_rejects(tmp_path / "rejects.jsonl", [reject, Reject("f", 1, "bad \udce9", "text", "raw \ud800")])
    rows = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert rows[0]["raw"] == '{"id": "c1", "text": "caf\\udce9"}' and rows[1]["raw"] == "raw \\ud800"
