"""PPO pieces against hand-computed tensors, and the models' invariants on a tiny LM."""

import math

import pytest
import torch

from rlhf_core.config import KLConfig, PPOConfig
from rlhf_core.ppo import core
from rlhf_core.ppo.checkpoint import optimizer_from_files, optimizer_to_files, random_states, restore_random_states
from rlhf_core.ppo.kl import AdaptiveKLController, FixedKLController, make_kl_controller
from rlhf_core.ppo.trainer import PromptCycle

T = torch.tensor


# --------------------------------------------------------------------------- KL estimators


def test_k1_is_the_log_ratio():
    assert torch.allclose(core.kl_k1(T([-1.0, -2.0]), T([-1.5, -1.0])), T([0.5, -1.0]))


def test_k3_is_nonnegative_and_matches_hand_values():
    # log q/p = -0.5 and 1: (e^-0.5 - 1 + 0.5, e^1 - 1 - 1)
    k3 = core.kl_k3(T([-1.0, -2.0]), T([-1.5, -1.0]))
    assert torch.allclose(k3, T([math.exp(-0.5) - 0.5, math.e - 2.0]))
    assert core.kl_k3(T([-0.3]), T([-0.3])).item() == 0.0


# --------------------------------------------------------------------------- rewards


def test_missing_eos_penalty_replaces_the_score_of_unfinished_responses():
    scores, finished = T([2.0, 3.0]), T([True, False])
    assert torch.equal(core.apply_missing_eos_penalty(scores, finished, -1.0), T([2.0, -1.0]))
    assert torch.equal(core.apply_missing_eos_penalty(scores, finished, None), scores)


def test_last_token_index():
    mask = T([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    assert core.last_token_index(mask).tolist() == [1, 0, 2]


def test_shape_rewards_puts_the_score_on_the_last_token_and_the_kl_penalty_everywhere():
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 7.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    rewards = core.shape_rewards(T([1.0, 2.0]), kl, mask, beta=0.5)
    assert torch.allclose(rewards, T([[-0.05, -0.1, 0.85], [-0.25, 1.75, 0.0]]))


def test_masked_whiten_ignores_padding():
    values, mask = T([2.0, 4.0, 6.0, 100.0]), T([1, 1, 1, 0])
    assert torch.allclose(core.masked_whiten(values, mask), T([-1.0, 0.0, 1.0, 0.0]), atol=1e-6)
    # without the shift the mean is kept: (v - 4) / 2 + 4
    assert torch.allclose(core.masked_whiten(values, mask, shift_mean=False), T([3.0, 4.0, 5.0, 0.0]), atol=1e-6)


# --------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    advantages, returns = core.gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1, 1, 1]]), gamma=1.0, lam=0.5)
    # delta = (0.1, 0.1, 0.3); A2 = 0.3, A1 = 0.1 + 0.5*0.3, A0 = 0.1 + 0.5*0.25
    assert torch.allclose(advantages, T([[0.225, 0.25, 0.3]]))
    assert torch.allclose(returns, T([[0.725, 0.85, 1.0]]))


def test_gae_ends_the_episode_at_the_last_real_token():
    # padding holds garbage that must not leak into the bootstrap
    advantages, returns = core.gae(T([[0.0, 1.0, 5.0]]), T([[0.5, 0.6, 9.0]]), T([[1, 1, 0]]), gamma=0.9, lam=1.0)
    # A1 = 1 - 0.6 = 0.4 (next value 0: the episode ended), A0 = 0.9*0.6 - 0.5 + 0.9*0.4
    assert torch.allclose(advantages, T([[0.4, 0.4, 0.0]]))
    assert torch.allclose(returns, T([[0.9, 1.0, 0.0]]))


# --------------------------------------------------------------------------- losses


def test_clipped_policy_loss_by_hand():
    old = T([0.0, 0.0, 0.0])
    new = T([math.log(1.5), math.log(0.5), 3.0])  # the third token is padding
    mask = T([1, 1, 0])
    out = core.clipped_policy_loss(new, old, T([1.0, 1.0, 1.0]), mask, cliprange=0.2)
    # ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5: max(-0.5, -0.8) = -0.5
    assert out.loss.item() == pytest.approx(-0.85)
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.approx_kl.item() == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)
    negative = core.clipped_policy_loss(new, old, T([-1.0, -1.0, -1.0]), mask, cliprange=0.2)
    # ratio 1.5: max(1.5, 1.2) = 1.5; ratio 0.5: max(0.5, 0.8) = 0.8 (clipped)
    assert negative.loss.item() == pytest.approx(1.15)
    assert negative.clipfrac.item() == pytest.approx(0.5)


def test_policy_loss_gradient_raises_the_log_prob_of_good_tokens():
    logprobs = T([-1.0, -1.0], requires_grad=True)
    core.clipped_policy_loss(logprobs, T([-1.0, -1.0]), T([1.0, -1.0]), T([1, 1]), 0.2).loss.backward()
    assert logprobs.grad[0] < 0 < logprobs.grad[1]  # gradient descent raises token 0, lowers token 1


def test_clipped_value_loss_by_hand():
    out = core.clipped_value_loss(T([0.5, -0.1, 4.0]), T([0.0, 0.0, 0.0]), T([1.0, 1.0, 0.0]), T([1, 1, 0]), 0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64 (clipped); token 1: 1.21 either way
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert out.clipfrac.item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- log-probs, entropy


def test_logprobs_use_the_sampling_temperature():
    logits = T([[[0.0, math.log(3.0)]]])
    assert core.logprobs_of(logits, T([[1]]), 1.0).item() == pytest.approx(math.log(0.75))
    # at T = 0.5 the odds are squared: 1 : 9
    assert core.logprobs_of(logits, T([[1]]), 0.5).item() == pytest.approx(math.log(0.9))


def test_entropy():
    assert core.entropy_of(T([[[0.0, 0.0]]]), 1.0).item() == pytest.approx(math.log(2))
    assert core.entropy_of(T([[[0.0, 50.0]]]), 1.0).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- KL controllers


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # error +0.5, clipped to +0.2: beta * (1 + 0.2 * 10/100)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 10)  # error -0.1: beta * (1 - 0.1 * 0.1)
    assert ctl.value == pytest.approx(0.102 * 0.99)
    restored = make_kl_controller(KLConfig(controller="adaptive", beta=1.0))
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


# --------------------------------------------------------------------------- data cursor and checkpoint pieces


def test_prompt_cycle_visits_every_prompt_once_per_pass_and_resumes_from_its_cursor():
    cycle = PromptCycle(5, seed=3)
    first_pass = cycle.take(5)
    assert sorted(first_pass) == list(range(5))
    second_pass = cycle.take(5)
    assert sorted(second_pass) == list(range(5)) and second_pass != first_pass
    resumed = PromptCycle(5, seed=3)
    resumed.cursor = 3
    assert resumed.take(4) == first_pass[3:] + second_pass[:2]


def test_optimizer_state_round_trips_through_tensors_and_json():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, eps=1e-5)
    param.sum().backward()
    optimizer.step()
    tensors, meta = optimizer_to_files(optimizer.state_dict())
    import json

    state = optimizer_from_files(tensors, json.loads(json.dumps(meta)))
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == 0.1
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_random_states_round_trip():
    import random

    import numpy as np

    generator = torch.Generator().manual_seed(1)
    tensors, meta = random_states(generator)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    restore_random_states(tensors, meta, generator)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item()) == expected


