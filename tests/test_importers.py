"""Importers and exporters of public preference data (rlhf_core.importers)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from rlhf_core.errors import DataError
from rlhf_core.importers import export_hf, export_trl, load_preferences, preference_rows
from rlhf_core.preferences import PreferenceBundle, ranking_to_pairs

DATA = Path(__file__).parent / "data" / "importers"

#: fixture -> (format it must be detected as, preference pairs it holds)
SAMPLES = {
    "trl_explicit.jsonl": ("trl", 4),
    "trl_implicit.jsonl": ("trl", 3),
    "trl_conversational.jsonl": ("trl", 3),
    "hh.jsonl": ("hh", 3),
    "ultrafeedback.jsonl": ("ratings", 9),
    "label_studio.json": ("label_studio", 10),
}


def triples(bundle: PreferenceBundle) -> Counter:
    """The bundle's preferences as a multiset of (prompt, chosen, rejected)."""
    return Counter((r["prompt"], r["chosen"].strip(), r["rejected"].strip()) for r in preference_rows(bundle))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_each_format_round_trips_through_trl(name, tmp_path):
    fmt, pairs = SAMPLES[name]
    auto = load_preferences(DATA / name)
    named = load_preferences(DATA / name, fmt)
    assert auto.rejects == [] and named.rankings == auto.rankings
    assert sum(triples(auto).values()) == pairs

    assert export_trl(auto, tmp_path / "out.jsonl") == pairs
    again = load_preferences(tmp_path / "out.jsonl")
    assert again.rejects == []
    assert triples(again) == triples(auto)
    # a second trip changes nothing, ids included
    export_trl(again, tmp_path / "out2.jsonl")
    assert load_preferences(tmp_path / "out2.jsonl").rankings == again.rankings


def test_bundle_folder_is_the_rankings_format(tmp_path):
    bundle = load_preferences(DATA / "ultrafeedback.jsonl")
    bundle.write(tmp_path / "bundle")
    for fmt in ("auto", "rankings"):
        back = load_preferences(tmp_path / "bundle", fmt)
        assert (back.prompts, back.completions, back.rankings) == (bundle.prompts, bundle.completions, bundle.rankings)
    with pytest.raises(DataError, match="bundle folder"):
        load_preferences(DATA / "hh.jsonl", "rankings")


def test_ids_are_content_hashes_stable_across_imports_and_sources(tmp_path):
    first = load_preferences(DATA / "trl_explicit.jsonl")
    second = load_preferences(DATA / "trl_explicit.jsonl")
    assert first.rankings == second.rankings and first.completions == second.completions
    pd.DataFrame(read_jsonl(DATA / "trl_explicit.jsonl")).to_parquet(tmp_path / "copy.parquet")
    assert [r.id for r in load_preferences(tmp_path / "copy.parquet").rankings] == [r.id for r in first.rankings]
    # a shared prompt and a shared completion are stored once
    assert len(first.rankings) == 4 and len(first.prompts) == 3 and len(first.completions) == 7
    assert {c.policy_version for c in first.completions} == {"import:trl_explicit.jsonl"}
    assert all(r.source == "import" and len(r.completion_ids) == 2 for r in first.rankings)
    # each record remembers the first source line that gave it, for later reports
    source = str(DATA / "trl_explicit.jsonl")
    assert [first.origins[("rankings", r.id)] for r in first.rankings] == [(source, n) for n in (1, 2, 3, 4)]
    shared = first.rankings[3].completion_ids[1]  # "Keep a regular bedtime…" first came on line 2
    assert first.origins[("completions", shared)] == (source, 2)


# --- what each importer makes of its format -----------------------------------------------------------------------


