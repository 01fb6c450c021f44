"""Reward scores and log-probs from the trunk states sampling computed (PPO rollouts and evaluation samples)."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.config import PPOConfig


@pytest.fixture(scope="module")
def policy(tiny_base_model):
    from rlhf_core.ppo.policy import build_actor_critic

    torch.manual_seed(0)
    return build_actor_critic(tiny_base_model, PPOConfig(mode="freeze", freeze_layers=1), torch.device("cpu"))


def _reward(tiny_base_model, dtype="float32", max_length=48):
    from rlhf_core.reward.build import init_reward_head, load_sequence_classifier
    from rlhf_core.reward.model import RewardModel, reward_tokenizer

    tokenizer = reward_tokenizer(tiny_base_model, max_length=max_length)
    reward = RewardModel(load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id), tokenizer, 0.3, 2.0, dtype=dtype)
    init_reward_head(reward.model, seed=0)
    return reward


def _trunk_states(policy, ids: list[int]) -> torch.Tensor:
    """The policy's trunk states for one unpadded sequence, by a fresh pass."""
    input_ids, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        return policy.trunk(input_ids, policy._attention(input_ids, mask))[0]


PROMPTS = ["Hi", "Name three rivers in Europe and say which is longest.", "Why is the sky blue?"]
RESPONSES = ["Hello there.", "The Danube, the Rhine and the Volga; the Volga is longest.", "Light scatters."]


def test_scores_from_the_rollouts_trunk_states_equal_the_reward_models_own(tiny_base_model, policy):
    from rlhf_core.reward.model import encode_conversations
    from rlhf_core.reward.trunk import RolloutTrunkScorer

    reward = _reward(tiny_base_model)
    scorer = RolloutTrunkScorer.for_policy(reward, policy, batch_size=2)
    assert scorer is not None
    encoded, _ = encode_conversations(reward.tokenizer, PROMPTS, RESPONSES, [False] * 3)
    # Row 0: the sampled tokens are the conversation plus a stop token (a finished answer: the state of the stop token
    # is there too). Row 1: a state short (its last token was never fed). Row 2: other tokens than the reward reads.
    sampled = [
        (encoded[0] + [reward.tokenizer.eos_token_id], _trunk_states(policy, encoded[0] + [reward.tokenizer.eos_token_id])),
        (encoded[1], _trunk_states(policy, encoded[1])[:-1]),
        (encoded[2][:-1] + [7], _trunk_states(policy, encoded[2][:-1] + [7])),
    ]
    expected = reward.score(PROMPTS, RESPONSES, [True, False, False])
    got = scorer(PROMPTS, RESPONSES, [True, False, False], sampled=sampled)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (scorer.rows_read, scorer.rows_scored) == (1, 3)
    # The states really are read: wrong states for row 0 change its score, the others stay.
    wrong = [(sampled[0][0], torch.zeros_like(sampled[0][1])), *sampled[1:]]
    changed = scorer(PROMPTS, RESPONSES, [True, False, False], sampled=wrong)
    assert abs(changed[0] - expected[0]) > 1e-3 and torch.allclose(changed[1:], expected[1:], atol=1e-5)
    # Without states it is the reward model's own scoring.
    assert torch.allclose(scorer(PROMPTS, RESPONSES, [True, False, False]), expected, atol=1e-5)


def test_only_a_reward_model_with_the_same_trunk_in_fp32_reads_rollout_states(tiny_base_model, policy):
    from rlhf_core.decoder import decoder_parts
    from rlhf_core.ppo.policy import build_actor_critic
    from rlhf_core.reward.trunk import RolloutTrunkScorer, same_trunk

    reward = _reward(tiny_base_model)
    with torch.no_grad():  # above the trunk anything may differ
        decoder_parts(reward.model).layers[1].mlp.up_proj.weight.add_(0.1)
    assert RolloutTrunkScorer.for_policy(reward, policy, 4) is not None
    with torch.no_grad():
        decoder_parts(reward.model).layers[0].self_attn.q_proj.weight.add_(1e-3)
    assert not same_trunk(decoder_parts(reward.model), policy.parts, 1)
    assert RolloutTrunkScorer.for_policy(reward, policy, 4) is None
    assert RolloutTrunkScorer.for_policy(_reward(tiny_base_model, "bfloat16"), policy, 4) is None
    full = build_actor_critic(tiny_base_model, PPOConfig(mode="full"), torch.device("cpu"))
    assert RolloutTrunkScorer.for_policy(_reward(tiny_base_model), full, 4) is None
    bf16 = build_actor_critic(tiny_base_model, PPOConfig(mode="freeze", freeze_layers=1, dtype="bfloat16"), torch.device("cpu"))
    assert RolloutTrunkScorer.for_policy(_reward(tiny_base_model), bf16, 4) is None