# --------------------------------------------------------------------------- the models on a tiny LM


@pytest.fixture(scope="module")
def queries(tiny_base_model):
    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.generation import encode_queries

    tokenizer = load_tokenizer(tiny_base_model)
    ids, mask = encode_queries(tokenizer, ["Hi", "Name three rivers in Europe and say which is longest."])
    return tokenizer, ids, mask


def _rollout(model, queries, temperature=0.7, seed=0):
    from rlhf_core.ppo.rollout import sample_rollout

    tokenizer, ids, mask = queries
    return sample_rollout(
        model, ids, mask, max_new_tokens=6, temperature=temperature, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["freeze", "lora", "full"])
@pytest.mark.parametrize("value_model", ["head", "separate"])
def test_training_pass_matches_sampling_and_reference_starts_equal(tiny_base_model, queries, mode, value_model):
    from rlhf_core.ppo.policy import build_actor_critic

    torch.manual_seed(0)
    model = build_actor_critic(tiny_base_model, PPOConfig(mode=mode, freeze_layers=1, value_model=value_model), torch.device("cpu"))
    rollout = _rollout(model, queries)
    mask = rollout.response_mask.bool()
    out = model(rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response)
    logprobs = core.logprobs_of(out.logits, rollout.response_ids, 0.7)
    # log-probs of the training pass are those the sampler drew from (same temperature, same positions)
    assert torch.allclose(logprobs[mask], rollout.sample_logprobs[mask], atol=1e-4)
    ref = core.logprobs_of(model.reference_logits(rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response), rollout.response_ids, 0.7)
    assert torch.allclose(ref[mask], logprobs[mask], atol=1e-5)
    assert torch.equal(out.values, torch.zeros_like(out.values))  # value head starts at zero
    assert (rollout.trunk_hidden is None) == (mode == "full")


