"""Simulated annotators: deterministic, follow the gold, calibrated to InstructGPT's agreement."""

from datetime import datetime, timezone

import numpy as np
import pytest

from rlhf_core.agreement import pairwise_agreement
from rlhf_core.annotators import Annotator, annotator_pool, assign_annotators, rank_completions, simulate_rankings
from rlhf_core.config import load_params
from rlhf_core.schemas import Completion, Prompt

from .conftest import REPO

WHEN = datetime(2026, 1, 1, tzinfo=timezone.utc)
LABELING = load_params(REPO / "params.yaml").labeling


def completions_for(prompt_id: str, texts: list[str]) -> list[Completion]:
    return [Completion(id=f"{prompt_id}-{i}", prompt_id=prompt_id, text=t, policy_version="test") for i, t in enumerate(texts)]


def test_noise_free_annotator_ranks_by_gold():
    prompt = Prompt(id="p", text="How do I keep basil alive on a windowsill?")
    texts = [
        "Basil",
        "Water basil when the soil feels dry, give the windowsill plant six hours of sun and pinch off flowers so "
        "it keeps growing leaves.",
        "Basil is a plant that likes water and sun and you should probably think about the windowsill because",
    ]
    ranking = rank_completions(prompt, completions_for("p", texts), Annotator("a", 0.0), noise=0.0, seed=0, created_at=WHEN)
    assert ranking.completion_ids == ["p-1", "p-2", "p-0"]
    assert ranking.ranks == [1, 2, 3] and ranking.source == "simulated"


def test_identical_texts_are_tied():
    prompt = Prompt(id="p", text="Name a colour.")
    group = completions_for("p", ["Blue is a calm colour.", "Red.", "Blue is a calm colour."])
    ranking = rank_completions(prompt, group, Annotator("a", 0.0), noise=1.0, seed=3, created_at=WHEN)
    rank = ranking.rank_of()
    assert rank["p-0"] == rank["p-2"] != rank["p-1"]


def test_length_bias_decides_between_equally_good_answers():
    prompt = Prompt(id="p", text="Say something.")
    group = completions_for("p", ["short one", "a much longer answer than the other one"])
    likes_long = rank_completions(prompt, group, Annotator("a", 2.0), noise=0.0, seed=0, created_at=WHEN, gold=[0.5, 0.5])
    likes_short = rank_completions(prompt, group, Annotator("b", -2.0), noise=0.0, seed=0, created_at=WHEN, gold=[0.5, 0.5])
    assert likes_long.completion_ids[0] == "p-1" and likes_short.completion_ids[0] == "p-0"


def synthetic_project(num_prompts: int, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [Prompt(id=f"p{i}", text=f"Prompt {i}") for i in range(num_prompts)]
    groups = {p.id: completions_for(p.id, [" ".join(["word"] * int(n)) for n in rng.integers(5, 60, k)]) for p in prompts}
    golds = {p.id: rng.normal(size=k).tolist() for p in prompts}
    return prompts, groups, golds


def rank_all(prompts, groups, golds, pool, assignments, noise, seed=0):
    return [
        rank_completions(p, groups[p.id], pool[i], noise=noise, seed=seed, created_at=WHEN, gold=golds[p.id])
        for p in prompts
        for i in assignments[p.id]
    ]


def test_default_noise_is_calibrated_to_instructgpt_agreement():
    prompts, groups, golds = synthetic_project(400)
    pool = annotator_pool(LABELING.num_annotators, LABELING.bias_scale, LABELING.seed)
    assignments = assign_annotators([p.id for p in prompts], len(pool), 1.0, 2, LABELING.seed)
    report = pairwise_agreement(rank_all(prompts, groups, golds, pool, assignments, LABELING.noise))
    assert report.comparisons == 400 * 6
    assert 0.68 <= report.agreement <= 0.78
    # Noise is what the calibration turns: far less of it and annotators agree far more.
    quiet = pairwise_agreement(rank_all(prompts, groups, golds, pool, assignments, LABELING.noise / 4))
    assert quiet.agreement > 0.85


def test_rankings_are_deterministic_by_seed_and_independent_of_order():
    prompts, groups, golds = synthetic_project(30)
    pool = annotator_pool(4, 0.1, 0)
    assignments = assign_annotators([p.id for p in prompts], 4, 0.5, 2, 0)
    first = rank_all(prompts, groups, golds, pool, assignments, 0.7)
    again = rank_all(list(reversed(prompts)), groups, golds, pool, assignments, 0.7)
    assert sorted(r.model_dump_json() for r in first) == sorted(r.model_dump_json() for r in again)
    other_seed = rank_all(prompts, groups, golds, pool, assignments, 0.7, seed=1)
    assert [r.completion_ids for r in first] != [r.completion_ids for r in other_seed]
    assert annotator_pool(4, 0.1, 0) == pool != annotator_pool(4, 0.1, 1)


def test_overlap_assignment():
    ids = [f"p{i}" for i in range(40)]
    assignments = assign_annotators(ids, 8, 0.25, 3, seed=0)
    sizes = [len(assignments[pid]) for pid in ids]
    assert sizes.count(3) == 10 and sizes.count(1) == 30
    assert all(len(set(a)) == len(a) and all(0 <= i < 8 for i in a) for a in assignments.values())
    assert assign_annotators(ids, 8, 0.25, 3, seed=0) == assignments
    assert sum(len(a) for a in assign_annotators(ids, 8, 0.0, 3, seed=0).values()) == 40


def test_simulate_rankings_covers_every_rankable_prompt():
    prompts = [Prompt(id=f"p{i}", text=f"Tell me about topic {i}.") for i in range(8)]
    completions = [c for p in prompts[:7] for c in completions_for(p.id, [f"Topic {p.id} is fine.", "No idea", "Well"])]
    completions += completions_for("p7", ["Only one answer here."])
    rankings = simulate_rankings(
        prompts, completions, num_annotators=3, noise=0.7, bias_scale=0.1, overlap_fraction=0.5,
        annotators_per_overlap=2, seed=0, created_at=WHEN,
    )
    per_prompt = {}
    for ranking in rankings:
        per_prompt.setdefault(ranking.prompt_id, []).append(ranking.annotator_id)
    assert set(per_prompt) == {f"p{i}" for i in range(7)}  # p7 has a single completion: nothing to rank
    assert sorted(len(a) for a in per_prompt.values()) == [1, 1, 1, 2, 2, 2, 2]
    assert all(len(set(a)) == len(a) for a in per_prompt.values())
    assert len({r.id for r in rankings}) == len(rankings)
    assert all(sorted(r.completion_ids) == [f"{r.prompt_id}-{i}" for i in range(3)] for r in rankings)


@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_gold_standardisation_makes_rankings_scale_free(noise):
    prompt = Prompt(id="p", text="x")
    group = completions_for("p", ["a", "b b", "c c c", "d d d d"])
    gold = [0.1, 0.4, 0.2, 0.3]
    small = rank_completions(prompt, group, Annotator("a", 0.1), noise=noise, seed=0, created_at=WHEN, gold=gold)
    large = rank_completions(prompt, group, Annotator("a", 0.1), noise=noise, seed=0, created_at=WHEN, gold=[10 * g for g in gold])
    assert small.completion_ids == large.completion_ids
