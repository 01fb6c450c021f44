"""Reward model pieces on small tensors, hand-made groups and the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_core.artifacts import PreferenceFolder
from rlhf_core.config import RewardConfig
from rlhf_core.errors import ConfigError, DataError, RLHFError
from rlhf_core.preferences import PreferenceBundle, bundle_pairs
from rlhf_core.reward import RewardModel
from rlhf_core.reward.build import build_reward_model, freeze_lower_layers, init_reward_head, load_sequence_classifier
from rlhf_core.reward.data import PromptComparisons, encode_groups, load_prompt_comparisons, split_by_prompt
from rlhf_core.reward.metrics import comparison_diffs, expected_calibration_error, group_by, pairwise_accuracy
from rlhf_core.reward.model import encode_conversations, pad_right, reward_tokenizer
from rlhf_core.reward.trainer import (
    RankingCollator,
    RankingRewardTrainer,
    TokenInputs,
    TrunkStateInputs,
    ranking_loss,
    trainer_args,
)
from rlhf_core.schemas import Completion, Prompt, Ranking

from .test_train_reward_stage import marker_bundle


# ----------------------------------------------------------------------------- loss and metrics


def test_ranking_loss_matches_hand_computed_bradley_terry():
    rewards = torch.tensor([2.0, 0.5, -1.0])
    chosen, rejected = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    weight = torch.full((3,), 1 / 3)
    loss, diff = ranking_loss(rewards, chosen, rejected, torch.zeros(3), weight)
    expected = -(math.log(1 / (1 + math.exp(-1.5))) + math.log(1 / (1 + math.exp(-3.0))) + math.log(1 / (1 + math.exp(-1.5)))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert diff.tolist() == [1.5, 3.0, 1.5]

    margin_loss, _ = ranking_loss(rewards, chosen, rejected, torch.tensor([1.0, 2.0, 1.0]), weight)
    assert margin_loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))) * 2 / 3 - math.log(1 / (1 + math.exp(-1.0))) / 3, rel=1e-6)

    centred, _ = ranking_loss(rewards, chosen, rejected, torch.zeros(3), weight, center_coefficient=0.1)
    assert centred.item() == pytest.approx(expected + 0.1 * ((2.5**2 + 1.0**2 + 0.5**2) / 3), rel=1e-6)


def test_ranking_loss_weights_make_each_ranking_count_once():
    """Two rankings, one with 3 pairs (weight 1/3) and one with 1 pair (weight 1): the loss is the mean of their means."""
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.0, 3.0])
    chosen, rejected = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4])
    weight = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    loss, _ = ranking_loss(rewards, chosen, rejected, torch.zeros(4), weight)
    per_pair = -torch.nn.functional.logsigmoid(torch.tensor([1.0, 2.0, 1.0, -3.0]))
    assert loss.item() == pytest.approx(((per_pair[:3].mean() + per_pair[3]) / 2).item(), rel=1e-6)


def test_pairwise_accuracy_counts_ties_half_and_groups_by_rank_distance():
    diff = torch.tensor([1.0, -2.0, 0.0, 3.0])
    assert pairwise_accuracy(diff) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert group_by(diff, [1, 1, 2, None]) == {1: 0.5, 2: 0.5}


def test_expected_calibration_error_by_hand():
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    diff = torch.tensor([logit(0.9), logit(0.9), -logit(0.9), logit(0.9)])  # confidence 0.9 each; 3 right, 1 wrong
    assert expected_calibration_error(diff) == pytest.approx(abs(0.75 - 0.9), abs=1e-6)
    perfect = torch.tensor([logit(0.7)] * 7 + [-logit(0.7)] * 3)  # 70% confident, 70% right
    assert expected_calibration_error(perfect) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- data


def write_bundle(folder, bundle: PreferenceBundle) -> None:
    bundle.write(folder)
    PreferenceFolder(folder).write_pairs(bundle_pairs(bundle, margin="rank_distance"), [])


def full_ranking_bundle() -> PreferenceBundle:
    """One prompt, K = 3, a full ranking with ratings, ranked by two annotators; one cut-off completion."""
    prompt = Prompt(id="p1", text="Say hi.")
    completions = [
        Completion(id=f"c{i}", prompt_id="p1", text=text, policy_version="base:x", finished=i != 2)
        for i, text in enumerate(["Hello there!", "Hi.", "hey hey hey"])
    ]
    rankings = [
        Ranking(id="r1", prompt_id="p1", completion_ids=["c0", "c1", "c2"], ratings=[9.0, 6.5, 1.0], annotator_id="a"),
        Ranking(id="r2", prompt_id="p1", completion_ids=["c1", "c0", "c2"], annotator_id="b"),
    ]
    return PreferenceBundle(prompts=[prompt], completions=completions, rankings=rankings)


def test_pairs_are_grouped_by_prompt_with_margins(tmp_path):
    write_bundle(tmp_path, full_ranking_bundle())
    (group,) = load_prompt_comparisons(tmp_path, "rank_distance")
    assert group.completion_ids == ["c0", "c1", "c2"] and group.finished == [True, True, False]
    assert len(group.comparisons) == 6  # both annotators' C(3,2) pairs share the 3 completions
    by_pair = {(group.completion_ids[c.chosen], group.completion_ids[c.rejected], c.pair.ranking_id): c for c in group.comparisons}
    assert by_pair[("c0", "c2", "r1")].margin == 2.0 and by_pair[("c0", "c2", "r1")].rank_distance == 2
    assert by_pair[("c1", "c0", "r2")].margin == 1.0 and by_pair[("c1", "c0", "r2")].weight == pytest.approx(1 / 3)

    (gaps,) = load_prompt_comparisons(tmp_path, "rating_gap")
    by_pair = {(gaps.completion_ids[c.chosen], gaps.completion_ids[c.rejected], c.pair.ranking_id): c.margin for c in gaps.comparisons}
    assert by_pair[("c0", "c1", "r1")] == 2.5 and by_pair[("c0", "c2", "r1")] == 8.0
    assert by_pair[("c1", "c0", "r2")] == 0.0  # r2 has no ratings

    (plain,) = load_prompt_comparisons(tmp_path, "none")
    assert {c.margin for c in plain.comparisons} == {0.0}


def test_rating_gap_without_any_ratings_is_a_clear_error(tmp_path):
    write_bundle(tmp_path, marker_bundle(3))
    with pytest.raises(DataError, match="rating_gap, but no ranking"):
        load_prompt_comparisons(tmp_path, "rating_gap")
    with pytest.raises(DataError, match="not found \\(run `rlhf collect-preferences` first\\)"):
        load_prompt_comparisons(tmp_path / "missing", "none")


def test_pairs_of_one_prompt_never_straddle_the_split(tmp_path):
    bundle = marker_bundle(40)
    # A second annotator ranks every prompt again: more pairs per prompt that must stay together.
    bundle.rankings += [r.model_copy(update={"id": r.id + "b", "annotator_id": "a2"}) for r in bundle.rankings]
    write_bundle(tmp_path, bundle)
    groups = load_prompt_comparisons(tmp_path, "none")
    train, validation = split_by_prompt(groups, 0.25, seed=3)

    train_prompts = {c.pair.prompt_id for g in train for c in g.comparisons}
    held_out = {c.pair.prompt_id for g in validation for c in g.comparisons}
    assert not train_prompts & held_out and len(held_out) == 10 and len(train_prompts) == 30
    assert all(len(g.comparisons) == 8 for g in validation)
    again, _ = split_by_prompt(list(reversed(groups)), 0.25, seed=3)
    assert {g.prompt_id for g in again} == {g.prompt_id for g in train}
    other, _ = split_by_prompt(groups, 0.25, seed=4)
    assert {g.prompt_id for g in other} != {g.prompt_id for g in train}


def test_split_needs_two_prompts_and_always_holds_one_out(tmp_path):
    write_bundle(tmp_path, marker_bundle(2))
    train, validation = split_by_prompt(load_prompt_comparisons(tmp_path, "none"), 0.01, seed=0)
    assert len(train) == len(validation) == 1
    with pytest.raises(DataError, match="at least 2"):
        split_by_prompt(load_prompt_comparisons(tmp_path, "none")[:1], 0.2, seed=0)


# ----------------------------------------------------------------------------- tokenisation and model


@pytest.fixture(scope="module")
def tokenizer(tiny_base_model):
    return reward_tokenizer(tiny_base_model, max_length=48)


def test_reward_tokenizer_pads_with_a_token_other_than_the_stop_token(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "left"


def test_conversations_keep_their_end_and_the_stop_token_only_when_finished(tokenizer):
    long_prompt = "word " * 200
    (done, cut), truncated = encode_conversations(tokenizer, [long_prompt, "Hi?"], ["Fine thanks.", "Fine thanks"], [True, False])
    assert truncated == 1 and len(done) == 48
    assert done[-1] == tokenizer.eos_token_id and tokenizer.decode(done).endswith("Fine thanks.<|im_end|>")
    assert cut[-1] != tokenizer.eos_token_id and tokenizer.decode(cut).endswith("<|im_start|>assistant\nFine thanks")
    ids, mask = pad_right([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_head_reads_the_stop_token(tiny_base_model, tokenizer):
    """With reward.read_stop_token on, a finished and a cut-off answer with the same text score differently."""
    model = RewardModel(load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id), tokenizer, reads_stop_token=True)
    init_reward_head(model.model, seed=0)
    done, cut = model.raw_scores(["Hi?", "Hi?"], ["Hello.", "Hello."], [True, False]).tolist()
    assert done != cut
    # Scores do not depend on what else is in the batch (right padding, no position shift).
    alone = model.raw_scores(["Hi?"], ["Hello."], [True]).item()
    mixed = model.raw_scores(["Hi?", "A much longer question about many things?"], ["Hello.", "A long answer " * 5], batch_size=2)
    assert mixed[0].item() == pytest.approx(alone, abs=1e-5)


def test_text_only_reward_model_ignores_the_stop_token_and_keeps_that_setting_when_saved(tiny_base_model, tokenizer, tmp_path):
    """reward.read_stop_token off: finished and cut-off answers with the same text score the same, in every scorer."""
    from rlhf_core.reward.trunk import CachedTrunkScorer, FrozenTrunk

    model = RewardModel(load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id), tokenizer, reads_stop_token=False)
    init_reward_head(model.model, seed=0)
    done, cut = model.raw_scores(["Hi?", "Hi?"], ["Hello.", "Hello."], [True, False]).tolist()
    assert done == pytest.approx(cut, abs=1e-6)
    assert model.raw_scores(["Hi?"], ["Hello."]).item() == pytest.approx(done, abs=1e-6)  # default "finished" too

    model.save(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "normalization.json").read_text())["reads_stop_token"] is False
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.reads_stop_token is False
    assert loaded.raw_scores(["Hi?"], ["Hello."], [True]).item() == pytest.approx(done, abs=1e-5)
    # A folder saved before the setting existed reads the stop token, as it was trained to.
    norm = tmp_path / "rm" / "normalization.json"
    norm.write_text(json.dumps({"shift": 0.0, "scale": 1.0}))
    assert RewardModel.load(tmp_path / "rm").reads_stop_token is True

    # Training sequences and the cached-trunk scorer read the same text as the model.
    group = PromptComparisons("p1", "Hi?", ["a", "b"], ["Hello.", "Hey"], [True, False])
    seq_done, seq_cut = encode_groups(tokenizer, [group], reads_stop_token=False).sequences
    assert tokenizer.eos_token_id not in seq_done[-1:] and tokenizer.eos_token_id not in seq_cut[-1:]
    with_stop, _ = encode_groups(tokenizer, [group], reads_stop_token=True).sequences
    assert with_stop[-1] == tokenizer.eos_token_id
    scorer = CachedTrunkScorer(FrozenTrunk(model.model, 1), tokenizer, {}, reads_stop_token=False)
    again = scorer.raw_scores(["Hi?", "Hi?"], ["Hello.", "Hello."], [True, False], batch_size=2)
    assert again.tolist() == pytest.approx([done, done], abs=1e-5)


def test_head_init_and_freezing(tiny_base_model, tokenizer):
    model = load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    init_reward_head(model, seed=0)
    d = model.config.hidden_size
    assert float(model.score.weight.std()) == pytest.approx(1 / math.sqrt(d + 1), rel=0.3)
    with pytest.raises(ConfigError, match="reward.freeze_layers=2: the model has only 2 decoder layers"):
        freeze_lower_layers(model, 2)  # the tiny model has 2 layers: freezing both is refused, not capped
    assert freeze_lower_layers(model, 1) == 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.norm.weight", "score.weight"} <= trainable
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.")) for n in trainable)
    assert any(n.startswith("model.layers.1.") for n in trainable)

    model, _ = build_reward_model(tiny_base_model, tokenizer, RewardConfig(mode="freeze", freeze_layers=1))
    trainable = {n.split(".")[2] if n.startswith("model.layers") else n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" not in trainable and "0" not in trainable and "1" in trainable
    _, peft_config = build_reward_model(tiny_base_model, tokenizer, RewardConfig(mode="lora", lora_r=4))
    assert peft_config.r == 4 and peft_config.task_type == "SEQ_CLS"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_and_normalisation(tiny_base_model, tokenizer, tmp_path, dtype):
    model = RewardModel(load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id), tokenizer, dtype=dtype)
    init_reward_head(model.model, seed=1)
    prompts, responses = ["Hi?"] * 5 + ["Why?"] * 3, ["a", "b c", "d e f.", "no", "yes", "because.", "so", "hm"]
    raw = model.raw_scores(prompts, responses)
    model.fit_normalization(raw)
    normalised = model.score(prompts, responses)
    assert abs(float(normalised.mean())) < 1e-5 and float(normalised.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    assert model.shift == pytest.approx(float(raw.mean())) and normalised.dtype == torch.float32

    model.save(tmp_path / "rm")
    assert sorted(p.name for p in (tmp_path / "rm").iterdir() if p.suffix in (".safetensors", ".json")) == [
        "config.json", "model.safetensors", "normalization.json", "tokenizer.json", "tokenizer_config.json"
    ]
    loaded = RewardModel.load(tmp_path / "rm")
    # Reloaded, it scores in the path its normalisation was fitted in: fp32 weights, bf16 autocast for bfloat16.
    assert loaded.dtype == dtype and loaded.model.dtype == torch.float32
    assert (loaded.shift, loaded.scale) == (model.shift, model.scale)
    assert torch.allclose(loaded.score(prompts, responses), normalised, atol=1e-5)
    assert loaded.tokenizer.pad_token_id == tokenizer.pad_token_id and loaded.tokenizer.model_max_length == 48
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    in_other_path = RewardModel(loaded.model, loaded.tokenizer, loaded.shift, loaded.scale, dtype=other)
    assert not torch.allclose(in_other_path.raw_scores(prompts, responses), raw, atol=1e-4)
    with pytest.raises(RLHFError, match="not a reward model folder"):
        RewardModel.load(tiny_base_model)


# ----------------------------------------------------------------------------- K-wise batching


def test_collator_stacks_completions_and_shifts_pair_indexes():
    sequences = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    examples = [
        {"completions": [0, 1, 2], "chosen": [0, 0, 1], "rejected": [1, 2, 2], "margin": [0, 0, 0], "weight": [1 / 3] * 3},
        {"completions": [3, 4], "chosen": [1], "rejected": [0], "margin": [1.0], "weight": [1.0]},
    ]
    batch = RankingCollator(TokenInputs(sequences, pad_token_id=0))(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 0, 0], [8, 9, 0]]
    assert batch["chosen"].tolist() == [0, 0, 1, 4] and batch["rejected"].tolist() == [1, 2, 2, 3]
    assert batch["margin"].tolist() == [0, 0, 0, 1.0]

    states = {tuple(seq): torch.full((len(seq), 2), float(i)) for i, seq in enumerate(sequences)}
    batch = RankingCollator(TrunkStateInputs(states, sequences))(examples[1:])
    assert batch["inputs_embeds"].shape == (2, 2, 2) and batch["attention_mask"].tolist() == [[0, 1], [1, 1]]
    assert batch["position_ids"].tolist() == [[0, 0], [0, 1]] and batch["inputs_embeds"][0, 1].tolist() == [3.0, 3.0]


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_upper_layers_on_cached_trunk_states_score_like_the_full_model(tiny_base_model, tokenizer, tmp_path, store):
    """States streamed to a file on disk, a batch at a time, give the scores of the full in-memory forward pass."""
    from rlhf_core.reward.trunk import CachedTrunkScorer, FrozenTrunk, StateFile

    model = RewardModel(load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id), tokenizer, reads_stop_token=True)
    init_reward_head(model.model, seed=0)
    prompts = ["Hi?", "Tell me a story.", "Why?", "Name a colour."]
    responses, finished = ["Hello.", "Once upon a time there was", "Because.", ""], [True, False, True, True]
    full = model.raw_scores(prompts, responses, finished)
    sequences, _ = encode_conversations(tokenizer, prompts, responses, finished)
    trunk = FrozenTrunk(model.model, 1)
    states = trunk.states(sequences[:3], tokenizer.pad_token_id, batch_size=2, into=StateFile(tmp_path, 64) if store == "disk" else None)
    assert len(states) == 3 and [states[tuple(seq)].shape[0] for seq in sequences[:3]] == [len(seq) for seq in sequences[:3]]
    with trunk.upper():
        assert len(model.model.model.layers) == 1
        split = model.model(**TrunkStateInputs(states, sequences)([0, 1, 2]), use_cache=False).logits.squeeze(-1)
    assert len(model.model.model.layers) == 2
    assert torch.allclose(split, full[:3], atol=1e-5)
    features = trunk.final_features(states, sequences[:3], batch_size=2)
    assert torch.allclose(model.model.score(features).squeeze(-1), full[:3], atol=1e-5)

    scorer = CachedTrunkScorer(trunk, tokenizer, states, reads_stop_token=True)
    again = scorer.raw_scores(prompts, responses, finished, batch_size=2)
    assert torch.allclose(again, full, atol=1e-5)
    assert len(states) == 4  # the three cached states were reused, the new one added


def test_state_file_holds_one_batch_in_memory_and_returns_what_was_written(tmp_path):
    from rlhf_core.reward.trunk import StateFile

    store = StateFile(tmp_path, 3)
    blocks = {(i,): torch.randn(i + 1, 3) for i in range(5)}
    store.update(blocks.items())
    assert len(store) == 5 and (2,) in store and (9,) not in store
    assert all(torch.equal(store[key], block) for key, block in reversed(blocks.items()))
    assert list(tmp_path.iterdir()) == []  # anonymous: nothing is left behind, even before close


def test_head_only_model_scores_from_streamed_features_like_the_saved_model(tiny_base_model, tokenizer, tmp_path):
    """reward.mode: none fits the head on last-token features; cut at read_layer, it reloads and scores the same."""
    from rlhf_core.reward.trainer import fit_reward_model

    write_bundle(tmp_path / "prefs", marker_bundle(6))
    groups = load_prompt_comparisons(tmp_path / "prefs", "none")
    cfg = RewardConfig(mode="none", read_layer=1, score_batch_size=3)
    fit = fit_reward_model(tiny_base_model, cfg, groups, tmp_path / "out")
    assert fit.steps == 0 and fit.trainable_parameters == 64 and fit.losses and fit.losses[-1][1] < fit.losses[0][1]
    assert len(fit.model.model.layers) == 1 and fit.model.config.num_hidden_layers == 1
    prompts = [g.prompt for g in groups for _ in g.responses] + ["A prompt never seen?"]
    responses = [r for g in groups for r in g.responses] + ["An answer never seen."]
    cached = fit.scorer.raw_scores(prompts, responses, batch_size=4)
    RewardModel(fit.model, fit.tokenizer).save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    assert len(loaded.model.model.layers) == 1
    assert torch.allclose(loaded.raw_scores(prompts, responses, batch_size=5), cached, atol=1e-5)
    with pytest.raises(RLHFError, match=r"reward.read_layer=5, but the base model has 2 decoder layers"):
        fit_reward_model(tiny_base_model, RewardConfig(mode="none", read_layer=5), groups, tmp_path / "out")


def test_long_conversations_lose_whole_turns_from_the_left_never_the_final_answer(tokenizer, capfd):
    from rlhf_core.reward.model import encode_conversation, prompt_turns

    prompt = "Human: first question " + "blah " * 30 + "\n\nAssistant: first answer\n\nHuman: Second question?"
    assert prompt_turns(prompt) == ["Human: first question " + "blah " * 30 + "\n\nAssistant: first answer", "Human: Second question?"]
    answer = " The final answer, kept whole."
    ids, full = encode_conversation(tokenizer, prompt, answer, False)  # the fixture's max_length is 48
    text = tokenizer.decode(ids)
    assert full > 48 >= len(ids) and text.endswith(answer) and "Human: Second question?" in text
    assert "first" not in text and "blah" not in text
    short, length = encode_conversation(tokenizer, "Hi?", answer, False)
    assert length == len(short) <= 48 and tokenizer.decode(short).endswith(answer)
    # One turn longer than the limit: tokens go from the left; the answer's end, where the score is read, stays.
    ids, full = encode_conversation(tokenizer, "word " * 80, answer, False)
    assert len(ids) == 48 and full > 48 and tokenizer.decode(ids).endswith(answer)
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_linear_probe_orders_pairs_by_the_informative_feature():
    from rlhf_core.reward.probe import fit_linear_head

    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(200, 8, generator=generator), torch.randn(200, 8, generator=generator)
    chosen[:, 3] += 2.0  # only feature 3 separates chosen from rejected; its scale is 100x the others'
    chosen[:, 3] *= 100
    rejected[:, 3] *= 100
    w = fit_linear_head(chosen, rejected, torch.zeros(200), torch.ones(200), l2=0.01)
    # The weight is on raw features: times each feature's spread, feature 3 dominates.
    assert (w * torch.cat([chosen, rejected]).std(0)).abs().argmax().item() == 3 and w[3] > 0
    assert float(((chosen - rejected) @ w > 0).float().mean()) >= 0.85  # Phi(2 / sqrt(2)) = 0.92 for the ideal w


def test_each_distinct_completion_is_scored_once_per_step(tiny_base_model, tokenizer, tmp_path):
    """K = 4 completions and C(4,2) = 6 pairs per prompt: the model sees 4 sequences per prompt, not 12."""
    bundle = marker_bundle(4)
    bundle.rankings = [r.model_copy(update={"ranks": None}) for r in bundle.rankings]  # full rankings: 6 pairs each
    write_bundle(tmp_path / "prefs", bundle)
    groups = load_prompt_comparisons(tmp_path / "prefs", "none")
    assert all(len(g.comparisons) == 6 and len(g.completion_ids) == 4 for g in groups)

    from datasets import Dataset

    cfg = RewardConfig(prompts_per_batch=2, epochs=1, mode="full")
    model, _ = build_reward_model(tiny_base_model, tokenizer, cfg)
    encoded = encode_groups(tokenizer, groups, cfg.read_stop_token)
    sequences, examples = encoded.sequences, encoded.examples
    assert len(sequences) == 16 and [e["completions"] for e in examples][1] == [4, 5, 6, 7]
    rows_seen = []
    model.register_forward_hook(lambda module, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    trainer = RankingRewardTrainer(
        model=model,
        args=trainer_args(cfg, tmp_path / "out"),
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        data_collator=RankingCollator(TokenInputs(sequences, tokenizer.pad_token_id)),
    )
    trainer.train()
    assert rows_seen == [8, 8]  # 2 steps of 2 prompts x 4 completions
    assert not any((tmp_path / "out").glob("checkpoint-*"))


def test_held_out_pairs_are_read_from_one_score_per_completion():
    from rlhf_core.reward.data import Comparison, PromptComparisons
    from rlhf_core.reward.metrics import conversations, score_conversations

    pairs = bundle_pairs(full_ranking_bundle())
    group = PromptComparisons("p1", "Say hi.", ["c0", "c1", "c2"], ["a", "b", "c"], [True, True, False])
    group.comparisons = [Comparison(0, 2, 0.0, 1.0, 2, pairs[0]), Comparison(1, 2, 0.0, 1.0, 1, pairs[1])]

    class Counting:
        seen: list = []

        def raw_scores(self, prompts, responses, finished, batch_size, desc=None):
            self.seen += responses
            return torch.tensor([{"a": 1.5, "b": 0.0, "c": -0.5}[r] for r in responses])

    scorer = Counting()
    scores = score_conversations(scorer, conversations([group]) + conversations([group]), batch_size=4)
    assert sorted(scorer.seen) == ["a", "b", "c"]
    diff, distances = comparison_diffs([group], scores)
    assert diff.tolist() == [2.0, 0.5] and distances == [2, 1]


# ----------------------------------------------------------------------------- non-finite guard


def test_guard_stops_at_the_first_non_finite_loss_or_gradient_norm():
    from types import SimpleNamespace

    from rlhf_core.reward.trainer import FiniteTrainingGuard

    guard, state = FiniteTrainingGuard(3e-3), SimpleNamespace(global_step=3)
    guard.on_log(None, state, None, logs={"loss": 0.69, "grad_norm": 12.0})
    with pytest.raises(RLHFError, match=r"^reward.learning_rate=0.003: loss is nan at step 3; training stopped"):
        guard.on_log(None, state, None, logs={"loss": float("nan"), "grad_norm": 1.0})
    with pytest.raises(RLHFError, match="gradient norm is inf at step 3"):
        guard.on_log(None, state, None, logs={"loss": 0.5, "grad_norm": float("inf")})


def test_non_finite_weights_and_constant_or_non_finite_scores_are_refused():
    from rlhf_core.reward.trainer import check_finite_weights, check_scores

    layer = torch.nn.Linear(2, 1)
    check_finite_weights(layer, 1e-4)
    with torch.no_grad():
        layer.bias.fill_(float("nan"))
    with pytest.raises(RLHFError, match=r"1 of 2 weight tensors are not finite \(first: bias\)"):
        check_finite_weights(layer, 1e-4)

    check_scores(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.3]), 1e-4)
    with pytest.raises(RLHFError, match="all 3 held-out completions score 0.5 .a constant model."):
        check_scores(torch.tensor([0.5, 0.5, 0.5, 1.0]), torch.tensor([0.5, 0.5, 0.5]), 1e-4)
    with pytest.raises(RLHFError, match="1 of 3 scores are not finite"):
        check_scores(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0.1, 0.3]), 1e-4)


@pytest.mark.parametrize("mode", ["full", "freeze"])
def test_runaway_learning_rate_stops_training_at_the_first_nan_loss(tiny_base_model, tmp_path, mode):
    from rlhf_core.reward.trainer import fit_reward_model

    write_bundle(tmp_path / "prefs", marker_bundle(6))
    groups = load_prompt_comparisons(tmp_path / "prefs", "none")
    cfg = RewardConfig(prompts_per_batch=2, epochs=1, mode=mode, freeze_layers=1, learning_rate=1e30)
    with pytest.raises(RLHFError, match=r"^reward.learning_rate=1e\+30: loss is nan at step 2; "):
        fit_reward_model(tiny_base_model, cfg, groups, tmp_path / "out")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_responses_sharing_a_prompt_read_it_once_and_score_like_one_pass_each(tiny_base_model, tokenizer, dtype):
    """Grouped by shared prefix (prompt once, answers of any length on its cache, groups split across batches), the
    scores and frozen-trunk states are those of a separate forward pass over each whole sequence."""
    from rlhf_core.decoder import shared_prefix_groups
    from rlhf_core.precision import autocast
    from rlhf_core.reward.trunk import FrozenTrunk

    model = RewardModel(load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id), tokenizer, dtype=dtype)
    init_reward_head(model.model, seed=0)
    story, sky = "Tell me a long story about a dragon and a knight.", "Why is the sky blue on a clear day?"
    answers = ["Once", "Once upon a time there was a dragon who", "No.", "", "A knight rode out at dawn to find it",
               "They became friends", "The end.", "Dragons", "It was a dark and stormy night in the"]
    prompts = [story] * len(answers) + [sky] * 3 + ["Hi"]
    responses = answers + ["Scattering.", "Because of Rayleigh scattering of sunlight", "I do not know"] + ["Hello"]
    sequences, _ = encode_conversations(tokenizer, prompts, responses, [False] * len(prompts))
    groups = shared_prefix_groups(sequences)
    assert sorted(len(rows) for prefix, rows in groups if prefix) == [3, len(answers)]

    with torch.no_grad(), autocast(dtype, torch.device("cpu")):
        one_each = torch.stack([model.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, 0] for seq in sequences])
        lower = [model.model.model(input_ids=torch.tensor([seq]), use_cache=False, output_hidden_states=True).hidden_states[1][0]
                 for seq in sequences]  # fmt: skip
    tolerance = 1e-5 if dtype == "float32" else 3e-2
    for batch_size in (4, 16):
        grouped = model.raw_scores(prompts, responses, batch_size=batch_size)
        assert torch.allclose(grouped, one_each.float(), atol=tolerance), (batch_size, grouped, one_each)
    with autocast(dtype, torch.device("cpu")):
        states = FrozenTrunk(model.model, 1).states(sequences, tokenizer.pad_token_id, batch_size=4)
    for seq, expected in zip(sequences, lower):
        assert torch.allclose(states[tuple(seq)], expected.float(), atol=tolerance)
