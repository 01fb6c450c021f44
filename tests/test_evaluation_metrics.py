"""Evaluation metrics on hand-computed inputs."""

import math
import random
import statistics
from itertools import combinations

import pytest
import torch

from rlhf_core.evaluation.best_of_n import best_of_n_kl, expected_best_of_n, frontier, subset_max_weights
from rlhf_core.evaluation.human_eval import CANDIDATE, blind_task, human_win_rates, read_key, write_task
from rlhf_core.evaluation.metrics import (
    Z_95 as Z,
    distinct_n,
    length_stats,
    mean_interval,
    perplexity,
    prompt_win_rate,
    repetition_rate,
    t_quantile,
    wilson_interval,
    win_rate,
)
from rlhf_core.evaluation.overoptimisation import Gain, assess, gold_trend, paired_gain
from rlhf_core.evaluation.report import Responses, compare
from rlhf_core.schemas import Prompt, Ranking


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(8, 10)
    # p = 0.8, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96 / 1.38416 * sqrt(0.016 + 0.009604)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    narrow, wide = wilson_interval(50, 100), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_win_rate_counts_ties_as_half():
    rate = win_rate([1, 2, 3, 4], [0, 2, 5, 1])
    assert (rate.wins, rate.ties, rate.losses) == (2, 1, 1)
    assert rate.rate == 0.625
    assert rate.interval == wilson_interval(2.5, 4)
    even = win_rate([1, 1, 1, 1], [1, 1, 1, 1])
    assert even.rate == 0.5 and 0.5 - even.interval[0] == pytest.approx(even.interval[1] - 0.5)
    metrics = rate.as_metrics("eval/x")
    assert metrics["eval/x"] == 0.625 and metrics["eval/x_n"] == 4 and metrics["eval/x_low"] < 0.625 < metrics["eval/x_high"]
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_prompt_win_rate_pits_every_response_against_every_other_to_the_same_prompt():
    # prompt 0: 3>1, 3>2, 4>1, 4>2 -> 4 of 4; prompt 1: 1<2, 1<3, 2=2, 2<3 -> 0.5 of 4
    rate = prompt_win_rate([[3, 4], [1, 2]], [[1, 2], [2, 3]])
    assert (rate.wins, rate.ties, rate.losses, rate.n) == (4, 1, 3, 8)
    assert rate.rate == pytest.approx(4.5 / 8)
    # shares 1 and 0.125: 2 prompts x p(1-p) / var = 2 x 0.24609 / 0.19141 = 18/7 of the 8 pairs
    assert rate.effective_n == pytest.approx(18 / 7)
    assert rate.interval == pytest.approx(wilson_interval(rate.rate * rate.effective_n, rate.effective_n))
    metrics = rate.as_metrics("eval/x")
    assert metrics["eval/x_n"] == 8 and metrics["eval/x_effective_n"] == pytest.approx(rate.effective_n)
    # one response a side is the paired win rate, bit for bit (ties and Wilson at the prompt count)
    assert prompt_win_rate([[1], [2], [3], [4]], [[0], [2], [5], [1]]) == win_rate([1, 2, 3, 4], [0, 2, 5, 1])
    # prompts that are won or lost whole are worth one comparison each; equal shares, every pair
    assert prompt_win_rate([[5, 6], [0, 1]], [[1, 2], [3, 4]]).effective_n == 2
    assert prompt_win_rate([[5, 0], [5, 0]], [[1, 2], [1, 2]]).effective_n == 8
    assert prompt_win_rate([[1, 3]], [[2]]).rate == 0.5  # two responses against one: two pairs
    for a, b in (([[1, 2], [3]], [[1], [2]]), ([[1], [3]], [[1, 2], [3]]), ([[1]], []), ([[]], [[1]])):
        with pytest.raises(ValueError):
            prompt_win_rate(a, b)


