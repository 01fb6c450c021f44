"""Bundles, validation with file/line rejects, and the expansion of rankings into pairs."""

import json
from pathlib import Path

import pytest

from rlhf_core.preferences import (
    PreferenceBundle,
    bundle_pairs,
    length_stats,
    ranking_to_pairs,
    referenced,
    tie_rate,
    validate_bundle,
)
from rlhf_core.schemas import Completion, Prompt, Ranking

PROMPT = Prompt(id="p1", text="Name a fruit.")


def completions(n: int, prompt_id: str = "p1") -> dict[str, Completion]:
    return {
        f"c{i}": Completion(id=f"c{i}", prompt_id=prompt_id, text=" ".join(["word"] * (i + 1)) + ".", policy_version="t")
        for i in range(n)
    }


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_a_strict_ranking_gives_k_choose_2_pairs_weighted_as_one(k):
    ranking = Ranking(id="r", prompt_id="p1", completion_ids=[f"c{i}" for i in range(k)], annotator_id="a")
    pairs = ranking_to_pairs(ranking, PROMPT, completions(k), margin="rank_distance")
    assert len(pairs) == k * (k - 1) // 2
    assert sum(p.weight for p in pairs) == pytest.approx(1.0)
    assert {(p.chosen_id, p.rejected_id) for p in pairs} == {(f"c{i}", f"c{j}") for i in range(k) for j in range(i + 1, k)}
    assert max(p.margin for p in pairs) == k - 1 and min(p.margin for p in pairs) == 1


def test_ties_give_no_pairs():
    tied = Ranking(id="r", prompt_id="p1", completion_ids=["c0", "c1", "c2", "c3"], ranks=[1, 1, 3, 3], annotator_id="a")
    pairs = ranking_to_pairs(tied, PROMPT, completions(4), margin="rank_distance")
    assert len(pairs) == 4  # 6 comparisons minus the two tied ones
    assert {(p.chosen_id, p.rejected_id) for p in pairs} == {("c0", "c2"), ("c0", "c3"), ("c1", "c2"), ("c1", "c3")}
    assert all(p.margin == 2 for p in pairs)
    assert tie_rate([tied]) == pytest.approx(2 / 6)
    all_tied = tied.model_copy(update={"ranks": [1, 1, 1, 1]})
    assert ranking_to_pairs(all_tied, PROMPT, completions(4)) == []


def test_length_stats():
    ranking = Ranking(id="r", prompt_id="p1", completion_ids=["c2", "c0"], annotator_id="a")
    stats = length_stats(ranking_to_pairs(ranking, PROMPT, completions(3)))
    assert stats == {"chosen_words_mean": 3, "rejected_words_mean": 1, "longer_chosen_rate": 1.0}
    assert length_stats([]) == {}


def write_lines(path: Path, rows: list) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def salted_bundle(folder: Path) -> Path:
    """A bundle with one good ranking per prompt and bad records at known lines."""
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / "prompts.jsonl", [
        {"id": "p1", "text": "Name a fruit."},
        {"id": "p2", "text": "Name a colour."},
        {"id": "p1", "text": "Duplicate id."},  # line 3: duplicate
        {"id": "p3", "text": "x" * 300},  # line 4: too long for max_text_chars=200
        "{not json",  # line 5
    ])
    good = [{"id": f"{p}c{i}", "prompt_id": p, "text": f"Answer {i} to {p}.", "policy_version": "t"} for p in ("p1", "p2") for i in range(3)]
    write_lines(folder / "completions.jsonl", good + [
        {"id": "e1", "prompt_id": "p1", "text": "   ", "policy_version": "t"},  # line 7: empty
        {"id": "u1", "prompt_id": "nope", "text": "Orphan.", "policy_version": "t"},  # line 8: unknown prompt
        {"id": "l1", "prompt_id": "p3", "text": "About p3.", "policy_version": "t"},  # line 9: prompt was rejected
        {"id": "p1c0", "prompt_id": "p1", "text": "Same id again.", "policy_version": "t"},  # line 10: duplicate id
    ])
    rank = lambda rid, pid, ids, who="a", **kw: {"id": rid, "prompt_id": pid, "completion_ids": ids, "annotator_id": who, **kw}  # noqa: E731
    write_lines(folder / "rankings.jsonl", [
        rank("r1", "p1", ["p1c0", "p1c1", "p1c2"]),
        rank("r2", "p2", ["p2c2", "p2c0", "p2c1"]),
        rank("r3", "p1", ["p1c0", "missing"]),  # line 3: unknown completion
        rank("r4", "p1", ["p1c0", "p1c0"]),  # line 4: repeated completion
        rank("r5", "p1", ["p1c0"]),  # line 5: too few
        rank("r1", "p1", ["p1c2", "p1c1"], who="b"),  # line 6: duplicate ranking id
        rank("r7", "p1", ["p1c0", "p1c1", "p1c2"]),  # line 7: same ranking again by the same annotator
        rank("r8", "p1", ["p1c0", "p2c1"]),  # line 8: completion of another prompt
        rank("r9", "p1", ["p1c0", "e1"]),  # line 9: names a rejected completion
        rank("r10", "p1", ["p1c0", "p1c1", "p1c2"], who="b"),  # agreement by another annotator: kept
    ])
    return folder