def test_rollout_with_feed_last_keeps_the_last_tokens_trunk_states(tiny_base_model, policy):
    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.generation import encode_queries
    from rlhf_core.ppo.rollout import sample_rollout

    tokenizer = load_tokenizer(tiny_base_model)
    ids, mask = encode_queries(tokenizer, PROMPTS[:2])

    def rollout(feed_last):
        return sample_rollout(
            policy, ids, mask, max_new_tokens=5, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(3), feed_last=feed_last,
        )  # fmt: skip

    plain, fed = rollout(False), rollout(True)
    assert torch.equal(plain.response_ids, fed.response_ids) and torch.equal(plain.trunk_hidden, fed.trunk_hidden)
    assert plain.trunk_last is None and fed.trunk_last.shape == (2, 1, plain.trunk_hidden.shape[-1])
    for tokens, states in fed.sampled_sequences():
        assert states.shape[0] == len(tokens)
        assert torch.allclose(states, _trunk_states(policy, tokens), atol=1e-4)
    assert [len(t) - s.shape[0] for t, s in plain.sampled_sequences()] == [1, 1]
    assert fed.rows(torch.tensor([1])).trunk_last.shape[0] == 1


def test_trainer_hands_the_rollout_to_a_score_function_that_reads_it(tiny_base_model):
    from rlhf_core.ppo.trainer import build_trainer

    seen = []

    def plain(prompts, responses, finished):
        return torch.zeros(len(prompts))

    class Reading:
        reads_rollout_trunk = True

        def __call__(self, prompts, responses, finished, sampled=None):
            seen.append(sampled)
            return torch.zeros(len(prompts))

    cfg = PPOConfig(mode="freeze", freeze_layers=1, batch_size=2, minibatches=1, max_new_tokens=4, ppo_epochs=1)
    trainer = build_trainer(cfg, tiny_base_model, plain, PROMPTS)
    assert not trainer.scores_from_trunk
    trainer.step()
    trainer.score_fn = Reading()
    assert trainer.scores_from_trunk
    trainer.step()
    (sampled,) = seen
    assert len(sampled) == 2 and all(states.shape[0] == len(tokens) for tokens, states in sampled)

    # The gold probe scores its responses with that same scorer, from its rollouts' trunk states.
    from rlhf_core.ppo.loop import GoldProbe

    probe = GoldProbe(PROMPTS[:3], lambda prompt, response: float(len(response)), seed=5)
    measured = probe.measure(trainer)
    assert [len(sampled) for sampled in seen[1:]] == [2, 1]  # local_batch 2: two rollouts for three prompts
    assert measured["ppo/gold_proxy"] == 0.0 and measured["ppo/gold"] > 0


# --------------------------------------------------------------------------- evaluation samples

MANY = [("Why? " * (1 + 7 * (i % 4))) + f"Question {i}." for i in range(18)]  # very different lengths: grouped prefill


def _lower_states(model, tokens: list[int], layers: int) -> torch.Tensor:
    """Hidden states after ``model``'s first ``layers`` layers, by a fresh pass over the lower layers alone."""
    from rlhf_core.reward.trunk import FrozenTrunk

    trunk = FrozenTrunk(model, layers)
    with trunk._view(list(trunk.layers)[:layers], torch.nn.Identity()), torch.no_grad():
        return model.model(input_ids=torch.tensor([tokens]), use_cache=False).last_hidden_state[0]


@pytest.mark.parametrize("num_samples", [1, 3])
def test_samples_keep_their_trunk_states_and_the_same_tokens(tiny_base_model, num_samples):
    from rlhf_core.decoder import prefill_groups
    from rlhf_core.generation import chat_prompt, load_policy, sample_completions

    model, tokenizer = load_policy(tiny_base_model, "float32")
    lengths = [len(tokenizer(chat_prompt(tokenizer, p)).input_ids) for p in MANY]
    assert len(prefill_groups(lengths)) > 1  # the grouped prefill's states are joined like its cache
    options = dict(num_samples=num_samples, max_new_tokens=5, batch_size=64, seed=4)
    plain, _ = sample_completions(model, tokenizer, MANY, **options)
    kept, _ = sample_completions(model, tokenizer, MANY, trunk_layers=1, **options)
    assert [s.token_ids for s in kept] == [s.token_ids for s in plain] and all(s.trunk is None for s in plain)
    for sample in kept:
        tokens, states = sample.trunk
        query = tokenizer(chat_prompt(tokenizer, MANY[sample.prompt_index]), add_special_tokens=False).input_ids
        assert tokens == query + sample.token_ids and states.shape[0] == len(tokens)
        assert torch.allclose(states, _lower_states(model, tokens, 1), atol=1e-4)