def test_trl_explicit_implicit_and_conversational_prompts():
    explicit = load_preferences(DATA / "trl_explicit.jsonl")
    assert [r.annotator_id for r in explicit.rankings] == ["import", "ann-7", "import", "import"]
    assert ("Name a prime number between 10 and 20.", "13 is prime.", "15 is prime.") in triples(explicit)

    implicit = triples(load_preferences(DATA / "trl_implicit.jsonl"))
    # the shared beginning is cut at a word boundary, never inside "Paris"/"Lyon" or "Meeting"/"Meetings"
    assert ("Q: How many legs does a spider have? A:", "Eight legs.", "Six legs.") in implicit
    assert ("The capital of France is", "Paris.", "Lyon, I think.") in implicit
    summary = ("Summarise: the meeting moved to Friday. Summary:", "Meeting now on Friday.", "Meetings are fun.")
    assert summary in implicit

    chat = load_preferences(DATA / "trl_conversational.jsonl")
    assert set(triples(chat)) == {
        ("Suggest a name for a grey cat.", "How about Smokey?", "Cat."),
        ("System: Be brief.\n\nHuman: What is 2 + 2?", "4.", "It is 5."),
        (
            "Human: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Recommend a book.",
            "Try 'The Hobbit' by J.R.R. Tolkien.",
            "No.",
        ),
    }
    assert chat.rankings[2].annotator_id == "rater-2"


def test_hh_shared_prefix_is_the_prompt_and_keeps_earlier_turns():
    bundle = load_preferences(DATA / "hh.jsonl")
    assert set(triples(bundle)) == {
        (
            "How do I keep basil alive indoors?",
            "Give it a sunny window and water it when the top of the soil is dry.",
            "Basil cannot grow indoors.",
        ),
        (
            "Human: What is a good first programming language?\n\n"
            "Assistant: Python is a popular choice.\n\nHuman: Why?",
            "Its syntax is readable and it has many beginner resources.",
            "Because.",
        ),
        (
            "Can you help me write a polite complaint?",
            "Of course. Start by describing what happened, then say what you would like done.",
            "Just shout at them.",
        ),
    }


def test_ratings_become_rankings_with_ties_and_ratings():
    bundle = load_preferences(DATA / "ultrafeedback.jsonl")
    texts = {c.id: c.text for c in bundle.completions}
    leap = bundle.rankings[0]
    assert [texts[c] for c in leap.completion_ids] == [
        "Every fourth year has an extra day, 29 February, to keep the calendar in step with the seasons.",
        "A year with 366 days, adding 29 February.",
        "A year that has one more day than usual.",
        "A year when frogs leap.",
    ]
    assert leap.ranks == [1, 2, 2, 3] and leap.ratings == [9.0, 8.5, 8.5, 2.0]
    prompt = next(p for p in bundle.prompts if p.id == leap.prompt_id)
    pairs = ranking_to_pairs(leap, prompt, {c.id: c for c in bundle.completions}, margin="rating_gap")
    assert len(pairs) == 5  # C(4,2) = 6 comparisons minus the tie
    assert sorted(p.margin for p in pairs) == [0.5, 0.5, 6.5, 6.5, 7.0]
    french = bundle.rankings[1]
    assert [texts[c] for c in french.completion_ids] == ["Bonjour.", "Bon matin.", "Bonsoir."]
    assert french.ranks is None and french.ratings == [5.0, 3.0, 2.0]
    assert bundle.rankings[2].annotator_id == "uf-judge"


def test_label_studio_ranker_buckets_and_pairwise():
    bundle = load_preferences(DATA / "label_studio.json")
    texts = {c.id: c.text for c in bundle.completions}
    slogan, rainy, left, right = bundle.rankings
    assert [texts[c] for c in slogan.completion_ids] == [
        "Baked with love every morning.",
        "Fresh from our oven to your table.",
        "Bread.",
    ]
    assert slogan.ranks is None and slogan.annotator_id == "3" and slogan.created_at.year == 2024
    assert [texts[c] for c in rainy.completion_ids] == [
        "Visit a museum.",
        "Read a novel by the window.",
        "Bake bread at home.",
        "Go sunbathing.",
    ]
    assert rainy.ranks == [1, 1, 2, 3] and rainy.annotator_id == "rater@example.org"
    assert [texts[c] for c in left.completion_ids] == ["Bright silver disc lighting night.", "Moon."]
    assert [texts[c] for c in right.completion_ids] == ["Moon.", "Bright silver disc lighting night."]
    assert (left.annotator_id, right.annotator_id) == ("3", "8")