@pytest.mark.parametrize("mode", ["freeze", "full"])
def test_rollouts_and_candidates_come_from_one_sampling_loop(tiny_base_model, queries, mode):
    """PPO's rollout is the candidates' sampler with the policy's decode step: same seed, same tokens and log-probs."""
    from rlhf_core.generation import sample_tokens
    from rlhf_core.ppo.policy import build_actor_critic

    model = build_actor_critic(tiny_base_model, PPOConfig(mode=mode, freeze_layers=1), torch.device("cpu"))
    tokenizer, ids, mask = queries
    rollout = _rollout(model, queries, temperature=0.9, seed=5)
    plain = sample_tokens(
        model.lm, ids, mask, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=6, temperature=0.9, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert torch.equal(rollout.response_ids, plain.response_ids) and torch.equal(rollout.finished, plain.finished)
    assert torch.allclose(rollout.sample_logprobs, plain.sample_logprobs, atol=1e-5)
    assert (rollout.sample_logprobs[rollout.response_mask == 0] == 0).all()
    if mode == "freeze":  # the trunk's states of every position a later pass feeds
        assert rollout.trunk_hidden.shape[:2] == rollout.input_ids.shape


@pytest.mark.parametrize("value_model", ["head", "separate"])
def test_rollout_rows_that_ended_leave_the_batch_and_keep_what_the_sampler_computed(tiny_base_model, value_model, monkeypatch):
    """With rows dropped as they end, a rollout's tokens, log-probs, entropies, values and trunk states are those of a
    run that keeps every row, and the training pass still reproduces the sampler's log-probs."""
    import rlhf_core.generation as generation
    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.generation import encode_queries
    from rlhf_core.ppo.policy import ActorCritic, build_actor_critic
    from rlhf_core.ppo.rollout import sample_rollout

    tokenizer = load_tokenizer(tiny_base_model)
    step = ActorCritic.sample_step

    def stopping(self, *args, **kwargs):  # the stop token gets likely: rows end after a few tokens, at many steps
        trunk, final, logits = step(self, *args, **kwargs)
        return trunk, final, logits + 9.0 * (torch.arange(logits.shape[-1]) == tokenizer.eos_token_id)  # as below

    monkeypatch.setattr(ActorCritic, "sample_step", stopping)
    from rlhf_core.decoder import DecodeStep

    select, selected = DecodeStep.select_rows, []
    monkeypatch.setattr(DecodeStep, "select_rows", lambda self, rows, batch: selected.append(rows) or select(self, rows, batch))
    torch.manual_seed(0)
    model = build_actor_critic(tiny_base_model, PPOConfig(mode="freeze", freeze_layers=1, value_model=value_model), torch.device("cpu"))
    with torch.no_grad():
        model.value_head.linear.weight.normal_()  # values that differ by row and position
    ids, mask = encode_queries(tokenizer, [("word " * n).strip() + "?" for n in range(1, 13)])
    runs, default = [], generation.DROP_ENDED
    for share in (default, 2.0):  # 2.0: rows are never dropped
        monkeypatch.setattr(generation, "DROP_ENDED", share)
        runs.append(sample_rollout(model, ids, mask, max_new_tokens=12, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(4), feed_last=True))  # fmt: skip
    dropping, keeping = runs
    assert any(rows is not None for rows in selected)  # the first run dropped rows
    live = keeping.response_mask.bool()
    assert keeping.finished.sum() >= 8 and len(set(live.sum(-1).tolist())) >= 4
    assert torch.equal(dropping.response_ids, keeping.response_ids) and torch.equal(dropping.response_mask, keeping.response_mask)
    for name in ("sample_logprobs", "sample_entropy", "sample_values"):
        a, b = getattr(dropping, name), getattr(keeping, name)
        assert (a is None) == (b is None) == (name == "sample_values" and value_model == "separate")
        assert a is None or torch.allclose(a, b, atol=1e-5), name
    for (ids_a, a), (ids_b, b) in zip(dropping.sampled_sequences(), keeping.sampled_sequences()):
        assert ids_a == ids_b and torch.allclose(a, b, atol=1e-5)
    out = model(dropping.input_ids, dropping.attention_mask, dropping.trunk_hidden, dropping.n_response)
    logprobs = core.logprobs_of(out.logits + 9.0 * (torch.arange(out.logits.shape[-1]) == tokenizer.eos_token_id),
                                dropping.response_ids, 1.0)  # fmt: skip
    assert torch.allclose(logprobs[live], dropping.sample_logprobs[live], atol=1e-4)


def test_frozen_trunk_states_from_sampling_equal_a_fresh_pass(tiny_base_model, queries):
    from rlhf_core.ppo.policy import build_actor_critic

    model = build_actor_critic(tiny_base_model, PPOConfig(mode="freeze", freeze_layers=1), torch.device("cpu"))
    rollout = _rollout(model, queries)
    reused = model(rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response).logits
    fresh = model(rollout.input_ids, rollout.attention_mask, None, rollout.n_response).logits
    mask = rollout.response_mask.bool()
    assert torch.allclose(reused[mask], fresh[mask], atol=1e-4)


@pytest.mark.parametrize("mode", ["freeze", "lora"])
def test_what_trains_in_each_mode_and_the_reference_stays_put(tiny_base_model, queries, mode):
    from rlhf_core.ppo.policy import build_actor_critic

    model = build_actor_critic(tiny_base_model, PPOConfig(mode=mode, freeze_layers=1), torch.device("cpu"))
    names = set(model.trainable_state())
    assert "value_head.linear.weight" in names
    assert not any("embed_tokens" in n or "layers.0." in n for n in names)  # the trunk is frozen
    if mode == "lora":
        assert all("lora_" in n for n in names - {"value_head.linear.weight", "value_head.linear.bias"})
    rollout = _rollout(model, queries)
    args = (rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response)
    before = model.reference_logits(*args)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = model(*args)
    (core.logprobs_of(out.logits, rollout.response_ids, 1.0).sum() + out.values.sum()).backward()
    optimizer.step()
    assert not torch.allclose(model(*args).logits, out.logits)  # the policy moved
    assert torch.equal(model.reference_logits(*args), before)  # the reference did not


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_passes_run_in_ppo_dtype_with_fp32_weights_and_fp32_decode_steps_on_cpu(tiny_base_model, dtype):
    from rlhf_core.ppo.policy import build_actor_critic

    model = build_actor_critic(tiny_base_model, PPOConfig(mode="freeze", freeze_layers=1, dtype=dtype), torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # mixed precision: the weights stay fp32
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with model.autocast(tokens_per_row=8):
        assert (a @ b).dtype == getattr(torch, dtype)
    with model.autocast(tokens_per_row=1):
        assert (a @ b).dtype == torch.float32


def test_freeze_layers_must_leave_a_trainable_layer(tiny_base_model):
    from rlhf_core.errors import RLHFError
    from rlhf_core.ppo.policy import build_actor_critic

    with pytest.raises(RLHFError, match="freeze_layers"):
        build_actor_critic(tiny_base_model, PPOConfig(mode="freeze", freeze_layers=2), torch.device("cpu"))


@pytest.mark.parametrize("mode", ["lora", "freeze"])
def test_exported_policy_is_the_trained_policy(tiny_base_model, queries, tmp_path, mode):
    from rlhf_core.base_model import load_causal_lm
    from rlhf_core.ppo.policy import build_actor_critic, export_policy

    cfg = PPOConfig(mode=mode, freeze_layers=1)
    model = build_actor_critic(tiny_base_model, cfg, torch.device("cpu"))
    with torch.no_grad():  # move the trained weights away from the start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    rollout = _rollout(model, queries)
    expected = model(rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response).logits
    export_policy(model, cfg, tiny_base_model, tmp_path / "policy", queries[0])
    assert (tmp_path / "policy" / "model.safetensors").exists() and (tmp_path / "policy" / "tokenizer.json").exists()
    exported = load_causal_lm(tmp_path / "policy")
    assert not any("lora" in k or "value" in k for k in exported.state_dict())
    logits = exported(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[:, -rollout.n_response :]
    mask = rollout.response_mask.bool()
    assert torch.allclose(logits[mask], expected[mask], atol=1e-4)


@pytest.mark.parametrize("mode", ["freeze", "lora", "full"])
def test_bf16_rollouts_sample_from_a_copy_that_follows_training(tiny_base_model, queries, mode):
    """With ppo.dtype bfloat16 a rollout decodes through a bf16 copy of the weights, refreshed before every rollout:
    its log-probs are the training pass's to bf16 rounding, and the copy is never part of the policy's state."""
    from rlhf_core.ppo.policy import build_actor_critic

    model = build_actor_critic(tiny_base_model, PPOConfig(mode=mode, freeze_layers=1, dtype="bfloat16"), torch.device("cpu"))
    rollout = _rollout(model, queries, temperature=0.7, seed=3)
    sampler = model.__dict__["_sampling_copy"]
    assert sampler.parts.embed.weight.dtype == torch.bfloat16 and model.parts.embed.weight.dtype == torch.float32
    assert not any("_sampling_copy" in name for name, _ in model.named_parameters())
    assert rollout.trunk_hidden is None if mode == "full" else rollout.trunk_hidden.dtype == torch.float32
    logits = model(rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response).logits
    trained = torch.log_softmax(logits / 0.7, -1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    mask = rollout.response_mask.bool()
    assert (trained[mask] - rollout.sample_logprobs[mask]).abs().max() < 0.1

    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("value"))
    with torch.no_grad():
        param.add_(0.5)
    _rollout(model, queries)
    twins = [dst for src, dst in sampler._trained if src is param]
    assert twins and torch.equal(twins[0], param.detach().to(torch.bfloat16)), name