def test_salted_bundle_keeps_good_records_and_reports_each_bad_one_with_its_line(tmp_path):
    folder = salted_bundle(tmp_path / "bundle")
    clean = validate_bundle(PreferenceBundle.read(folder), max_text_chars=200, source=str(folder))
    assert [p.id for p in clean.prompts] == ["p1", "p2"]
    assert sorted(c.id for c in clean.completions) == sorted(f"{p}c{i}" for p in ("p1", "p2") for i in range(3))
    assert [r.id for r in clean.rankings] == ["r1", "r2", "r10"]
    where = {(Path(r.file).name, r.line): r for r in clean.rejects}
    expected = {
        ("prompts.jsonl", 3): "duplicate",
        ("prompts.jsonl", 4): "too_long",
        ("prompts.jsonl", 5): "bad_json",
        ("completions.jsonl", 7): "empty",
        ("completions.jsonl", 8): "unknown_id",
        ("completions.jsonl", 9): "unknown_id",
        ("completions.jsonl", 10): "duplicate",
        ("rankings.jsonl", 3): "unknown_id",
        ("rankings.jsonl", 4): "repeated_id",
        ("rankings.jsonl", 5): "too_few",
        ("rankings.jsonl", 6): "duplicate",
        ("rankings.jsonl", 7): "duplicate",
        ("rankings.jsonl", 8): "mismatch",
        ("rankings.jsonl", 9): "unknown_id",
    }
    assert {key: r.kind for key, r in where.items()} == expected
    assert "was rejected" in where[("completions.jsonl", 9)].reason
    assert "'r1'" in where[("rankings.jsonl", 7)].reason
    assert "belongs to prompt 'p2'" in where[("rankings.jsonl", 8)].reason
    pairs = bundle_pairs(clean)
    assert len(pairs) == 3 + 3 + 3


def test_records_built_in_memory_are_located_by_position():
    bundle = PreferenceBundle(
        prompts=[PROMPT],
        completions=list(completions(2).values()) + [Completion(id="x", prompt_id="p1", text="\u200b\u200b", policy_version="t")],
    )
    clean = validate_bundle(bundle, max_text_chars=100, source="import.jsonl")
    (reject,) = clean.rejects
    assert reject.kind == "empty" and reject.file == "import.jsonl (completions record 3)" and reject.line == 0


def test_referenced_drops_unranked_records():
    bundle = PreferenceBundle(
        prompts=[PROMPT, Prompt(id="p2", text="Unused.")],
        completions=list(completions(3).values()),
        rankings=[Ranking(id="r", prompt_id="p1", completion_ids=["c0", "c2"], annotator_id="a")],
    )
    cut = referenced(bundle)
    assert [p.id for p in cut.prompts] == ["p1"] and [c.id for c in cut.completions] == ["c0", "c2"]


def test_non_finite_ratings_are_rejected_and_counted_by_kind(tmp_path):
    folder = salted_bundle(tmp_path / "bundle")
    with (folder / "rankings.jsonl").open("a") as handle:
        handle.write('{"id": "rn", "prompt_id": "p2", "completion_ids": ["p2c0", "p2c1"], "annotator_id": "c", "ratings": [NaN, 1]}\n')
        handle.write('{"id": "ri", "prompt_id": "p2", "completion_ids": ["p2c0", "p2c1"], "annotator_id": "c", "ratings": ["inf", 1]}\n')
    clean = validate_bundle(PreferenceBundle.read(folder), max_text_chars=200, source=str(folder))
    assert "rn" not in {r.id for r in clean.rankings} and "ri" not in {r.id for r in clean.rankings}
    kinds = {r.line: (r.kind, r.field) for r in clean.rejects if r.file.endswith("rankings.jsonl")}
    assert kinds[11] == ("not_finite", None) and kinds[12] == ("not_finite", "ratings.0")