# --- sources ------------------------------------------------------------------------------------------------------


def _write_sources(rows: list[dict], folder: Path) -> dict[str, Path]:
    """The same records as JSONL, JSONL.gz, Parquet, CSV (lists as JSON text), a datasets folder and a DatasetDict."""
    from datasets import Dataset, DatasetDict

    folder.mkdir()
    columns = {key: None for row in rows for key in row}
    rows = [{**columns, **row} for row in rows]  # one set of columns for every table
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (folder / "s.jsonl").write_text(lines)
    with gzip.open(folder / "s.jsonl.gz", "wt") as handle:
        handle.write(lines)
    pd.DataFrame(rows).to_parquet(folder / "s.parquet")
    cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
    pd.DataFrame(cells).to_csv(folder / "s.csv", index=False)
    Dataset.from_list(rows).save_to_disk(str(folder / "hf"))
    splits = DatasetDict({"test": Dataset.from_list(rows[:1]), "train": Dataset.from_list(rows)})
    splits.save_to_disk(str(folder / "hfdict"))
    return {p.name: p for p in folder.iterdir()}


@pytest.mark.parametrize("name", ["trl_explicit.jsonl", "trl_conversational.jsonl", "ultrafeedback.jsonl", "hh.jsonl"])
def test_every_source_kind_reads_the_same_preferences(name, tmp_path):
    rows = read_jsonl(DATA / name)
    if name == "ultrafeedback.jsonl":  # a table column holds one type: keep the rows with lists of objects
        rows = [row for row in rows if "completions" in row]
    expected = [r.id for r in load_preferences(DATA / name).rankings]
    sources = _write_sources(rows, tmp_path / "sources")
    assert set(sources) == {"s.jsonl", "s.jsonl.gz", "s.parquet", "s.csv", "hf", "hfdict"}
    for source, path in sources.items():
        bundle = load_preferences(path)
        assert bundle.rejects == [], (source, bundle.rejects)
        assert [r.id for r in bundle.rankings] == [i for i in expected if i in {r.id for r in bundle.rankings}], source
        assert len(bundle.rankings) == len(rows), source


def test_json_array_reports_lines_and_keeps_what_precedes_a_break(tmp_path):
    tasks = json.loads((DATA / "label_studio.json").read_text())
    text = "[\n" + ",\n".join(json.dumps(task, indent=1) for task in tasks[:2]) + ",\n{broken\n]"
    (tmp_path / "ls.json").write_text(text)
    bundle = load_preferences(tmp_path / "ls.json")
    assert len(bundle.rankings) == 2
    (reject,) = bundle.rejects
    assert reject.line == text[: text.index("{broken")].count("\n") + 1
    assert "cannot be read" in reject.reason


# --- bad input ----------------------------------------------------------------------------------------------------


