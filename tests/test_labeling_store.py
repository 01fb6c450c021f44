"""The labelling store: items, tokens, assignments, labels, export and statistics (no web server)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from rlhf_core.agreement import interval_alpha
from rlhf_core.config import LabelingConfig
from rlhf_core.errors import RLHFError
from rlhf_core.importers import load_preferences
from rlhf_core.labeling.export import export_labels
from rlhf_core.labeling.items import build_items
from rlhf_core.labeling.stats import label_stats, word_edit_distance
from rlhf_core.labeling.store import SCHEMA, AlreadyLabelled, InvalidLabel, LabelStore, NotFound, ranks_from_groups
from rlhf_core.preferences import PreferenceBundle
from rlhf_core.schemas import Completion, Prompt, Ranking

GUIDE = LabelingConfig().demonstration_words


def make_bundle(prompts: int = 3, k: int = 4, *, round_: str = "r1", gold: bool = False) -> PreferenceBundle:
    bundle = PreferenceBundle()
    for p in range(prompts):
        bundle.prompts.append(Prompt(id=f"p{p}", text=f"Prompt number {p}?"))
        ids = [f"p{p}-{round_}-c{c}" for c in range(k)]
        bundle.completions += [
            Completion(id=cid, prompt_id=f"p{p}", text=f"Answer {cid}.", policy_version=round_) for cid in ids
        ]
        if gold:
            bundle.rankings.append(Ranking(id=f"gold-p{p}", prompt_id=f"p{p}", completion_ids=ids, annotator_id="gold"))
    return bundle


def store_with(tmp_path, bundle: PreferenceBundle | None = None, **built) -> LabelStore:
    store = LabelStore(tmp_path / "labels.sqlite")
    store.add_items(build_items(bundle or make_bundle(), 8000, **built).items)
    return store


def test_ranks_from_groups_are_competition_ranks():
    assert ranks_from_groups([["a"], ["b", "c"], ["d"]]) == (["a", "b", "c", "d"], [1, 2, 2, 4])


def test_build_items_rejects_what_cannot_be_labelled():
    bundle = make_bundle(prompts=2)
    bundle.prompts += [Prompt(id="long", text="x" * 50), Prompt(id="alone", text="One answer only?")]
    bundle.completions += [
        Completion(id="alone-c0", prompt_id="alone", text="single", policy_version="r1"),
        Completion(id="lonely", prompt_id="p9", text="no prompt", policy_version="r1"),
        Completion(id="p1-long", prompt_id="p1", text="y" * 50, policy_version="r1"),
    ]
    built = build_items(bundle, max_text_chars=40)
    assert [item.prompt.id for item in built.items] == ["p0", "p1"]
    assert [len(item.completions) for item in built.items] == [4, 4]
    reasons = " | ".join(r.reason for r in built.rejects)
    assert "'long': text longer than labeling.max_text_chars=40" in reasons
    assert "'p1-long': text longer" in reasons
    assert "unknown or rejected prompt 'p9'" in reasons
    assert "'alone' has 1 usable completions, needs at least 2" in reasons
    assert len(built.rejects) == 4


def test_gold_items_need_a_ranking_of_known_completions():
    bundle = make_bundle(prompts=2, gold=True)
    bundle.rankings[1] = Ranking(id="bad", prompt_id="p1", completion_ids=["p1-r1-c0", "nope"], annotator_id="g")
    built = build_items(bundle, 8000, gold=True)
    assert [(item.prompt.id, item.gold.id) for item in built.items] == [("p0", "gold-p0")]
    assert any("unknown completions ['nope']" in r.reason for r in built.rejects)


def test_store_uses_wal_and_loading_twice_adds_nothing(tmp_path):
    store = store_with(tmp_path)
    assert store.add_items(build_items(make_bundle(), 8000).items) == 0
    assert store.add_items(build_items(make_bundle(round_="r2"), 8000).items) == 3  # new candidates: new items
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_tokens_are_stored_hashed_and_names_unique(tmp_path):
    store = store_with(tmp_path)
    token = store.add_annotator("ann")
    assert store.annotator_by_token(token).name == "ann"
    assert store.annotator_by_token(token + "x") is None
    assert token.encode() not in store.path.read_bytes()
    with pytest.raises(RLHFError, match="already exists"):
        store.add_annotator("ann")


def test_sessions_expire_and_end(tmp_path):
    store = store_with(tmp_path)
    annotator = store.annotator_by_token(store.add_annotator("ann"))
    session = store.start_session(annotator, hours=1)
    assert store.session_annotator(session) == annotator
    assert store.session_annotator(store.start_session(annotator, hours=-1)) is None
    store.end_session(session)
    assert store.session_annotator(session) is None


def test_each_item_goes_to_n_annotators_balanced(tmp_path):
    store = store_with(tmp_path, make_bundle(prompts=3))
    for name in ("a", "b", "c"):
        store.add_annotator(name)
    store.add_annotator("boss", admin=True)
    assert store.assign(per_item=2, gold_fraction=0.0).new == 6
    assert store.assignment_counts() == {"a": 2, "b": 2, "c": 2}
    assert store.assign(per_item=2, gold_fraction=0.0).new == 0
    store.add_items(build_items(make_bundle(prompts=3, round_="r2"), 8000).items)
    assert store.assign(per_item=2, gold_fraction=0.0).new == 6
    assert sorted(store.assignment_counts().values()) == [4, 4, 4]


def test_a_late_annotator_takes_over_open_work_but_not_the_open_item(tmp_path):
    store = store_with(tmp_path, make_bundle(prompts=8))
    first = store.annotator_by_token(store.add_annotator("first"))
    store.assign(per_item=1, gold_fraction=0.0)
    done = store.next_assignment(first)
    store.save_label(first, done.id, None, {})
    shown = store.next_assignment(first)
    late = store.annotator_by_token(store.add_annotator("late"))
    result = store.assign(per_item=1, gold_fraction=0.0)
    # first: 1 labelled + 7 open -> open queues become 4 and 3
    assert (result.new, result.moved) == (0, 3)
    assert store.assignment_counts() == {"first": 5, "late": 3}
    assert store.next_assignment(first) == shown
    assert store.progress(first).done == 1 and store.progress(late).done == 0


def test_gold_items_are_mixed_in_at_the_configured_share(tmp_path):
    store = store_with(tmp_path, make_bundle(prompts=6))
    store.add_items(build_items(make_bundle(prompts=4, round_="gold", gold=True), 8000, gold=True).items)
    store.add_annotator("a")
    store.add_annotator("b")
    store.assign(per_item=1, gold_fraction=0.25)
    # 3 regular items each; gold = 0.25 * 3 / 0.75 = 1 per annotator
    assert store.assignment_counts() == {"a": 4, "b": 4}
    assert set(store.gold_rankings()) == {"p0", "p1", "p2", "p3"}


def labelled_store(tmp_path):
    store = store_with(tmp_path, make_bundle(prompts=2))
    tokens = {name: store.add_annotator(name) for name in ("a", "b")}
    store.assign(per_item=2, gold_fraction=0.0)
    return store, {name: store.annotator_by_token(token) for name, token in tokens.items()}


def test_labels_are_checked_stored_once_and_private(tmp_path):
    store, who = labelled_store(tmp_path)
    a, b = who["a"], who["b"]
    first = store.next_assignment(a)
    ids = sorted(c.id for c in first.completions)
    with pytest.raises(InvalidLabel, match="every completion"):
        store.save_label(a, first.id, [ids[:3]], {})
    with pytest.raises(InvalidLabel, match="twice"):
        store.save_label(a, first.id, [[ids[0]], [ids[0]], ids[1:]], {})
    with pytest.raises(InvalidLabel, match="unknown flag"):
        store.save_label(a, first.id, [ids], {ids[0]: "boring"})
    with pytest.raises(NotFound):
        store.save_label(b, first.id, [ids], {})
    with pytest.raises(NotFound):
        store.assignment(b, first.id)
    store.save_label(a, first.id, [[ids[2]], [ids[0], ids[1]], [ids[3]]], {ids[3]: "nonsense"})
    with pytest.raises(AlreadyLabelled):
        store.save_label(a, first.id, [ids], {})
    assert store.progress(a).done == 1 and store.progress(a).assigned == 2
    assert store.next_assignment(a).id != first.id
    [row] = store.labels()
    assert row.ranking.completion_ids == [ids[2], ids[0], ids[1], ids[3]]
    assert row.ranking.ranks == [1, 2, 2, 4]
    assert row.ranking.flags == {ids[3]: "nonsense"} and row.ranking.source == "human"


@pytest.mark.parametrize("assignment_id", [2**64, 2**63, -(2**63) - 1, -1, 0])
def test_ids_sqlite_cannot_hold_are_not_found(tmp_path, assignment_id):
    store, who = labelled_store(tmp_path)
    with pytest.raises(NotFound):
        store.assignment(who["a"], assignment_id)
    with pytest.raises(NotFound):
        store.save_label(who["a"], assignment_id, None, {})


def test_completion_order_is_shuffled_per_assignment_but_stable(tmp_path):
    store = store_with(tmp_path, make_bundle(prompts=6))
    annotator = store.annotator_by_token(store.add_annotator("a"))
    store.assign(per_item=1, gold_fraction=0.0)
    first = store.next_assignment(annotator)
    assert store.assignment(annotator, first.id) == first
    orders = []
    while (assignment := store.next_assignment(annotator)) is not None:
        ids = [c.id for c in assignment.completions]
        orders.append(ids == sorted(ids))
        store.save_label(annotator, assignment.id, None, {})
    assert len(orders) == 6 and not all(orders)


def test_export_writes_a_readable_bundle_and_keeps_other_files(tmp_path):
    store, who = labelled_store(tmp_path)
    for name, annotator in who.items():
        while (assignment := store.next_assignment(annotator)) is not None:
            ids = sorted(c.id for c in assignment.completions)
            if name == "b" and assignment.prompt.id == "p1":
                store.save_label(annotator, assignment.id, None, {ids[0]: "unsafe"})
            else:
                store.save_label(annotator, assignment.id, [[i] for i in ids], {})
    out = tmp_path / "labels"
    out.mkdir()
    (out / "README.md").write_text("kept")
    (out / "rankings.jsonl").write_text("stale\n")
    summary = export_labels(store, out)
    assert (summary.prompts, summary.rankings, summary.skipped) == (2, 3, 1)
    bundle = PreferenceBundle.read(out)
    assert not bundle.rejects
    assert sorted(p.id for p in bundle.prompts) == ["p0", "p1"]
    assert len(bundle.completions) == 8
    assert sorted((r.prompt_id, r.annotator_id) for r in bundle.rankings) == [("p0", "a"), ("p0", "b"), ("p1", "a")]
    assert (out / "README.md").read_text() == "kept"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".labels")]  # no staging folder left
    figures = label_stats(store, GUIDE)
    assert figures.pairwise_agreement == 1.0 and figures.agreement_comparisons == 6
    assert figures.krippendorff_alpha == pytest.approx(1.0)
    assert [(s.name, s.done, s.skipped, s.flagged) for s in figures.annotators] == [("a", 2, 0, 0), ("b", 2, 1, 1)]


# -- rating and demonstration tasks -------------------------------------------------------------------------------


def test_interval_alpha_matches_krippendorffs_worked_example():
    """Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units, interval alpha 0.849."""
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[value for value in unit if value is not None] for unit in zip(*coders)]
    assert interval_alpha(units) == pytest.approx(0.849, abs=5e-4)
    assert interval_alpha([[3], [4]]) is None  # nothing pairable
    assert interval_alpha([[2, 2], [2, 2]]) is None  # no variation: alpha undefined


def test_word_edit_distance_counts_word_insertions_deletions_and_substitutions():
    assert word_edit_distance([], []) == 0
    assert word_edit_distance("a b c".split(), "a b c".split()) == 0
    assert word_edit_distance("a b c".split(), "a x c d".split()) == 2
    assert word_edit_distance("one two".split(), []) == 2


def rating_store(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    store.add_items(build_items(make_bundle(prompts=2, k=3), 8000, task="rating").items)
    who = {name: store.annotator_by_token(store.add_annotator(name)) for name in ("a", "b")}
    store.assign(per_item=2, gold_fraction=0.0)
    return store, who


def test_ratings_are_checked_exported_for_the_ratings_importer_and_agree(tmp_path):
    store, who = rating_store(tmp_path)
    a, b = who["a"], who["b"]
    first = store.next_assignment(a)
    assert first.task == "rating" and len(first.completions) == 3
    ids = sorted(c.id for c in first.completions)
    full = dict(zip(ids, (7, 4, 4)))
    for scores, match in (({ids[0]: 7}, "every completion"), ({**full, ids[0]: 0}, "from 1 to 7"),
                          ({**full, ids[0]: 8}, "from 1 to 7"), ({**full, ids[0]: True}, "whole number")):
        with pytest.raises(InvalidLabel, match=match):
            store.save_rating(a, first.id, scores, {}, {}, 8000)
    with pytest.raises(InvalidLabel, match="unknown completion"):
        store.save_rating(a, first.id, full, {"nope": "x"}, {}, 8000)
    with pytest.raises(InvalidLabel, match="over labeling.max_text_chars=10"):
        store.save_rating(a, first.id, full, {ids[0]: "y" * 11}, {}, 10)
    with pytest.raises(InvalidLabel, match="a rating task, not a ranking task"):
        store.save_label(a, first.id, [[i] for i in ids], {})
    with pytest.raises(InvalidLabel, match="not a demonstration task"):
        store.save_demonstration(a, first.id, "An answer.", 8000)
    with pytest.raises(NotFound):
        store.save_rating(b, first.id, full, {}, {}, 8000)
    store.save_rating(a, first.id, full, {ids[0]: "  Clear and complete. ", ids[1]: "   "}, {ids[2]: "unsafe"}, 8000)
    with pytest.raises(AlreadyLabelled):
        store.save_rating(a, first.id, full, {}, {}, 8000)
    # Everyone scores c0 7 and the others 4, except that b gives p1's c0 a 6.
    for annotator in (a, b):
        while (assignment := store.next_assignment(annotator)) is not None:
            scores = {c.id: 7 if c.id.endswith("c0") else 4 for c in assignment.completions}
            if annotator == b and assignment.prompt.id == "p1":
                scores["p1-r1-c0"] = 6
            store.save_rating(annotator, assignment.id, scores, {}, {}, 8000)
    assert store.progress(a).by_task == {"rating": (2, 2)}

    figures = label_stats(store, GUIDE)
    assert [(t.task, t.items, t.labels, t.skipped) for t in figures.tasks] == [("rating", 2, 4, 0)]
    assert figures.labels == 4 and figures.pairwise_agreement is None  # ratings are not rankings
    assert figures.rating.ratings == 4 and figures.rating.pairable_units == 6 and figures.rating.commented == 1
    assert figures.rating.krippendorff_alpha_interval == pytest.approx(interval_alpha([[7, 7], [4, 4], [4, 4], [7, 6], [4, 4], [4, 4]]))
    assert 0 < figures.rating.krippendorff_alpha_interval < 1

    summary = export_labels(store, tmp_path / "labels")
    assert (summary.ratings, summary.rankings, summary.demonstrations) == (4, 0, 0)
    assert not (tmp_path / "labels" / "rankings.jsonl").read_text()
    rows = [json.loads(line) for line in (tmp_path / "labels" / "ratings.jsonl").read_text().splitlines()]
    assert rows[0]["annotator_id"] == "a" and rows[0]["prompt"] == first.prompt.text
    assert [(c["id"], c["overall_score"], c["comment"], c["flag"]) for c in rows[0]["completions"]] == [
        (ids[0], 7, "Clear and complete.", None), (ids[1], 4, None, None), (ids[2], 4, None, "unsafe")]
    imported = load_preferences(tmp_path / "labels" / "ratings.jsonl", "ratings")
    assert not imported.rejects and len(imported.rankings) == 4
    assert sorted(r.annotator_id for r in imported.rankings) == ["a", "a", "b", "b"]
    assert {tuple(r.ranks) for r in imported.rankings} == {(1, 2, 2)}
    assert sorted(tuple(r.ratings) for r in imported.rankings) == [(6, 4, 4), (7, 4, 4), (7, 4, 4), (7, 4, 4)]
    assert load_preferences(tmp_path / "labels" / "ratings.jsonl", "auto").rankings  # the columns say "ratings"


def test_demonstration_items_take_every_prompt_and_at_most_one_draft():
    bundle = make_bundle(prompts=2, k=2)
    bundle.prompts.append(Prompt(id="bare", text="No draft for this one?"))
    built = build_items(bundle, 8000, task="demonstration")
    assert [(i.prompt.id, [c.id for c in i.completions], i.task) for i in built.items] == [
        ("p0", ["p0-r1-c0"], "demonstration"), ("p1", ["p1-r1-c0"], "demonstration"), ("bare", [], "demonstration")]
    assert [(r.kind, r.field) for r in built.rejects] == [("duplicate", "prompt_id")] * 2
    assert "already has the draft 'p0-r1-c0'" in built.rejects[0].reason
    ranking = build_items(make_bundle(prompts=1), 8000).items[0]
    rating = build_items(make_bundle(prompts=1), 8000, task="rating").items[0]
    assert len({ranking.key, rating.key}) == 2 and ranking.key.startswith("p0:")  # same completions, other task


def test_demonstrations_are_checked_exported_in_both_sft_forms_and_measured(tmp_path):
    bundle = make_bundle(prompts=2, k=1)
    bundle.prompts.append(Prompt(id="bare", text="Write from scratch?"))
    store = LabelStore(tmp_path / "labels.sqlite")
    store.add_items(build_items(bundle, 8000, task="demonstration").items)
    store.add_items(build_items(make_bundle(prompts=1, round_="rank"), 8000).items)
    ann = store.annotator_by_token(store.add_annotator("ann"))
    store.assign(per_item=1, gold_fraction=0.0)
    assert store.progress(ann).by_task == {"ranking": (0, 1), "demonstration": (0, 3)}
    texts = {"p0": "Answer p0-r1-c0.", "p1": "A better answer, in full words.", "bare": "Written from scratch."}
    while (assignment := store.next_assignment(ann)) is not None:
        if assignment.task == "ranking":
            store.save_label(ann, assignment.id, None, {})
            continue
        for text, match in (("  \n ", "empty"), ("z" * 41, "41 characters, over labeling.max_text_chars=40")):
            with pytest.raises(InvalidLabel, match=match):
                store.save_demonstration(ann, assignment.id, text, 40)
        with pytest.raises(InvalidLabel, match="not a rating task"):
            store.save_rating(ann, assignment.id, {}, {}, {}, 8000)
        store.save_demonstration(ann, assignment.id, texts[assignment.prompt.id], 8000)
        with pytest.raises(AlreadyLabelled):
            store.save_demonstration(ann, assignment.id, "again", 8000)

    figures = label_stats(store, (2, 5))
    assert [(t.task, t.items, t.labels, t.skipped) for t in figures.tasks] == [
        ("ranking", 1, 1, 1), ("demonstration", 3, 3, 0)]
    d = figures.demonstration
    assert (d.demonstrations, d.with_draft, d.unchanged_drafts) == (3, 2, 1)
    assert (d.mean_words, d.median_words, d.within_guide) == (pytest.approx(11 / 3), 3, pytest.approx(2 / 3))
    # words 2, 6, 3 (two inside 2-5); p0 unchanged (0 edits); p1: a 2-word draft became 6 other words (6 edits of 6)
    assert d.mean_edit_distance == 3 and d.mean_relative_edit_distance == pytest.approx(0.5)

    summary = export_labels(store, tmp_path / "labels")
    assert (summary.demonstrations, summary.rankings, summary.skipped) == (3, 0, 1)
    rows = [json.loads(line) for line in (tmp_path / "labels" / "demonstrations.jsonl").read_text().splitlines()]
    chats = [json.loads(line) for line in (tmp_path / "labels" / "demonstrations_messages.jsonl").read_text().splitlines()]
    by_prompt = {row["prompt_id"]: row for row in rows}
    assert by_prompt["p1"]["prompt"] == "Prompt number 1?" and by_prompt["p1"]["completion"] == texts["p1"]
    assert (by_prompt["p1"]["draft_id"], by_prompt["bare"]["draft_id"]) == ("p1-r1-c0", None)
    assert {row["annotator_id"] for row in rows} == {"ann"} and all(row["created_at"] for row in rows)
    assert [chat["messages"] for chat in chats] == [
        [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}] for row in rows]
    assert [chat["id"] for chat in chats] == [row["id"] for row in rows]
    # A second export replaces the files instead of carrying the old ones over as unknown extras.
    (tmp_path / "labels" / "notes.txt").write_text("kept")
    export_labels(store, tmp_path / "labels")
    assert len((tmp_path / "labels" / "demonstrations.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "labels" / "notes.txt").read_text() == "kept"


def test_a_store_made_before_the_task_columns_gains_them_and_keeps_its_items(tmp_path):
    old_schema = (SCHEMA.replace(",\n    task TEXT NOT NULL DEFAULT 'ranking'", "")
                  .replace(",\n    text TEXT,\n    scores_json TEXT,\n    comments_json TEXT", ""))
    assert "task TEXT" not in old_schema and "scores_json" not in old_schema
    path = tmp_path / "labels.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO items (item_key, prompt_id, prompt_json, completions_json, loaded_at) VALUES (?, ?, ?, ?, ?)",
                   ("p0:old", "p0", Prompt(id="p0", text="Old?").model_dump_json(), json.dumps(
                       [Completion(id=f"c{i}", prompt_id="p0", text=f"A{i}", policy_version="v").model_dump() for i in (0, 1)]),
                    "2026-01-01T00:00:00+00:00"))
    store = LabelStore(path)
    ann = store.annotator_by_token(store.add_annotator("ann"))
    store.assign(per_item=1, gold_fraction=0.0)
    assignment = store.next_assignment(ann)
    assert assignment.task == "ranking"
    store.save_label(ann, assignment.id, [["c0"], ["c1"]], {})
    assert store.labels()[0].ranking.completion_ids == ["c0", "c1"]
