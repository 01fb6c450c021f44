import json

import pandas as pd

from rlhf_core.prompts import import_prompts, in_eval_split, split_prompts

from .conftest import REPO


def _count(text: str) -> int:
    return len(text.split())


def test_shipped_prompt_set_is_large_and_clean():
    lines = (REPO / "data" / "prompts.jsonl").read_text().splitlines()
    result = import_prompts(REPO / "data" / "prompts.jsonl", "auto", "prompt", _count, 10_000)
    assert len(result.prompts) >= 500
    assert result.rejects == []
    assert len(lines) == len(result.prompts)
    categories = {p.category for p in result.prompts}
    assert {"explain", "advise", "rewrite", "list", "summarise", "creative"} <= categories


def test_rejects_empty_duplicate_long_and_malformed_with_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"question": "How do I boil an egg?"},
        {"question": "   "},
        {"question": "how do I  boil an EGG?"},
        {"question": "word " * 50},
        {"other": "no text field"},
        {"question": 42},
        {"question": "Name three birds."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    result = import_prompts(path, "auto", "question", _count, 20)
    assert [p.text for p in result.prompts] == ["How do I boil an egg?", "Name three birds."]
    reasons = {r.line: (r.kind, r.reason) for r in result.rejects}
    assert reasons[2][0] == "empty"
    assert reasons[3] == ("duplicate", "duplicate of line 1")
    assert reasons[4][0] == "too_long"
    assert reasons[5][1] == "missing" and reasons[6][0] == "invalid"
    assert 8 in reasons


def test_csv_parquet_and_hf_folder_sources(tmp_path):
    frame = pd.DataFrame({"text": ["Explain tides.", "Write a haiku about rain.", ""]})
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet")
    from datasets import Dataset

    Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "hf"))
    for source in ("p.csv", "p.parquet", "hf"):
        result = import_prompts(tmp_path / source, "auto", "text", _count, 100)
        assert [p.text for p in result.prompts] == ["Explain tides.", "Write a haiku about rain."], source
        assert len(result.rejects) == 1


def test_split_is_deterministic_and_stable_under_additions():
    from rlhf_core.schemas import Prompt

    prompts = [Prompt(id=f"p{i}", text=f"prompt {i}") for i in range(400)]
    train, evaluation = split_prompts(prompts, 0.2, seed=0)
    assert 50 < len(evaluation) < 110 and len(train) + len(evaluation) == 400
    again = split_prompts(prompts + [Prompt(id="new", text="new")], 0.2, seed=0)
    assert {p.id for p in evaluation} <= {p.id for p in again[1]}
    other_seed = split_prompts(prompts, 0.2, seed=1)[1]
    assert {p.id for p in other_seed} != {p.id for p in evaluation}
    assert in_eval_split("p1", 0.2, 0) == in_eval_split("p1", 0.2, 0)