def test_salted_file_keeps_every_good_record_and_reports_each_bad_one():
    path = DATA / "salted_trl.jsonl"
    bundle = load_preferences(path, "trl", max_text_chars=200)
    assert [r.annotator_id for r in bundle.rankings] == ["import", "import", "a2"]
    assert {p.text for p in bundle.prompts} == {"Name a fruit.", "Name a season.", "Name a tool."}
    records = [line for line in path.read_text().splitlines() if line.strip()]
    assert len(records) == len(bundle.rankings) + len(bundle.rejects)  # nothing dropped silently
    by_line = {r.line: r for r in bundle.rejects}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 12]
    expected = {
        2: (None, "not valid JSON", "invalid"),
        3: ("rejected", "missing", "invalid"),
        4: ("chosen", "expected text or", "invalid"),
        5: ("chosen", "no visible text", "empty"),  # an empty answer is valid; an invisible one is not
        6: ("rejected", "too long: 299 characters > 200", "too_long"),
        7: ("rejected", "identical to chosen", "identical"),
        8: (None, "duplicate of line 1", "duplicate"),
        9: (None, "expected an object", "invalid"),
        12: ("prompt[0]", "expected a message object", "invalid"),
    }
    for line, (field, reason, kind) in expected.items():
        reject = by_line[line]
        assert (reject.field, reject.kind) == (field, kind), reject
        assert reject.reason.startswith(reason), reject
        assert reject.file == str(path) and reject.raw
    assert sum(triples(bundle).values()) == 3