def _coverage(k: int, prompts: int, trials: int, naive: bool) -> float:
    """Share of simulated evaluations whose 95% interval holds the true win rate; each prompt has its own advantage
    of the candidate (a prompt effect), so the pairs of one prompt are correlated."""
    import random

    rng = random.Random(7)
    effects = [rng.gauss(0.2, 1.0) for _ in range(20_000)]
    truth = sum(0.5 * (1 + math.erf(e / 2)) for e in effects) / len(effects)  # P(N(e, 1) > N(0, 1)), averaged
    hits = 0
    for _ in range(trials):
        a, b = [], []
        for _ in range(prompts):
            effect = rng.gauss(0.2, 1.0)
            a.append([rng.gauss(effect, 1.0) for _ in range(k)])
            b.append([rng.gauss(0.0, 1.0) for _ in range(k)])
        rate = prompt_win_rate(a, b)
        low, high = wilson_interval(rate.rate * rate.n, rate.n) if naive else rate.interval
        hits += low <= truth <= high
    return hits / trials


def test_prompt_win_rate_interval_holds_its_coverage_with_correlated_pairs():
    assert 0.92 <= _coverage(k=2, prompts=60, trials=400, naive=False) <= 0.98
    assert 0.92 <= _coverage(k=1, prompts=60, trials=400, naive=False) <= 0.98
    # counting every pair as independent would claim more than the data hold
    assert _coverage(k=2, prompts=60, trials=400, naive=True) < 0.88


def test_responses_group_by_prompt():
    responses = Responses("candidate", list("abcdef"), [[1]] * 6, [True] * 6, [1, 2, 3, 4, 5, 6], [0, 1, 1, 0, 2, 2], 2)
    assert responses.per_prompt(responses.gold) == [[0, 1], [1, 0], [2, 2]]
    assert responses.prompt_means(responses.proxy) == [1.5, 3.5, 5.5] and responses.firsts(responses.texts) == ["a", "c", "e"]
    other = Responses("reference", list("uvwxyz"), [[1]] * 6, [True] * 6, [0] * 6, [1, 1, 0, 0, 3, 3], 2)
    assert compare(responses, other, "gold") == prompt_win_rate([[0, 1], [1, 0], [2, 2]], [[1, 1], [0, 0], [3, 3]])


def test_distinct_n_over_the_whole_set():
    sequences = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(sequences, 1) == pytest.approx(4 / 6)
    assert distinct_n(sequences, 2) == pytest.approx(3 / 4)
    assert distinct_n([[7] * 10], 2) == pytest.approx(1 / 9)
    assert distinct_n([[1]], 2) == 0.0


def test_repetition_rate_is_mean_seq_rep_n():
    assert repetition_rate([[5, 5, 5, 5]], 2) == pytest.approx(2 / 3)
    assert repetition_rate([[1, 2, 3]], 2) == 0.0
    assert repetition_rate([[5, 5, 5, 5], [1, 2, 3], [1]], 2) == pytest.approx((2 / 3) / 3)
    assert repetition_rate([[1, 2, 1, 2, 1, 2]], 2) == pytest.approx(1 - 2 / 5)


