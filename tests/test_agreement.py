"""Agreement statistics on hand-computed examples."""

import pytest

from rlhf_core.agreement import agreement_with_gold, krippendorff_alpha, pairwise_agreement
from rlhf_core.schemas import Ranking


def ranking(annotator: str, order: list[str], ranks: list[int] | None = None, prompt: str = "p1") -> Ranking:
    return Ranking(
        id=f"{prompt}-{annotator}", prompt_id=prompt, completion_ids=order, ranks=ranks, annotator_id=annotator
    )


def test_identical_rankings_agree_fully():
    rankings = [ranking("a", ["x", "y", "z"]), ranking("b", ["x", "y", "z"])]
    report = pairwise_agreement(rankings)
    assert report.agreement == 1.0
    assert report.comparisons == 3
    assert report.per_annotator == {"a": 1.0, "b": 1.0}
    assert krippendorff_alpha(rankings) == pytest.approx(1.0)


def test_reversed_ranking_agrees_on_nothing():
    rankings = [ranking("a", ["x", "y", "z"]), ranking("b", ["z", "y", "x"])]
    assert pairwise_agreement(rankings).agreement == 0.0
    # Units x:(1,3) y:(2,2) z:(3,1); n_c = 2 each, n = 6; ordinal delta^2: (1,2)=(2,3)=4, (1,3)=16.
    # observed sum o*delta = 4*16 = 64, expected sum n_c*n_k*delta = 2*(16+16+64) = 192 -> 1 - 5*64/192.
    assert krippendorff_alpha(rankings) == pytest.approx(-2 / 3)


def test_one_swapped_pair():
    rankings = [ranking("a", ["x", "y", "z"]), ranking("b", ["x", "z", "y"])]
    assert pairwise_agreement(rankings).agreement == pytest.approx(2 / 3)
    # Units x:(1,1) y:(2,3) z:(3,2): observed sum = 4 * delta^2(2,3) = 16 -> 1 - 5*16/192.
    assert krippendorff_alpha(rankings) == pytest.approx(7 / 12)


def test_ties_get_half_credit_and_shared_ties_full_credit():
    tied = ranking("a", ["x", "y", "z"], ranks=[1, 1, 3])
    strict = ranking("b", ["x", "y", "z"])
    # (x,y): tie vs strict -> 1/2; (x,z), (y,z): same order -> 1 each.
    assert pairwise_agreement([tied, strict]).agreement == pytest.approx(2.5 / 3)
    also_tied = ranking("c", ["y", "x", "z"], ranks=[1, 1, 3], prompt="p1")
    assert pairwise_agreement([tied, also_tied]).agreement == 1.0


def test_per_annotator_agreement_and_comparisons():
    rankings = [
        ranking("a", ["x", "y"]),
        ranking("b", ["x", "y"]),
        ranking("c", ["y", "x"]),
    ]
    report = pairwise_agreement(rankings)
    # Pairs of annotators: a-b agree, a-c and b-c disagree.
    assert report.comparisons == 3
    assert report.agreement == pytest.approx(1 / 3)
    assert report.per_annotator == {"a": 0.5, "b": 0.5, "c": 0.0}


def test_no_overlap_gives_none():
    rankings = [ranking("a", ["x", "y"], prompt="p1"), ranking("b", ["u", "v"], prompt="p2")]
    report = pairwise_agreement(rankings)
    assert report.agreement is None and report.comparisons == 0 and report.per_annotator == {}
    assert krippendorff_alpha(rankings) is None


def test_latest_ranking_of_an_annotator_counts_once():
    old = ranking("a", ["y", "x"]).model_copy(update={"id": "old"})
    new = ranking("a", ["x", "y"])
    new = new.model_copy(update={"created_at": old.created_at.replace(year=old.created_at.year + 1)})
    report = pairwise_agreement([old, new, ranking("b", ["x", "y"])])
    assert report.agreement == 1.0 and report.comparisons == 1


def test_alpha_matches_krippendorffs_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", 4 observers x 12 units, values 1-5,
    # missing values allowed; published ordinal alpha = 0.815.  Each observer's values become one ranking
    # of the units it coded (sorted, values as ranks); unit 12 has a single value and is not pairable.
    data = {
        "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    }
    rankings = []
    for observer, values in data.items():
        coded = sorted((v, f"u{i}") for i, v in enumerate(values) if v is not None)
        rankings.append(ranking(observer, [u for _, u in coded], ranks=[v for v, _ in coded]))
    assert krippendorff_alpha(rankings) == pytest.approx(0.815, abs=5e-4)


def test_agreement_with_gold():
    gold = {"p1": ranking("gold", ["x", "y", "z"]), "p2": ranking("gold", ["u", "v"], prompt="p2")}
    rankings = [
        ranking("a", ["x", "y", "z"]),
        ranking("a", ["v", "u"], prompt="p2"),
        ranking("b", ["z", "y", "x"]),
        ranking("b", ["w", "q"], prompt="p3"),
    ]
    # a: 3 of 3 pairs on p1, 0 of 1 on p2 -> 3/4; b: 0 of 3 on p1; p3 has no gold.
    assert agreement_with_gold(rankings, gold) == {"a": 0.75, "b": 0.0}


def test_only_shared_completions_are_compared_and_never_an_annotator_with_itself():
    rankings = [
        ranking("a", ["x", "y", "z"]),
        ranking("a", ["u", "v"]).model_copy(update={"id": "a-round2"}),  # same prompt, new candidates
        ranking("b", ["y", "x", "w"]),  # shares x and y with a's first ranking only
    ]
    report = pairwise_agreement(rankings)
    assert report.comparisons == 1 and report.agreement == 0.0