def test_malformed_ratings_are_rejected_with_their_field(tmp_path):
    rows = [
        {"prompt": "Name a fruit.", "responses": ["Apple.", "Chair."], "scores": [4, 1]},
        {"prompt": "Name a fruit twice.", "responses": ["Apple."], "scores": [4]},
        {"prompt": "Name a car.", "completions": [{"response": "A Fiat."}, {"response": "A cat.", "score": 1}]},
        {"prompt": "Name a dog.", "responses": ["Rex.", "Tom."], "scores": [3, "high"]},
        {"prompt": "Name a dog.", "responses": ["Rex.", "Tom."], "scores": [3]},
        {"instruction": "", "responses": ["Rex.", "Tom."], "ratings": [3, 2]},
        {"prompt": "Name two dogs.", "responses": ["Rex.", "Rex."], "scores": [3, 2]},
        {"responses": ["Rex.", "Tom."], "scores": [3, 2]},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    bundle = load_preferences(tmp_path / "r.jsonl")
    assert len(bundle.rankings) == 1
    assert [(r.line, r.field) for r in bundle.rejects] == [
        (2, "responses"),
        (3, "completions[0].overall_score"),
        (4, "scores[1]"),
        (5, "scores"),
        (6, "instruction"),
        (7, "responses[1]"),
        (8, "prompt"),
    ]
    reasons = [r.reason for r in bundle.rejects]
    assert reasons[0].startswith("fewer than 2") and reasons[4] == "empty text"
    assert reasons[5] == "identical to responses[0]" and reasons[6].startswith("missing")


def test_label_studio_problems_are_rejected_per_annotation(tmp_path):
    items = [{"id": "a", "text": "Yes, gladly."}, {"id": "b", "text": "No."}]

    def ranker(ids):
        return {"type": "ranker", "from_name": "rank", "to_name": "results", "value": {"ranker": {"rank": ids}}}

    tasks = [
        {"data": {"prompt": "Will you help?", "items": items}, "annotations": [
            {"completed_by": 1, "result": [ranker(["a", "b"])]},
            {"completed_by": 2, "was_cancelled": True, "result": []},
            {"completed_by": 3, "result": [ranker(["a", "z"])]},
            {"completed_by": 4, "result": [{"type": "choices", "value": {"choices": ["ok"]}}]},
        ]},
        {"data": {"prompt": "Unlabelled?", "items": items}, "annotations": []},
        {"data": {"items": items}, "annotations": [{"result": [ranker(["a", "b"])]}]},
        {"data": {"prompt": "Will you help?", "items": items}, "annotations": [
            {"completed_by": 1, "result": [ranker(["a", "b"])]},
        ]},
    ]
    (tmp_path / "ls.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    bundle = load_preferences(tmp_path / "ls.jsonl")
    assert [r.annotator_id for r in bundle.rankings] == ["1"]
    assert [(r.line, r.field, r.kind) for r in bundle.rejects] == [
        (1, "annotations[1]", "skipped"),
        (1, "annotations[2].result[0].value.ranker", "invalid"),
        (1, "annotations[3].result", "invalid"),
        (2, "annotations", "unlabelled"),
        (3, "data.prompt", "invalid"),
        (4, None, "duplicate"),
    ]
    assert "unknown item 'z'" in bundle.rejects[1].reason


def test_unusable_sources_raise_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_preferences(tmp_path / "missing.jsonl")
    (tmp_path / "odd.jsonl").write_text('{"question": "?", "answer": "!"}\n')
    with pytest.raises(DataError, match=r"cannot tell the preference format from the columns \['answer', 'question'\]"):
        load_preferences(tmp_path / "odd.jsonl")
    with pytest.raises(DataError, match="unknown preference format"):
        load_preferences(DATA / "hh.jsonl", "csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="neither a preference bundle"):
        load_preferences(tmp_path / "folder")
    (tmp_path / "junk.jsonl").write_text("{oops\n[1]\n")
    assert [r.line for r in load_preferences(tmp_path / "junk.jsonl").rejects] == [1, 2]


# --- exporters ----------------------------------------------------------------------------------------------------


def test_exports_to_parquet_gzip_and_datasets_folder(tmp_path):
    from datasets import load_from_disk

    bundle = load_preferences(DATA / "label_studio.json")
    expected = preference_rows(bundle)
    assert all(row["chosen"].startswith(" ") for row in expected)  # TRL tokenizes prompt + chosen
    assert export_trl(bundle, tmp_path / "p.parquet") == len(expected)
    assert pd.read_parquet(tmp_path / "p.parquet").to_dict("records") == expected
    export_trl(bundle, tmp_path / "p.jsonl.gz")
    with gzip.open(tmp_path / "p.jsonl.gz", "rt") as handle:
        assert [json.loads(line) for line in handle] == expected
    assert export_hf(bundle, tmp_path / "hf") == len(expected)
    dataset = load_from_disk(str(tmp_path / "hf"))
    assert dataset.column_names == ["prompt", "chosen", "rejected"] and dataset.to_list() == expected
    assert triples(load_preferences(tmp_path / "hf")) == triples(bundle)
    with pytest.raises(DataError, match="cannot tell the output format"):
        export_trl(bundle, tmp_path / "p.txt")
    with pytest.raises(DataError, match="no preference pairs"):
        export_trl(PreferenceBundle(), tmp_path / "empty.jsonl")


def test_preferences_command_imports_and_exports(work_env, capsys):
    from rlhf_core.cli import main

    # params.yaml's labeling.max_text_chars (8000) keeps line 6, which the 200-character test above rejects
    assert main(["preferences", "import", str(DATA / "salted_trl.jsonl"), "--out", "bundle"]) == 0
    assert "imported 4 rankings" in capsys.readouterr().out
    assert len(read_jsonl(work_env / "bundle" / "rankings.jsonl")) == 4
    assert [r["line"] for r in read_jsonl(work_env / "bundle" / "rejects.jsonl")] == [2, 3, 4, 5, 7, 8, 9, 12]
    assert main(["preferences", "export", "bundle", "--to", "trl", "--out", "pairs.jsonl"]) == 0
    assert len(read_jsonl(work_env / "pairs.jsonl")) == 4
    assert main(["preferences", "export", "bundle", "--to", "hf", "--out", "hf"]) == 0
    (work_env / "bad.jsonl").write_text("{nope\n")
    assert main(["preferences", "import", "bad.jsonl", "--out", "b2"]) == 2
    assert "no usable preferences (1 rejected" in capsys.readouterr().err


@pytest.mark.slow
def test_trl_reward_trainer_trains_on_the_hf_export(tiny_base_model, tmp_path):
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(2)
    export_hf(load_preferences(DATA / "ultrafeedback.jsonl"), tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base_model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, use_cpu=True, bf16=False,
        report_to=[], save_strategy="no",
    )
    dataset = load_from_disk(str(tmp_path / "hf"))
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.train_dataset.num_rows == 9
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
