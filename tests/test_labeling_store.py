"""The labelling store: items, tokens, assignments, labels, export and statistics (no web server)."""

from __future__ import annotations

import sqlite3

import pytest

from rlhf_core.errors import RLHFError
from rlhf_core.labeling.export import export_labels
from rlhf_core.labeling.items import build_items
from rlhf_core.labeling.stats import label_stats
from rlhf_core.labeling.store import AlreadyLabelled, InvalidLabel, LabelStore, NotFound, ranks_from_groups
from rlhf_core.preferences import PreferenceBundle
from rlhf_core.schemas import Completion, Prompt, Ranking


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
    figures = label_stats(store)
    assert figures.pairwise_agreement == 1.0 and figures.agreement_comparisons == 6
    assert figures.krippendorff_alpha == pytest.approx(1.0)
    assert [(s.name, s.done, s.skipped, s.flagged) for s in figures.annotators] == [("a", 2, 0, 0), ("b", 2, 1, 1)]
