"""Rollout: the policy's responses to a batch of queries, keeping what PPO needs later.

Sampling is :func:`rlhf_core.generation.sample_tokens`, the project's one loop,
with a decode step that runs the policy's own passes.  Besides the tokens, a
rollout keeps

* ``sample_logprobs`` - log-probs of the sampled tokens at the sampling
  temperature, as the sampler saw them (the old policy's in fp32, below);
* ``trunk_hidden`` - the frozen trunk's hidden states for every position that a
  later pass feeds (queries and all response tokens but the last).  Sampling
  computes them anyway; keeping them means the reference, old-policy, value and
  training passes of this batch never run the frozen layers again;
* ``trunk_last`` - with ``feed_last``, the trunk states of the last response
  token too, so that the reward model can read every response's trunk states
  from the rollout (:meth:`PolicyRollout.sampled_sequences`);
* ``sample_entropy`` and ``sample_values`` - when the sampler ran the policy's
  own fp32 weights (:attr:`rlhf_core.ppo.policy.ActorCritic.samples_as_old_policy`),
  the entropy of the distribution each token was drawn from and, with the value
  head on the policy (``value_model: head``), the value of every response
  position.  The sampler *is* the old policy then: with ``sample_logprobs``
  these are everything the old-policy pass would compute, so PPO skips that
  pass (a separate value model runs alone).  The numbers differ from that
  pass's by rounding: a one-token step sums in another order than a
  whole-sequence pass.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from rlhf_core import generation
from rlhf_core.decoder import RecordingStep
from rlhf_core.ppo import core
from rlhf_core.ppo.policy import ActorCritic


@dataclass
class PolicyRollout(generation.Rollout):
    """A sampled batch with the frozen trunk's hidden states (see the module's docstring)."""

    trunk_hidden: torch.Tensor | None  # (B, Q + R - 1, H) when the trunk is frozen
    trunk_last: torch.Tensor | None = None  # (B, 1, H): the last response position's, when it was fed
    sample_entropy: torch.Tensor | None = None  # (B, R) entropy of each token's sampling distribution, 0 after the end
    sample_values: torch.Tensor | None = None  # (B, R) the value head on the sampler's final states, 0 after the end

    @property
    def n_response(self) -> int:
        return self.response_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        """Query and response without the last response token: the positions whose outputs predict the response."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)[:, :-1]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)[:, :-1]

    def sampled_sequences(self) -> list[tuple[list[int], torch.Tensor]]:
        """Each row's tokens (query and response, no padding) with the trunk states computed for them, (T, H) on the
        CPU: every position's when the last token was fed, else all but the last response token's."""
        if self.trunk_hidden is None:
            raise ValueError("this rollout kept no trunk states (the trunk trains)")
        return self.with_states(self.trunk_hidden if self.trunk_last is None else torch.cat([self.trunk_hidden, self.trunk_last], dim=1))

    def rows(self, index: torch.Tensor | slice) -> "PolicyRollout":
        """The rollout restricted to some rows (a minibatch)."""
        return PolicyRollout(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index]) for f in fields(self)})


class PolicyStep(RecordingStep):
    """The policy's decode step; it keeps the trunk's hidden states of every position it runs (:meth:`states`).

    With ``ppo.dtype: float32`` it runs the policy's own weights.  With
    ``bfloat16`` it runs a bf16 copy of them (:class:`rlhf_core.decoder.SamplingCopy`,
    refreshed from the trained weights before each rollout) instead of autocast,
    which would re-cast every weight at every one-token step: a decode step then
    streams half the bytes, which is where a CPU decode step spends its time.
    In bf16 the log-probs PPO trains on are then the old-policy pass's, not the
    sampler's, so sampling in bf16 changes which tokens are drawn, not the loss's
    arithmetic.  In fp32 the step also keeps each position's entropy (and value),
    and the sampler stands in for the old-policy pass (see the module's docstring).
    """

    def __init__(self, policy: ActorCritic, temperature: float):
        super().__init__(policy, policy.trunk_layers, config=policy.parts.config)
        self.parts = policy.sampling_copy().parts if policy.dtype == "bfloat16" else None
        self.temperature = temperature
        # Per call, for its last position: the sampling distribution's entropy and the value (old-policy numbers).
        self.entropies: list[torch.Tensor] | None = [] if policy.samples_as_old_policy else None
        self.values: list[torch.Tensor] | None = [] if policy.samples_as_old_policy and not policy.separate_value else None

    def sampled_modules(self) -> list[nn.Module]:
        if self.parts is None:
            return [self.model]
        return [self.model, self.parts.embed, self.parts.layers, self.parts.norm, self.parts.lm_head]

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        trunk_hidden, final, logits = self.model.sample_step(input_ids, attention_mask, position_ids, cache, parts=self.parts)
        self.chunks.append(self.whole(trunk_hidden.float()))  # later passes read fp32 states
        if self.entropies is not None:
            self.entropies.append(self.whole(core.entropy_of(logits, self.temperature)))
        if self.values is not None:
            self.values.append(self.whole(self.model.value_head(final)))
        return logits

    def rejoin(self, groups: int, join, order: torch.Tensor) -> None:
        super().rejoin(groups, join, order)
        for kept in (self.entropies, self.values):
            if kept is not None:
                kept[-groups:] = [torch.cat(kept[-groups:])[order]]

    def repeat_rows(self, times: int) -> None:
        super().repeat_rows(times)
        for kept in (self.entropies, self.values):
            if kept is not None:
                kept[:] = [x.repeat_interleave(times, dim=0) for x in kept]

    def per_token(self, kept: list[torch.Tensor], response_mask: torch.Tensor) -> torch.Tensor:
        """(B, R) from one (B,) tensor per call: the prefill's and each step's predict the response's tokens in turn
        (a ``feed_last`` call predicts none)."""
        return torch.stack(kept[: response_mask.shape[1]], dim=1) * response_mask


@torch.no_grad()
def sample_rollout(
    policy: ActorCritic,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator,
    feed_last: bool = False,
) -> PolicyRollout:
    """Sample up to ``max_new_tokens`` per row (pure sampling: PPO needs the policy's own distribution); with
    ``feed_last`` (and a frozen trunk) keep the last response token's trunk states too."""
    step = PolicyStep(policy, temperature)
    feed_last = feed_last and not policy.trunk_trainable
    sampled = generation.sample_tokens(
        step, query_ids, query_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        max_new_tokens=max_new_tokens, temperature=temperature, generator=generator, feed_last=feed_last,
    )  # fmt: skip
    trunk_hidden = trunk_last = None
    if not policy.trunk_trainable:
        states = step.states()
        cut = query_ids.shape[1] + sampled.response_ids.shape[1] - 1
        trunk_hidden, trunk_last = states[:, :cut], (states[:, cut:] if feed_last else None)
    fields_ = {f.name: getattr(sampled, f.name) for f in fields(sampled)}
    if step.entropies is not None:
        fields_["sample_entropy"] = step.per_token(step.entropies, sampled.response_mask)
    if step.values is not None:
        fields_["sample_values"] = step.per_token(step.values, sampled.response_mask)
    return PolicyRollout(**fields_, trunk_hidden=trunk_hidden, trunk_last=trunk_last)
