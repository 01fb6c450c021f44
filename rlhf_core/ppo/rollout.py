"""Rollout: the policy's responses to a batch of queries, keeping what PPO needs later.

Sampling is :func:`rlhf_core.generation.sample_tokens`, the project's one loop,
with a decode step that runs the policy's own passes.  Besides the tokens, a
rollout keeps

* ``sample_logprobs`` - log-probs of the sampled tokens at the sampling
  temperature, as the sampler saw them (a check on the training pass);
* ``trunk_hidden`` - the frozen trunk's hidden states for every position that a
  later pass feeds (queries and all response tokens but the last).  Sampling
  computes them anyway; keeping them means the reference, old-policy, value and
  training passes of this batch never run the frozen layers again.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhf_core import generation
from rlhf_core.ppo.policy import ActorCritic


@dataclass
class PolicyRollout(generation.Rollout):
    """A sampled batch with the frozen trunk's hidden states (see the module's docstring)."""

    trunk_hidden: torch.Tensor | None  # (B, Q + R - 1, H) when the trunk is frozen

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

    def rows(self, index: torch.Tensor | slice) -> "PolicyRollout":
        """The rollout restricted to some rows (a minibatch)."""
        return PolicyRollout(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index]) for f in fields(self)})


class PolicyStep(generation.DecodeStep):
    """The policy's decode step; it keeps the trunk's hidden states of every position it runs.

    With ``ppo.dtype: float32`` it runs the policy's own weights.  With
    ``bfloat16`` it runs a bf16 copy of them (:class:`rlhf_core.decoder.SamplingCopy`,
    refreshed from the trained weights before each rollout) instead of autocast,
    which would re-cast every weight at every one-token step: a decode step then
    streams half the bytes, which is where a CPU decode step spends its time.
    The log-probs PPO trains on are the old-policy pass's, not the sampler's, so
    sampling in bf16 changes which tokens are drawn, not the loss's arithmetic.
    """

    def __init__(self, policy: ActorCritic):
        super().__init__(policy, config=policy.parts.config)
        self.trunk_chunks: list[torch.Tensor] = []
        self.parts = policy.sampling_copy().parts if policy.dtype == "bfloat16" else None

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        trunk_hidden, logits = self.model.sample_step(input_ids, attention_mask, position_ids, cache, parts=self.parts)
        self.trunk_chunks.append(trunk_hidden.float())  # later passes read fp32 states
        return logits

    def prefill(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        return self(input_ids, attention_mask, position_ids, cache)  # one pass: the trunk states stay one batch


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
) -> PolicyRollout:
    """Sample up to ``max_new_tokens`` per row (pure sampling: PPO needs the policy's own distribution)."""
    step = PolicyStep(policy)
    sampled = generation.sample_tokens(
        step, query_ids, query_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        max_new_tokens=max_new_tokens, temperature=temperature, generator=generator,
    )  # fmt: skip
    trunk_hidden = None if policy.trunk_trainable else torch.cat(step.trunk_chunks, dim=1)
    return PolicyRollout(**{f.name: getattr(sampled, f.name) for f in fields(sampled)}, trunk_hidden=trunk_hidden)