def test_length_stats_perplexity_and_mean_interval():
    stats = length_stats([1, 2, 3, 10])
    assert stats["mean"] == 4 and stats["median"] == 2.5 and stats["min"] == 1 and stats["max"] == 10
    assert perplexity(2 * math.log(0.5), 2) == pytest.approx(2.0)
    mean, low, high = mean_interval([1.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(1.959963984540054 * math.sqrt(2) / math.sqrt(2))
    assert mean_interval([1.0])[1] == -math.inf


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    kls = [best_of_n_kl(n) for n in (1, 2, 4, 8, 16, 64)]
    assert kls == sorted(kls)


def test_best_of_n_estimator_equals_the_mean_over_all_subsets():
    proxy, gold = [0.1, 0.9, 0.5, 0.3], [10.0, 20.0, 30.0, 40.0]
    assert subset_max_weights(4, 2) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    assert expected_best_of_n(proxy, gold, 1) == pytest.approx(25.0)
    assert expected_best_of_n(proxy, gold, 4) == 20.0  # the proxy's favourite (0.9) has gold 20
    assert expected_best_of_n(proxy, gold, 2) == pytest.approx(160 / 6)
    for n in (1, 2, 3, 4):
        subsets = list(combinations(range(4), n))
        brute = sum(gold[max(s, key=lambda i: proxy[i])] for s in subsets) / len(subsets)
        assert expected_best_of_n(proxy, gold, n) == pytest.approx(brute)
    with pytest.raises(ValueError):
        subset_max_weights(4, 5)


def test_frontier_averages_prompts_and_has_the_analytic_kl():
    points = frontier([[0.0, 1.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, 5.0]], [1, 2])
    assert [p.n for p in points] == [1, 2] and points[1].kl == pytest.approx(best_of_n_kl(2))
    assert points[0].proxy == pytest.approx(0.75) and points[1].proxy == pytest.approx(1.5)
    assert points[1].gold == pytest.approx((0.0 + 0.0) / 2)  # the proxy picks the gold-0 sample in both pools
    assert frontier([[0.0, 1.0]], None, [2])[0].gold is None
    # the gain over one reference sample, prompt by prompt: best-of-1 gains nothing; best-of-2 here loses
    # 0.5 (pool 0: gold 0 against a mean of 0.5) and 2.5 (pool 1: 0 against 2.5)
    assert points[0].gold_gain == 0.0 and points[0].gold_gain_interval == (0.0, 0.0)
    assert points[1].gold_gain == pytest.approx(-1.5)
    low, high = points[1].gold_gain_interval
    assert low == pytest.approx(-1.5 - Z) and high == pytest.approx(-1.5 + Z)  # stdev sqrt(2) over 2 prompts
    single = frontier([[0.0, 1.0]], [[1.0, 0.0]], [2])[0]
    assert single.gold_gain == pytest.approx(-0.5) and single.gold_gain_interval is None  # one prompt: no spread


def _curve(golds, proxies):
    return [{"update": float(i), "kl": 0.1 * i, "score": p, "gold": g, "gold_proxy": p} for i, (g, p) in enumerate(zip(golds, proxies))]


def test_gold_falling_while_proxy_rises_along_ppo_is_flagged():
    trend = gold_trend(_curve([0.1, 0.3, 0.2, 0.1], [0.0, 0.5, 1.0, 1.5]))
    assert (trend.peak, trend.last, trend.peak_update) == (0.3, 0.1, 1)
    flat = Gain(0.0, -1.0, 1.0)
    assert assess(flat, None, trend, tolerance=0.05).flagged
    assert not assess(flat, None, trend, tolerance=0.5).flagged
    rising = gold_trend(_curve([0.1, 0.2, 0.3, 0.35], [0.0, 0.5, 1.0, 1.5]))
    assert not assess(flat, None, rising, tolerance=0.0).flagged
    assert gold_trend(_curve([0.1], [0.0])) is None


def _probes(golds_per_probe):
    """Per-prompt probe rows as ``plots/ppo_gold_probe.csv`` holds them: update 4 x probe index."""
    return [{"update": 4.0 * u, "prompt": float(i), "gold": g} for u, golds in enumerate(golds_per_probe) for i, g in enumerate(golds)]


def _means(golds_per_probe, proxies):
    return [{"update": 4.0 * u, "gold": sum(g) / len(g), "gold_proxy": p} for u, (g, p) in enumerate(zip(golds_per_probe, proxies))]


def test_a_real_fall_along_ppo_is_flagged_by_the_paired_test():
    rng = random.Random(0)
    base = [rng.gauss(0.6, 0.15) for _ in range(16)]
    probes = [[b + rng.gauss(0, 0.05) for b in base] for _ in range(4)] + [[b - 0.3 + rng.gauss(0, 0.05) for b in base]]
    proxies = [0.0, 0.2, 0.4, 0.6, 0.8]
    trend = gold_trend(_means(probes, proxies), _probes(probes))
    assert len(trend.drops) == 4 and all(d.mean == pytest.approx(0.3, abs=0.05) and d.low > 0.2 for d in trend.drops)
    verdict = assess(Gain(0.0, -1.0, 1.0), None, trend, tolerance=0.05)
    assert verdict.flagged and "on the same prompts" in verdict.reasons[0] and "4 earlier probes" in verdict.reasons[0]
    # the proxy fell with it: gold and proxy agree, nothing is over-optimised
    assert not assess(Gain(0.0, -1.0, 1.0), None, gold_trend(_means(probes, proxies[::-1]), _probes(probes)), 0.05).flagged
    # a fall smaller than the tolerance is not flagged, however significant
    assert not assess(Gain(0.0, -1.0, 1.0), None, trend, tolerance=0.35).flagged


def test_an_unchanged_policy_is_rarely_flagged_along_ppo_where_the_means_alone_flag_it_often():
    """Five probes of one policy on 16 prompts (prompt effect + answer noise of the real run's size), proxy drifting
    up by chance: the best of the earlier means sits above the last one by chance; the paired, Bonferroni-split
    test holds its 5% level."""
    rng = random.Random(1)
    runs, by_means, by_pairs = 400, 0, 0
    for _ in range(runs):
        base = [rng.gauss(0.6, 0.15) for _ in range(16)]
        probes = [[b + rng.gauss(0, 0.24) for b in base] for _ in range(5)]
        rows = _means(probes, [0.1 * u for u in range(5)])
        by_means += gold_trend(rows).overoptimised(0.05)
        by_pairs += gold_trend(rows, _probes(probes)).overoptimised(0.05)
    assert by_means / runs > 0.3
    assert by_pairs / runs < 0.05


def test_the_paired_test_needs_every_probe_per_prompt_else_the_means_decide():
    probes = [[0.6, 0.7, 0.5], [0.9, 0.9, 0.9], [0.2, 0.3, 0.1]]
    rows = _means(probes, [0.0, 0.5, 1.0])
    missing_middle = [r for r in _probes(probes) if r["update"] != 4.0]
    for probe in ([], missing_middle, [r for r in _probes(probes) if r["update"] != 8.0]):
        trend = gold_trend(rows, probe)
        assert trend.drops == () and trend.overoptimised(0.05)  # the means' rule: 0.9 -> 0.2 with the proxy up
    assert gold_trend(rows, _probes(probes)).drops != ()


def test_eval_level_overoptimisation_needs_both_moves_to_be_significant():
    proxy_up = paired_gain([1.0, 1.2, 0.9, 1.1], [0.0, 0.1, -0.1, 0.0])
    gold_down = paired_gain([0.1, 0.0, 0.1, 0.0], [0.5, 0.4, 0.6, 0.5])
    verdict = assess(proxy_up, gold_down, None, tolerance=0.05)
    assert verdict.flagged and "proxy rose" in verdict.reasons[0]
    assert not assess(proxy_up, paired_gain([0.5, 0.4], [0.5, 0.4]), None, 0.05).flagged


def test_blind_task_hides_the_policies_and_scores_returned_rankings(tmp_path):
    prompts = [Prompt(id=f"p{i}", text=f"question {i}") for i in range(6)]
    responses = {"candidate": [f"cand {i}" for i in range(6)], "reference": [f"ref {i}" for i in range(6)]}
    task = blind_task(prompts, responses, salt="s3cret", seed=0)
    folder = write_task(task, tmp_path / "human_eval")
    assert sorted(p.name for p in folder.iterdir()) == ["completions.jsonl", "prompts.jsonl", "rankings.jsonl"]
    shown = (folder / "completions.jsonl").read_text()
    assert "candidate" not in shown and "reference" not in shown
    assert read_key(tmp_path / "human_eval") == task.key
    firsts = {task.key[c.id] for c in task.bundle.completions[::2]}
    assert firsts == {"candidate", "reference"}  # the order within items is shuffled
    assert all(p.source == "human_eval" for p in task.bundle.prompts)

    by_prompt = {}
    for c in task.bundle.completions:
        by_prompt.setdefault(c.prompt_id, {})[task.key[c.id]] = c.id
    rankings = []
    for i, (prompt_id, ids) in enumerate(by_prompt.items()):
        order = [ids[CANDIDATE], ids["reference"]] if i < 3 else [ids["reference"], ids[CANDIDATE]]
        ranks = [1, 1] if i == 5 else None
        rankings.append(Ranking(id=f"r{i}", prompt_id=prompt_id, completion_ids=order, ranks=ranks, annotator_id="a"))
    rankings.append(Ranking(id="other", prompt_id="x", completion_ids=["u", "v"], annotator_id="a"))
    rates = human_win_rates(rankings, task.key)
    assert set(rates) == {"reference"}
    assert (rates["reference"].wins, rates["reference"].ties, rates["reference"].losses) == (3, 1, 2)


def test_response_logprobs_match_an_unpadded_forward(tiny_base_model):
    from rlhf_core.base_model import load_causal_lm, load_tokenizer
    from rlhf_core.evaluation.likelihood import response_logprobs
    from rlhf_core.generation import chat_prompt

    model, tokenizer = load_causal_lm(tiny_base_model).eval(), load_tokenizer(tiny_base_model)
    prompts = ["Explain how tides work in two sentences, please.", "Hi", "Why?"]
    responses = [[5, 6], [100, 200, 300], [7]]
    got = response_logprobs(model, tokenizer, prompts, responses, temperature=0.7, batch_size=2)
    # Forced into one row per pass, the rows still come back in input order with the same values.
    alone = response_logprobs(model, tokenizer, prompts, responses, temperature=0.7, batch_size=2, max_batch_tokens=1)
    assert alone == pytest.approx(got, abs=1e-4)
    for prompt, response, value in zip(prompts, responses, got):
        query = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").input_ids[0]
        ids = torch.cat([query, torch.tensor(response)]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(query) - 1 : -1]
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(response).unsqueeze(-1)).sum()
        assert value == pytest.approx(float(expected), abs=1e-4)


def test_sampled_logprobs_equal_a_forward_pass_over_the_responses(tiny_base_model):
    """Evaluation takes the candidate's own log-probs from its sampler: they must be what a scoring pass computes."""
    from rlhf_core.base_model import load_causal_lm, load_tokenizer
    from rlhf_core.evaluation.likelihood import response_logprobs
    from rlhf_core.generation import sample_completions

    model, tokenizer = load_causal_lm(tiny_base_model).eval(), load_tokenizer(tiny_base_model)
    prompts = ["Explain how tides work in two sentences, please.", "Hi", "Why is the sky blue?"]
    samples, _ = sample_completions(model, tokenizer, prompts, num_samples=2, max_new_tokens=6, temperature=0.8, batch_size=4, seed=3)
    scored = response_logprobs(
        model, tokenizer, [prompts[s.prompt_index] for s in samples], [s.token_ids for s in samples], temperature=0.8, batch_size=4
    )
    assert all(s.logprob < 0 for s in samples)
    assert [s.logprob for s in samples] == pytest.approx(scored, abs=1e-3)


def test_length_batches_sort_by_length_and_respect_both_caps():
    from rlhf_core.evaluation.likelihood import length_batches

    lengths = [(40, 10), (10, 5), (12, 5), (80, 30), (11, 4)]
    assert length_batches(lengths, batch_size=8, max_tokens=10_000) == [[1, 4, 2, 0, 3]]
    assert length_batches(lengths, batch_size=2, max_tokens=10_000) == [[1, 4], [2, 0], [3]]
    # 3 rows of the first three (widths 12 + 5) fit in 60 tokens, the 40-token query does not join them.
    assert length_batches(lengths, batch_size=8, max_tokens=60) == [[1, 4, 2], [0], [3]]
    assert length_batches([(500, 500)], batch_size=8, max_tokens=10) == [[0]]  # an over-long row still runs
    assert length_batches([], batch_size=8, max_tokens=10) == []


@pytest.mark.parametrize(("p", "df", "exact"), [(0.975, 5, 2.57058), (0.975, 15, 2.13145), (0.9875, 15, 2.48988), (0.995, 30, 2.75000)])
def test_t_quantile_matches_the_table(p, df, exact):
    assert t_quantile(p, df) == pytest.approx(exact, rel=2e-3)
    assert t_quantile(p, df) > t_quantile(p, 10 * df) > statistics.NormalDist().inv_cdf(p)
