"""Gates on measured evidence: a healthy candidate passes, degenerate ones fail with reasons."""

from rlhf_core.config import load_params
from rlhf_core.evaluation.gates import Evidence, Judged, all_passed, apply_gates, failure_reasons, gate_metrics
from rlhf_core.evaluation.metrics import WinRate, win_rate
from rlhf_core.evaluation.overoptimisation import OverOptimisation, assess, paired_gain
from rlhf_core.evaluation.report import Responses, length_ratio, policy_metrics
from rlhf_core.gold import gold_score

from .conftest import REPO

CFG = load_params(REPO / "params.yaml").gates  # the thresholds the pipeline runs with
PROMPTS = [f"Give me one tip about {topic}." for topic in ("sleep", "cooking", "running", "saving money", "reading", "gardening")]
GOOD = [
    "Keep a regular schedule: go to bed and wake up at the same time every day, even on weekends.",
    "Taste as you cook and add salt in small amounts, because it is easy to add more and hard to take away.",
    "Start slowly and build your distance by about ten percent a week so your body can adapt.",
    "Set up an automatic transfer to savings on payday, so you save before you are tempted to spend.",
    "Read a few pages every evening at a set time; small daily habits add up to many books a year.",
    "Water early in the morning, when less evaporates and the plants have the whole day to drink.",
]
REFERENCE = [
    "sleep is good i think",
    "cooking. you can cook",
    "Run",
    "money is money and saving",
    "books",
    "plants need water and",
]


def _tokens(texts):
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]


def _responses(name, texts, proxy):
    return Responses(name, texts, _tokens(texts), [True] * len(texts), proxy, [gold_score(p, t) for p, t in zip(PROMPTS, texts)])


def _evidence(candidate: Responses, reference: Responses, **changes) -> Evidence:
    metrics = policy_metrics(candidate, repetition_ngram=4)
    verdict = assess(paired_gain(candidate.proxy, reference.proxy), paired_gain(candidate.gold, reference.gold), None, 0.05)
    fields = dict(
        vs_reference=Judged(win_rate(candidate.gold, reference.gold), "gold"),
        vs_champion=None,
        kl=2.0,
        length_ratio=length_ratio(candidate, reference),
        distinct_2=metrics["eval/candidate/distinct_2"],
        repetition_rate=metrics["eval/candidate/repetition_rate"],
        overoptimisation=verdict,
        reward_accuracy=0.7,
    )
    return Evidence(**{**fields, **changes})


REFERENCE_RESPONSES = _responses("reference", REFERENCE, [0.0] * 6)


def _gate(gates, name):
    return next(g for g in gates if g.name == name)


def test_a_clearly_better_candidate_passes_every_gate():
    candidate = _responses("candidate", GOOD, [1.0] * 6)
    gates = apply_gates(_evidence(candidate, REFERENCE_RESPONSES, length_ratio=1.5), CFG)
    assert all_passed(gates), failure_reasons(gates)
    assert _gate(gates, "win_rate_vs_champion").reason == "no champion yet"
    metrics = gate_metrics(gates)
    assert metrics["eval/all_gates_passed"] is True and metrics["eval/failed_gates"] == ""
    assert metrics["eval/gate/kl/value"] == 2.0 and metrics["eval/gate/kl/threshold"] == CFG.max_kl


def test_a_candidate_repeating_one_token_is_rejected_with_reasons():
    texts = ["the " * 30] * 6
    degenerate = Responses("candidate", texts, [[279] * 30] * 6, [False] * 6, [2.0, 2.1, 1.9, 2.2, 2.0, 2.1],
                           [gold_score(p, t) for p, t in zip(PROMPTS, texts)])
    gates = apply_gates(_evidence(degenerate, REFERENCE_RESPONSES), CFG)
    failed = {g.name for g in gates if not g.passed}
    assert {"distinct_2", "repetition_rate", "win_rate_vs_reference"} <= failed
    reasons = " | ".join(failure_reasons(gates))
    assert "distinct_2" in reasons and "repetition_rate" in reasons
    assert gate_metrics(gates)["eval/all_gates_passed"] is False


def test_proxy_up_gold_down_is_blocked_only_when_configured():
    better = _responses("reference", GOOD, [0.0] * 6)  # a good reference the candidate falls behind on gold
    gamed = _responses("candidate", REFERENCE, [3.0, 3.2, 2.9, 3.1, 3.0, 3.3])
    evidence = _evidence(gamed, better, vs_reference=Judged(WinRate(6, 0, 0), "gold"))
    assert evidence.overoptimisation.flagged
    assert not _gate(apply_gates(evidence, CFG), "overoptimisation").passed
    lenient = CFG.model_copy(update={"block_on_overoptimisation": False})
    assert _gate(apply_gates(evidence, lenient), "overoptimisation").passed


def test_missing_evidence_fails_but_a_missing_champion_does_not():
    candidate = _responses("candidate", GOOD, [1.0] * 6)
    evidence = _evidence(candidate, REFERENCE_RESPONSES, vs_reference=Judged(None, "none"),
                         vs_champion=Judged(None, "none"), reward_accuracy=None,
                         overoptimisation=OverOptimisation(False, ()))
    gates = apply_gates(evidence, CFG)
    for name in ("win_rate_vs_reference", "win_rate_vs_champion", "reward_accuracy"):
        gate = _gate(gates, name)
        assert not gate.passed and gate.value is None and "not" in gate.reason


def test_win_rate_gates_use_the_lower_bound():
    candidate = _responses("candidate", GOOD, [1.0] * 6)
    narrow_win = Judged(WinRate(4, 0, 2), "gold")  # rate 0.67 but lower bound ~0.30
    gate = _gate(apply_gates(_evidence(candidate, REFERENCE_RESPONSES, vs_reference=narrow_win), CFG), "win_rate_vs_reference")
    assert not gate.passed and gate.value < 0.5 and "lower 95% bound" in gate.reason
