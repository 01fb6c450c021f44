"""Demonstrations for SFT: every source format, rejects with file and line, each cleaning step, the eval guard,
export and round trips (rlhf_core.demonstrations and ``rlhf demonstrations``)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from rlhf_core import cli
from rlhf_core.demonstrations import (
    REJECT_KINDS,
    clean_demonstrations,
    exclude_eval_prompts,
    export_demonstrations,
    find_markup,
    import_demonstrations,
    read_demonstrations,
)
from rlhf_core.errors import ConfigError, DataError
from rlhf_core.prompts import import_prompts, split_prompts, stable_id
from rlhf_core.schemas import MAX_TEXT_CHARS, Prompt

REPO = Path(__file__).resolve().parents[1]

PAIRS = [
    ("How do I boil an egg?", "Simmer it for eight minutes, then cool it in cold water."),
    ("Name a primary colour.", "Red."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red, so blue reaches us from every direction."),
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl_dicts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_pairs(demos) -> list[tuple[str, str]]:
    return [(d.prompt, d.completion) for d in demos.demonstrations]


def messages(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def rejects_by_line(demos) -> dict[int, tuple[str, str | None]]:
    return {r.line: (r.kind, r.field) for r in demos.rejects}


# --- formats ------------------------------------------------------------------------------------------------------


def _source(tmp_path: Path, kind: str) -> Path:
    plain = [{"prompt": p, "completion": c} for p, c in PAIRS]
    chat = [{"messages": messages(p, c)} for p, c in PAIRS]
    turns = [{"prompt": messages(p, c)[:1], "completion": messages(p, c)[1:]} for p, c in PAIRS]
    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", plain)
    if kind == "jsonl.gz":
        path = tmp_path / "d.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in plain).encode()))
        return path
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(chat, indent=2))
        return path
    if kind == "csv":
        path = tmp_path / "d.csv"
        pd.DataFrame(plain).to_csv(path, index=False)
        return path
    if kind == "csv-messages":
        path = tmp_path / "m.csv"
        pd.DataFrame([{"messages": json.dumps(r["messages"])} for r in chat]).to_csv(path, index=False)
        return path
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame(turns).to_parquet(path)
        return path
    if kind == "messages":
        return write_jsonl(tmp_path / "m.jsonl", chat)
    if kind == "conversational-prompt-completion":
        return write_jsonl(tmp_path / "t.jsonl", turns)
    assert kind == "datasets"
    from datasets import Dataset

    Dataset.from_list(chat).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


@pytest.mark.parametrize(
    "kind",
    ["jsonl", "jsonl.gz", "json", "csv", "csv-messages", "parquet", "messages", "conversational-prompt-completion",
     "datasets"],  # fmt: skip
)
def test_each_format_gives_the_same_demonstrations(tmp_path, kind):
    demos = read_demonstrations(_source(tmp_path, kind))
    assert demos.rejects == []
    assert as_pairs(demos) == PAIRS
    assert [d.prompt_id for d in demos.demonstrations] == [stable_id(p) for p, _ in PAIRS]
    assert all(d.prompt_messages is None for d in demos.demonstrations)
    # ids are content hashes: the same rows in any format get the same ids
    plain = [{"prompt": p, "completion": c} for p, c in PAIRS]
    again = read_demonstrations(write_jsonl(tmp_path / "again.jsonl", plain))
    assert [d.id for d in demos.demonstrations] == [d.id for d in again.demonstrations]


def test_project_rows_keep_their_ids_and_provenance(tmp_path):
    rows = [
        {"prompt_id": "p0001", "prompt": " What is 2+2? ", "completion": "4.\n", "source": "written"},
        {"id": "demo-7", "prompt_id": "p0002", "prompt": "Say hi.", "completion": "Hi!", "annotator_id": "ann1",
         "source": "human", "created_at": "2026-01-01T00:00:00"},
    ]
    first, second = read_demonstrations(write_jsonl(tmp_path / "d.jsonl", rows)).demonstrations
    assert (first.prompt_id, first.prompt, first.completion, first.source) == ("p0001", "What is 2+2?", "4.", "written")
    assert (second.id, second.annotator_id, second.source) == ("demo-7", "ann1", "human")


def test_a_conversation_up_to_the_last_assistant_turn_is_the_prompt(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Pear."},
    ]
    (demo,) = read_demonstrations(write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])).demonstrations
    assert demo.completion == "Pear."
    assert [t.model_dump() for t in demo.prompt_messages] == turns[:-1]
    assert demo.prompt == "System: Be brief.\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another one?"
    # the rendering's role headers are this project's convention, not markup
    assert clean_demonstrations(read_demonstrations(tmp_path / "m.jsonl")).rejects == []


# --- rejects at reading -------------------------------------------------------------------------------------------


def test_every_bad_row_is_one_reject_with_file_line_field_and_kind(tmp_path):
    good = {"prompt": "Say hi.", "completion": "Hi!"}
    lines = [
        json.dumps(good),  # 1
        "{not json",  # 2
        '{"prompt": "a", "completion": NaN}',  # 3
        json.dumps(["a list"]),  # 4
        json.dumps({"question": "q", "answer": "a"}),  # 5
        json.dumps({"prompt": "Say hi."}),  # 6
        json.dumps({"prompt": "Q?", "completion": None}),  # 7
        json.dumps({"prompt": "Q?", "completion": 42}),  # 8
        json.dumps({"prompt": "Q?", "completion": "   "}),  # 9
        json.dumps({"prompt": "", "completion": "A."}),  # 10
        json.dumps({"prompt": "Q?", "completion": "x" * (MAX_TEXT_CHARS + 1)}),  # 11
        json.dumps({"messages": messages("Q?", "A.")[:1]}),  # 12: ends with the user
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "A."}]}),  # 13
        json.dumps({"messages": [{"role": "system", "content": "S."}, {"role": "assistant", "content": "A."}]}),  # 14
        json.dumps({"messages": [{"role": "user", "content": {"text": "Q?"}}, messages("Q?", "A.")[1]]}),  # 15
        json.dumps({"prompt": messages("Q?", "A.")[:1], "completion": "A."}),  # 16: mixed kinds
        json.dumps({"prompt": messages("Q?", "A.")[:1], "completion": messages("Q?", "A.")[:1]}),  # 17: user answer
        json.dumps({"id": "x1", "prompt": "Q1?", "completion": "A1."}),  # 18
        json.dumps({"id": "x1", "prompt": "Q2?", "completion": "A2."}),  # 19: repeated id
        json.dumps({"prompt_id": "p1", "prompt": "Q3?", "completion": "A3."}),  # 20
        json.dumps({"prompt_id": "p1", "prompt": "Another prompt?", "completion": "A4."}),  # 21
        "",  # a blank line is no row
        json.dumps(good),  # 23: an exact repeat
        json.dumps({"prompt": "Say  hi.", "completion": "Hi!"}),  # 24: for the cleaning step (whitespace)
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    demos = read_demonstrations(path)
    assert rejects_by_line(demos) == {
        2: ("unreadable", None),
        3: ("unreadable", None),
        4: ("invalid", None),
        5: ("invalid", None),
        6: ("invalid", "completion"),
        7: ("non_text", "completion"),
        8: ("non_text", "completion"),
        9: ("empty", "completion"),
        10: ("empty", "prompt"),
        11: ("too_long", "completion"),
        12: ("invalid", "messages[0].role"),
        13: ("invalid", "messages[0].role"),
        14: ("invalid", "messages"),
        15: ("non_text", "messages[0].content"),
        16: ("invalid", "completion"),
        17: ("invalid", "completion"),
        19: ("duplicate", "id"),
        21: ("invalid", "prompt_id"),
        23: ("duplicate", "completion"),
    }
    assert {r.file for r in demos.rejects} == {str(path)}
    assert all(r.reason and r.raw for r in demos.rejects if r.line != 10)
    assert [demos.origins[d.id][1] for d in demos.demonstrations] == [1, 18, 20, 24]
    assert demos.counts()["rows"] == 23 == demos.counts()["kept"] + len(demos.rejects)


def test_nan_and_missing_cells_of_tables_are_rejects(tmp_path):
    frame = pd.DataFrame({"prompt": ["Q1?", "Q2?", "Q3?"], "completion": ["A1.", math.nan, None]})
    frame.to_parquet(tmp_path / "d.parquet")
    nulls = {2: ("non_text", "completion"), 3: ("non_text", "completion")}
    assert rejects_by_line(read_demonstrations(tmp_path / "d.parquet")) == nulls
    frame.to_csv(tmp_path / "d.csv", index=False)  # pandas writes NaN as an empty cell
    empties = {3: ("empty", "completion"), 4: ("empty", "completion")}
    assert rejects_by_line(read_demonstrations(tmp_path / "d.csv")) == empties


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("d.jsonl.gz", b'{"prompt": "a"}\n', "not gzip"),
        ("d.jsonl", b"\x00\x01\x02\x00" * 100, "binary"),
        ("d.parquet", b"PAR1 not really", "Parquet"),
    ],
)
def test_an_unreadable_file_is_one_data_error(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_demonstrations(tmp_path / name)
    with pytest.raises(DataError, match="not found"):
        read_demonstrations(tmp_path / "missing.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="datasets folder"):
        read_demonstrations(tmp_path / "folder")


# --- cleaning -----------------------------------------------------------------------------------------------------

LONG = (
    "Preheat the oven, grease a tin, mix the flour sugar eggs and butter, pour the batter in, "
    "and bake it for forty minutes."
)


def test_each_cleaning_step_is_counted_and_kept_as_a_reject_with_its_line(tmp_path):
    rows = [
        ("How do I bake a cake?", LONG),  # 1 kept
        ("How do I bake a cake?", "  " + LONG.replace(", ", ",\n ") + " "),  # 2 exact duplicate (whitespace)
        ("How do I bake a cake?", LONG.replace("forty", "forty-five").upper()),  # 3 near duplicate
        ("How do I bake a cake?", "Mix, pour and bake it: that is all there is to it."),  # 4 kept: a new answer
        ("Tell me a joke.", "<|im_start|>assistant\nWhy did the chicken cross the road?"),  # 5 markup (token)
        ("Tell me a fact.", "Honey never spoils.\n\nHuman: Another?"),  # 6 markup (role header)
        ("### Instruction:\nGreet me.", "Hello there!"),  # 7 markup in the prompt
        ("Describe the sea.", " ".join(["wave"] * 41)),  # 8 too long (words)
        ("What is the capital of France?", "What is the capital of France?"),  # 9 restates the prompt
        ("Is 7 prime?", "Yes."),  # 10 kept: too short to be a restatement
        ('Correct the capitals: "we saw the eiffel tower in paris."', "We saw the Eiffel Tower in Paris."),  # 11 kept
        ("Tell me a joke.", "A pun about bread would be too crumby."),  # 12 kept
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in rows])
    cleaned = clean_demonstrations(read_demonstrations(path), max_words=40)
    assert [cleaned.origins[d.id][1] for d in cleaned.demonstrations] == [1, 4, 10, 11, 12]
    assert rejects_by_line(cleaned) == {
        2: ("duplicate", "completion"),
        3: ("near_duplicate", "completion"),
        5: ("markup", "completion"),
        6: ("markup", "completion"),
        7: ("markup", "prompt"),
        8: ("too_long", "completion"),
        9: ("restates_prompt", "completion"),
    }
    reasons = {r.line: r.reason for r in cleaned.rejects}
    assert reasons[2] == "duplicate of line 1" and reasons[3].startswith("near-duplicate of line 1 (Jaccard 0.9")
    assert "'<|im_start|>'" in reasons[5] and "'Human:'" in reasons[6] and "### Instruction" in reasons[7]
    assert reasons[8] == "too long: 41 words > 40"
    assert cleaned.counts() == {
        "rows": 12, "kept": 5, "unreadable": 0, "invalid": 0, "non_text": 0, "empty": 0, "too_long": 1, "markup": 3,
        "restates_prompt": 1, "duplicate": 1, "near_duplicate": 1, "eval_prompt": 0,
    }  # fmt: skip
    assert set(cleaned.counts()) == {"rows", "kept", *REJECT_KINDS}


def test_thresholds_are_arguments(tmp_path):
    rows = [("How do I bake a cake?", LONG), ("How do I bake a cake?", LONG.replace("forty", "forty-five"))]
    demos = read_demonstrations(write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in rows]))
    assert clean_demonstrations(demos).counts()["near_duplicate"] == 1
    assert clean_demonstrations(demos, near_duplicate_jaccard=0.96).counts()["near_duplicate"] == 0
    assert clean_demonstrations(demos, near_duplicate_shingle_words=3).counts()["near_duplicate"] == 0
    assert clean_demonstrations(demos, max_chars=len(LONG)).counts()["too_long"] == 1  # the second is longer
    tokens = clean_demonstrations(demos, max_tokens=20, count_tokens=lambda text: len(text.split()))
    assert tokens.counts()["too_long"] == 2 and "tokens > 20" in tokens.rejects[0].reason
    assert clean_demonstrations(demos, restate_overlap=0.01).counts()["restates_prompt"] == 0  # no shared trigram
    for bad in ({"max_words": 0}, {"near_duplicate_jaccard": 1.5}, {"restate_overlap": 0}, {"max_tokens": 5},
                {"near_duplicate_shingle_words": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            clean_demonstrations(demos, **bad)


def test_markup_finder():
    assert find_markup("Use <|eot_id|> here", answer=False) == "<|eot_id|>"
    assert find_markup("[INST] hi [/INST]", answer=True) == "[INST]"
    assert find_markup("Sure.\n### Response: ok", answer=True) == "### Response"
    assert find_markup("Human: hi\n\nAssistant: hello", answer=False) is None
    assert find_markup("Assistant: hello", answer=True) == "Assistant:"
    assert find_markup("The Human: a play, and C# code #1.", answer=True) is None


# --- the eval guard -----------------------------------------------------------------------------------------------


def test_eval_prompts_never_get_in_by_id_text_or_turn(tmp_path):
    rows = [
        {"prompt_id": "p0001", "prompt": "Train prompt.", "completion": "A."},  # 1 kept
        {"prompt_id": "p0002", "prompt": "Something else.", "completion": "B."},  # 2 eval by id
        {"prompt": "  what IS  an eval prompt? ", "completion": "C."},  # 3 eval by text, unknown id
        {"messages": [{"role": "user", "content": "What is an eval prompt?"}, {"role": "assistant", "content": "D."},
                      {"role": "user", "content": "More?"}, {"role": "assistant", "content": "E."}]},  # 4 eval turn
    ]  # fmt: skip
    demos = read_demonstrations(write_jsonl(tmp_path / "d.jsonl", rows))
    eval_prompts = [Prompt(id="p0002", text="Eval one."), Prompt(id="p0009", text="What is an eval prompt?")]
    guarded = exclude_eval_prompts(demos, eval_prompts)
    assert [d.prompt_id for d in guarded.demonstrations] == ["p0001"]
    assert rejects_by_line(guarded) == {line: ("eval_prompt", "prompt") for line in (2, 3, 4)}
    assert guarded.counts()["eval_prompt"] == 3
    assert import_demonstrations(tmp_path / "d.jsonl", eval_prompts).counts() == guarded.counts()


# --- export and round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["prompt-completion", "messages"])
def test_export_then_import_gives_the_same_demonstrations(tmp_path, form):
    rows = [{"prompt_id": "p1", "prompt": "Q?", "completion": "A.", "source": "written", "annotator_id": "ann"}]
    rows.append({"messages": [{"role": "system", "content": "Be kind."}, *messages("Hi?", "Hello.")]})
    demos = read_demonstrations(write_jsonl(tmp_path / "d.jsonl", rows)).demonstrations
    out = tmp_path / "out.jsonl"
    assert export_demonstrations(demos, out, form) == 2
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert ("messages" in written[0]) == (form == "messages")
    if form == "messages":
        assert written[1]["messages"][-1] == {"role": "assistant", "content": "Hello."}
    else:
        assert (written[0]["prompt"], written[0]["completion"]) == ("Q?", "A.")
    assert read_demonstrations(out).demonstrations == demos
    assert not list(tmp_path.glob(".out.jsonl.*"))  # written through a temporary file, renamed into place
    with pytest.raises(ConfigError, match=".jsonl"):
        export_demonstrations(demos, tmp_path / "out.parquet", form)


def test_the_shipped_demonstrations_import_cleanly_off_the_eval_split():
    from rlhf_core.config import load_params

    section = load_params(REPO / "params.yaml").prompts
    prompts = import_prompts(REPO / "data" / "prompts.jsonl", section.format, section.text_field, lambda t: 0, 1)
    _, eval_prompts = split_prompts(prompts.prompts, section.eval_fraction, section.seed)
    demos = import_demonstrations(REPO / "data" / "demonstrations.jsonl", eval_prompts)
    assert demos.rejects == []
    assert demos.counts()["kept"] == demos.counts()["rows"] == 369
    assert {d.source for d in demos.demonstrations} == {"written"}


# --- the command line (in an isolated project root: the CLI points every tool's state into .work/) ----------------


def test_cli_import_writes_the_kept_and_the_rejects(work_env, capsys):
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS] + [{"prompt": PAIRS[0][0], "completion": PAIRS[0][1]}]
    write_jsonl(work_env / "d.jsonl", rows)
    (work_env / "eval.jsonl").write_text(Prompt(id="e1", text=PAIRS[1][0]).model_dump_json() + "\n")
    out = work_env / "sft" / "demos.jsonl"
    argv = ["demonstrations", "import", str(work_env / "d.jsonl"), "--out", str(out),
            "--eval-prompts", str(work_env / "eval.jsonl"), "--max-words", "50"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "imported 2 of 4 demonstrations" in capsys.readouterr().out
    assert [(d["prompt"], d["completion"]) for d in read_jsonl_dicts(out)] == [PAIRS[0], PAIRS[2]]
    rejects = read_jsonl_dicts(work_env / "sft" / "demos.rejects.jsonl")
    assert [(r["line"], r["kind"]) for r in rejects] == [(4, "duplicate"), (2, "eval_prompt")]
    assert cli.main(["demonstrations", "export", str(out), "--to", "messages", "--out", str(work_env / "m.jsonl")]) == 0
    assert read_demonstrations(work_env / "m.jsonl").demonstrations == read_demonstrations(out).demonstrations


@pytest.mark.parametrize(
    "content, match",
    [(b"not gzip at all", "not gzip"), (gzip.compress(b'{"question": "q"}\n'), "no usable demonstrations")],
)
def test_cli_refuses_a_bad_file_with_one_line_and_exit_2(work_env, capsys, content, match):
    (work_env / "d.jsonl.gz").write_bytes(content)
    code = cli.main(["demonstrations", "import", str(work_env / "d.jsonl.gz"), "--out", str(work_env / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (work_env / "o.jsonl").exists()


def test_cli_threshold_out_of_range_exits_2(work_env, capsys):
    write_jsonl(work_env / "d.jsonl", [{"prompt": "Q?", "completion": "A."}])
    argv = ["demonstrations", "import", str(work_env / "d.jsonl"), "--out", str(work_env / "o.jsonl"),
            "--near-duplicate-jaccard", "2"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "near_duplicate_jaccard must be in (0, 1]" in capsys.readouterr().err