def test_reference_log_probs_from_the_candidates_trunk_states(tiny_base_model, tmp_path):
    from rlhf_core.base_model import load_causal_lm
    from rlhf_core.decoder import decoder_parts
    from rlhf_core.evaluation.likelihood import response_logprobs
    from rlhf_core.generation import load_policy, sample_completions

    candidate, tokenizer = load_policy(tiny_base_model, "float32")
    reference = load_causal_lm(tiny_base_model, dtype="float32").eval()
    with torch.no_grad():  # another policy above the shared layer
        decoder_parts(reference).layers[1].mlp.down_proj.weight.mul_(1.5)
    samples, _ = sample_completions(candidate, tokenizer, MANY, max_new_tokens=6, batch_size=64, seed=1, trunk_layers=1)
    args = (reference, tokenizer, [MANY[s.prompt_index] for s in samples], [s.token_ids for s in samples])
    plain = response_logprobs(*args, temperature=0.8, batch_size=8)
    reused = response_logprobs(*args, temperature=0.8, batch_size=8, trunks=[s.trunk for s in samples], trunk_layers=1)
    assert reused == pytest.approx(plain, abs=1e-3)
    # the states are what is read: wrong ones change the result; states for other tokens are not used
    wrong = [(t, torch.zeros_like(s)) for t, s in (x.trunk for x in samples)]
    zeroed = response_logprobs(*args, temperature=0.8, batch_size=8, trunks=wrong, trunk_layers=1)
    assert max(abs(a - b) for a, b in zip(zeroed, plain)) > 1e-2
    other = [(t[:-1] + [t[-1] + 1], s) for t, s in (x.trunk for x in samples)]
    assert response_logprobs(*args, temperature=0.8, batch_size=8, trunks=other, trunk_layers=1) == pytest.approx(plain, abs=1e-4)


def test_evaluation_samples_and_scores_reuse_the_shared_trunk(tiny_base_model):
    from rlhf_core.config import EvaluateConfig
    from rlhf_core.decoder import decoder_parts
    from rlhf_core.evaluation.sampling import sample_policies
    from rlhf_core.evaluation.scoring import Scorer

    folder = tiny_base_model.parent / "reward-for-eval"
    if not folder.exists():
        _reward(tiny_base_model, max_length=256).save(folder)
    scorer = Scorer(folder, with_gold=False, batch_size=8)
    cfg = EvaluateConfig(max_new_tokens=5, best_of_n=[1, 2], best_of_n_prompts=2, batch_size=64)
    shared = sample_policies(MANY[:6], tiny_base_model, tiny_base_model, None, cfg, decoder_parts(scorer.model.model))
    alone = sample_policies(MANY[:6], tiny_base_model, tiny_base_model, None, cfg)
    assert (shared.trunk_layers, alone.trunk_layers) == (1, 0)  # 1 of the tiny model's 2 layers: never the last
    assert [s.token_ids for s in shared.candidate] == [s.token_ids for s in alone.candidate]
    assert shared.candidate_ref_logprob == pytest.approx(alone.candidate_ref_logprob, abs=1e-3)
    lists = [shared.candidate, shared.reference, [s for pool in shared.reference_extra for s in pool]]
    reused = scorer.proxy_lists(MANY[:6], lists, shared.trunk_layers)
    assert [pytest.approx(x, abs=1e-4) for x in scorer.proxy_lists(MANY[:6], lists)] == reused
    bf16 = EvaluateConfig(**{**cfg.model_dump(), "dtype": "bfloat16"})
    assert sample_policies(MANY[:2], tiny_base_model, tiny_base_model, None, bf16, decoder_parts(scorer.model.model)).trunk_layers == 0


def test_a_rollout_of_prompts_of_very_different_lengths_joins_its_grouped_prefill(tiny_base_model, policy):
    """PPO's decode step prefills in groups of similar length too; the trunk states come back in one batch."""
    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.decoder import prefill_groups
    from rlhf_core.generation import encode_queries
    from rlhf_core.ppo import core
    from rlhf_core.ppo.rollout import sample_rollout

    tokenizer = load_tokenizer(tiny_base_model)
    ids, mask = encode_queries(tokenizer, MANY)
    assert len(prefill_groups(mask.sum(-1).tolist())) > 1
    rollout = sample_rollout(
        policy, ids, mask, max_new_tokens=4, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(2), feed_last=True,
    )  # fmt: skip
    for tokens, states in rollout.sampled_sequences():
        assert torch.allclose(states, _trunk_states(policy, tokens), atol=1e-4)
    out = policy(rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response)
    live = rollout.response_mask.bool()
    assert torch.allclose(core.logprobs_of(out.logits, rollout.response_ids, 1.0)[live], rollout.sample_logprobs[live], atol=1e-4)
