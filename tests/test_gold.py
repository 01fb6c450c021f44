"""The gold rubric on hand-written answers."""

import pytest

from rlhf_core.gold import (
    ending_score,
    gold_accuracy,
    gold_components,
    gold_score,
    length_score,
    relevance,
    repetition_penalty,
)
from rlhf_core.schemas import PreferencePair

PROMPT = "What should I pack for a weekend camping trip if I've never camped before?"
CONCISE = (
    "Pack a tent, a warm sleeping bag and a mat, plus a head torch and water. "
    "Bring simple food, a small stove, layers of clothing and a rain jacket for your first camping trip."
)
RAMBLING_CUT = (
    "Camping is a wonderful activity that many people enjoy and there are lots of things that you might want to "
    "think about when you are getting ready to go on your very first camping trip because it can be"
)


def test_concise_complete_answer_beats_rambling_cut_off_one():
    good, cut = gold_components(PROMPT, CONCISE), gold_components(PROMPT, RAMBLING_CUT)
    assert good["ending"] == 1.0 and cut["ending"] == 0.0
    assert good["gold"] > cut["gold"] + 0.3
    assert good["gold"] == pytest.approx(1.0, abs=0.05)


def test_cut_off_answers_are_spread_by_how_much_of_them_is_complete():
    nearly = "Pack a tent and a sleeping bag. Bring warm clothes and water. Add a torch and"
    barely = "Pack a tent. Then think about all the other things you could bring along such as a stove and"
    assert 0.5 > ending_score(nearly) > ending_score(barely) > 0.0
    assert gold_score(PROMPT, nearly) > gold_score(PROMPT, barely)


@pytest.mark.parametrize(
    "text, complete",
    [
        ("It ends here.", True),
        ('She said "done!"', True),
        ("Really?)", True),
        ("It trails off...", False),
        ("It stops at a comma,", False),
        ("Here is a list:", False),
        ("Things to pack:\n- Tent\n- Sleeping bag", True),
        ("Things to pack:\n1. A tent that is big enough for the whole family and", False),
    ],
)
def test_ending(text, complete):
    assert (ending_score(text) == 1.0) is complete


def test_length_window_is_smooth():
    assert length_score(15) == length_score(40) == length_score(60) == 1.0
    assert 0 < length_score(5) < length_score(10) < 1
    assert 0 < length_score(120) < length_score(80) < 1
    assert length_score(0) == 0.0


def test_repetition_is_penalised():
    looping = "Pack a tent and a stove. " * 6
    assert repetition_penalty(CONCISE) == 0.0
    assert repetition_penalty(looping) == 1.0
    assert gold_score(PROMPT, looping) < gold_score(PROMPT, CONCISE) - 0.4
    repeated_lines = "Bring a tent.\nBring a tent.\nBring a tent.\nBring water."
    assert repetition_penalty(repeated_lines) > 0.5


@pytest.mark.parametrize(
    "rude",
    [
        "That is a stupid question. " + CONCISE,
        "As an AI, I have never camped. " + CONCISE,
        "I'm sorry, but I cannot help with camping plans. " + CONCISE,
    ],
)
def test_rude_refusing_or_disclaiming_tone_is_penalised(rude):
    assert gold_components(PROMPT, rude)["tone"] >= 0.5
    assert gold_score(PROMPT, rude) < gold_score(PROMPT, CONCISE) - 0.15


def test_leftover_chat_markup_is_penalised():
    for leftover in (CONCISE + "<|im_end|>", CONCISE + "\nuser\nThanks!", CONCISE + "\nHuman: and food?"):
        assert gold_components(PROMPT, leftover)["markup"] == 1.0
        assert gold_score(PROMPT, leftover) < gold_score(PROMPT, CONCISE) - 0.2


def test_relevance_needs_the_prompt_words_but_not_an_echo():
    off_topic = "Stocks and bonds differ in risk, and a balanced portfolio holds some of each for the long run."
    assert relevance(PROMPT, CONCISE) == 1.0
    assert relevance(PROMPT, off_topic) == 0.0
    echo = PROMPT + " " + PROMPT
    assert relevance(PROMPT, echo) < 0.3


@pytest.mark.parametrize(
    "trick",
    [
        "Yes.",  # a complete ending, nothing else
        RAMBLING_CUT,  # on-topic and in the length window, but cut off
        PROMPT,  # echo the prompt
        "Pack a tent. " * 10,  # complete and on-topic, by repetition
    ],
)
def test_one_trick_alone_does_not_max_the_gold(trick):
    assert gold_score(PROMPT, trick) < 0.8


def test_range_and_determinism():
    worst = "<|im_start|>user stupid idiot " * 20
    assert -1.0 <= gold_score(PROMPT, worst) < 0 < gold_score(PROMPT, CONCISE) <= 1.0
    assert gold_score(PROMPT, CONCISE) == gold_score(PROMPT, CONCISE)
    assert gold_score(PROMPT, "") == 0.0


def pair(chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(
        prompt_id="p", prompt=PROMPT, chosen_id="a", chosen=chosen, rejected_id="b", rejected=rejected,
        ranking_id="r", annotator_id="x",
    )


def test_gold_accuracy_counts_agreeing_pairs_and_ties_half():
    pairs = [pair(CONCISE, RAMBLING_CUT), pair(RAMBLING_CUT, CONCISE), pair(CONCISE, CONCISE), pair(CONCISE, "Yes.")]
    assert gold_accuracy(pairs) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert gold_accuracy([]) is None
