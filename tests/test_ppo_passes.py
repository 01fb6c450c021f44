"""PPO's sequence passes without the batch's left padding, and the fp32 sampler standing in for the old-policy pass."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.config import PPOConfig
from rlhf_core.ppo import core

#: Prompts of very different lengths: a batch of them is mostly left padding.
MANY = [("Why? " * (1 + 7 * (i % 4))) + f"Question {i}." for i in range(10)]


def _model(tiny_base_model, **overrides):
    from rlhf_core.ppo.policy import build_actor_critic

    torch.manual_seed(0)
    model = build_actor_critic(tiny_base_model, PPOConfig(freeze_layers=1, **overrides), torch.device("cpu"))
    with torch.no_grad():  # the value head and LoRA's B start at zero, which would hide mix-ups
        model.value_head.linear.weight.normal_(0, 0.5)
        model.value_head.linear.bias.fill_(0.1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _rollout(model, tiny_base_model, prompts=MANY, max_new_tokens=5, seed=1, eos=None, feed_last=False):
    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.generation import encode_queries
    from rlhf_core.ppo.rollout import sample_rollout

    tokenizer = load_tokenizer(tiny_base_model)
    ids, mask = encode_queries(tokenizer, prompts)
    return sample_rollout(
        model, ids, mask, max_new_tokens=max_new_tokens, temperature=0.8,
        eos_token_id=tokenizer.eos_token_id if eos is None else eos, pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(seed), feed_last=feed_last,
    )  # fmt: skip


def _trainable_grads(model, out) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (out.logits.logsumexp(-1).mean() + out.values.pow(2).mean()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("mode", "value_model"), [("freeze", "head"), ("full", "separate"), ("lora", "head")])
def test_passes_over_length_groups_equal_one_padded_batch(tiny_base_model, monkeypatch, mode, value_model):
    from rlhf_core.ppo import policy as policy_module

    model = _model(tiny_base_model, mode=mode, value_model=value_model)
    rollout = _rollout(model, tiny_base_model)
    args = (rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response)
    groups = policy_module.length_groups(rollout.attention_mask)
    assert len(groups) > 1 and any(start > 0 for _, start in groups)
    assert sorted(int(r) for rows, _ in groups for r in rows) == list(range(len(MANY)))

    # the positions the grouped passes run, packed into one tensor per stack: fewer than the padded batch's
    widths = []
    packed = policy_module.run_packed
    monkeypatch.setattr(policy_module, "run_packed", lambda layers, hidden, blocks: widths.append(hidden.shape[0]) or packed(layers, hidden, blocks))
    grouped = model(*args)
    stacks = 2 if value_model == "separate" else 1
    assert len(widths) == stacks and sum(widths) < stacks * rollout.input_ids.numel()
    grouped_ref = model.reference_logits(*args)
    grouped_grads = _trainable_grads(model, model(*args))
    # rows really are matched to their own outputs: swapping two rows' inputs swaps their outputs
    swap = torch.arange(len(MANY))
    swap[[0, 3]] = swap[[3, 0]]
    swapped = model(*(a[swap] if torch.is_tensor(a) else a for a in args))
    live = rollout.response_mask.bool()
    assert torch.allclose(swapped.values[0][live[3]], grouped.values[3][live[3]], atol=1e-4)
    assert torch.allclose(swapped.logits[3][live[0]], grouped.logits[0][live[0]], atol=1e-4)

    monkeypatch.setattr(policy_module, "PASS_PADDING", float("inf"))  # one group: the padded batch as it is
    assert len(policy_module.length_groups(rollout.attention_mask)) == 1
    padded, padded_ref = model(*args), model.reference_logits(*args)
    padded_grads = _trainable_grads(model, model(*args))

    assert torch.allclose(grouped.logits[live], padded.logits[live], atol=1e-4)
    assert torch.allclose(grouped.values[live], padded.values[live], atol=1e-4)
    assert torch.allclose(grouped_ref[live], padded_ref[live], atol=1e-4)
    if value_model == "separate":  # the value model alone (the old-policy pass the sampler cannot stand in for)
        assert torch.allclose(model.separate_values(*args)[live], padded.values[live], atol=1e-4)
    assert grouped_grads.keys() == padded_grads.keys() and grouped_grads
    for name, grad in grouped_grads.items():
        assert torch.allclose(grad, padded_grads[name], atol=1e-5, rtol=1e-3), name


@pytest.mark.parametrize("mode", ["freeze", "full", "lora"])
def test_the_fp32_sampler_stands_in_for_the_old_policy_pass(tiny_base_model, monkeypatch, mode):
    from rlhf_core.ppo.rollout import PolicyStep

    model = _model(tiny_base_model, mode=mode)
    assert model.samples_as_old_policy
    first = _rollout(model, tiny_base_model)
    rejoined = []
    rejoin = PolicyStep.rejoin
    monkeypatch.setattr(PolicyStep, "rejoin", lambda self, groups, *a: rejoined.append(groups) or rejoin(self, groups, *a))
    # Call a token the first rollout drew mid-answer the stop token: the same draws then end that row early.
    rollout = _rollout(model, tiny_base_model, eos=int(first.response_ids[0, 1]))
    assert rejoined and rejoined[0] > 1  # the prefill ran in groups, whose records were joined back
    out = model(rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response)
    live = rollout.response_mask.bool()
    assert not live.all()  # some rows ended early; their padding must hold zeros
    assert torch.allclose(rollout.sample_values[live], out.values[live], atol=1e-4)
    assert torch.allclose(rollout.sample_entropy[live], core.entropy_of(out.logits, 0.8)[live], atol=1e-4)
    assert torch.allclose(rollout.sample_logprobs[live], core.logprobs_of(out.logits, rollout.response_ids, 0.8)[live], atol=1e-4)
    assert (rollout.sample_values[~live] == 0).all() and (rollout.sample_entropy[~live] == 0).all()
    # a feed_last call predicts nothing and is not kept as a position
    fed = _rollout(model, tiny_base_model, eos=int(first.response_ids[0, 1]), feed_last=True)
    assert (fed.trunk_last is None) == (mode == "full")  # a trainable trunk keeps no states
    assert torch.equal(fed.sample_values, rollout.sample_values)


@pytest.mark.parametrize(
    ("overrides", "old_passes", "value_passes", "training_passes"),
    [
        ({}, 0, 0, 2),
        ({"mode": "full", "value_model": "separate"}, 0, 2, 2),
        ({"dtype": "bfloat16"}, 2, 0, 2),
        ({"minibatches": 1}, 0, 0, 1),  # the batch whole: the first training pass is the old-policy pass, exactly
    ],
)
def test_the_trainer_skips_the_old_policy_pass_only_where_the_sampler_ran_it(
    tiny_base_model, monkeypatch, overrides, old_passes, value_passes, training_passes
):
    from rlhf_core.ppo.policy import ActorCritic
    from rlhf_core.ppo.trainer import build_trainer

    cfg = PPOConfig(**{"mode": "freeze", "freeze_layers": 1, "batch_size": 4, "minibatches": 2, "max_new_tokens": 4, "ppo_epochs": 1, **overrides})
    trainer = build_trainer(cfg, tiny_base_model, lambda p, r, f: torch.ones(len(p)), MANY[:4])
    assert trainer.policy.samples_as_old_policy == ("dtype" not in overrides)
    calls, values = [], []
    forward, separate_values = ActorCritic.forward, ActorCritic.separate_values
    monkeypatch.setattr(ActorCritic, "forward", lambda self, *a: calls.append(torch.is_grad_enabled()) or forward(self, *a))
    monkeypatch.setattr(ActorCritic, "separate_values", lambda self, *a: values.append(1) or separate_values(self, *a))
    metrics = trainer.step()
    assert calls.count(False) == old_passes  # the old policy, one pass per minibatch of 2 rows
    assert len(values) == value_passes  # a separate value model runs alone where the sampler stood in
    assert calls.count(True) == training_passes  # the training steps
    assert metrics["ppo/entropy"] > 0 and abs(metrics["ppo/approx_kl"]) < 1e-3  # first step: new policy == old
    if trainer.reuses_first_pass:
        assert metrics["ppo/approx_kl"] == 0.0


@pytest.mark.parametrize("mode", ["freeze", "full"])
def test_the_rollouts_lm_head_runs_skinny_and_samples_what_a_plain_linear_samples(tiny_base_model, monkeypatch, mode):
    """PPO's one-token steps run the LM head (read through ``fp32_linear``) as ``weight @ x.T`` like the sampler's
    other fp32 layers, and draw the tokens that ``F.linear`` draws."""
    import rlhf_core.decoder as decoder

    model = _model(tiny_base_model, mode=mode)
    skinny, seen = decoder._skinny_linear, []
    monkeypatch.setattr(decoder, "_skinny_linear", lambda layer, gemm, x: seen.append(layer) or skinny(layer, gemm, x))
    runs = []
    for rows in (decoder.SKINNY_ROWS, 0):
        monkeypatch.setattr(decoder, "SKINNY_ROWS", rows)
        runs.append(_rollout(model, tiny_base_model, max_new_tokens=6))
    assert any(layer is model.parts.lm_head for layer in seen)
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.allclose(runs[0].sample_logprobs, runs[1].sample_logprobs, atol=1e-4)


def test_the_trainer_steps_with_fused_adamw_on_cpu(tiny_base_model):
    from rlhf_core.ppo.trainer import build_trainer

    cfg = PPOConfig(mode="full", batch_size=2, minibatches=1, max_new_tokens=3, ppo_epochs=1)
    trainer = build_trainer(cfg, tiny_base_model, lambda p, r, f: torch.ones(len(p)), MANY[:2])
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    trainer.step()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(("mode", "value_model"), [("freeze", "separate"), ("full", "separate"), ("lora", "head")])
def test_packed_groups_equal_each_group_through_the_layers_own_forward(tiny_base_model, monkeypatch, mode, value_model):
    """The groups packed into one tensor (one matmul per weight) compute what each group through the decoder
    layers' own forward computes: outputs, reference logits and every trainable weight's gradient."""
    from rlhf_core.ppo import policy as policy_module

    model = _model(tiny_base_model, mode=mode, value_model=value_model)
    rollout = _rollout(model, tiny_base_model)
    args = (rollout.input_ids, rollout.attention_mask, rollout.trunk_hidden, rollout.n_response)
    assert len(policy_module.length_groups(rollout.attention_mask)) > 1
    runs = []
    for packs in (True, False):
        monkeypatch.setattr(policy_module, "packs_layers", lambda layers, packs=packs: packs)
        out = model(*args)
        runs.append((out, model.reference_logits(*args), _trainable_grads(model, model(*args))))
    (packed, packed_ref, packed_grads), (own, own_ref, own_grads) = runs
    live = rollout.response_mask.bool()
    assert torch.allclose(packed.logits[live], own.logits[live], atol=1e-5)
    assert torch.allclose(packed.values[live], own.values[live], atol=1e-5)
    assert torch.allclose(packed_ref[live], own_ref[live], atol=1e-5)
    assert packed_grads.keys() == own_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, own_grads[name], atol=1e-6, rtol=1e-4), name


def test_layers_of_another_class_run_their_own_forward(tiny_base_model):
    from rlhf_core.decoder import packs_layers

    model = _model(tiny_base_model, mode="full")
    assert packs_layers(model.parts.layers)
    assert not packs_layers([*model.parts.layers, torch.nn.Identity()])
