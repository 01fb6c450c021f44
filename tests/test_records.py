import json

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_core.records import read_records, write_jsonl, write_rejects
from rlhf_core.schemas import Completion, Ranking


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
