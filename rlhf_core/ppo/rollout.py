"""Rollout: sample a batch of responses from the policy with a KV cache, keeping what PPO needs later.

Queries are left-padded, responses right-padded after the stop token.  Besides
the tokens, a rollout keeps

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

from rlhf_core.generation import sample_next_token
from rlhf_core.ppo.policy import ActorCritic, positions_from_mask


@dataclass
class Rollout:
    query_ids: torch.Tensor  # (B, Q) left-padded
    query_mask: torch.Tensor  # (B, Q)
    response_ids: torch.Tensor  # (B, R) pad after the stop token
    response_mask: torch.Tensor  # (B, R) 1 up to and including the stop token
    finished: torch.Tensor  # (B,) bool: the stop token was emitted
    sample_logprobs: torch.Tensor  # (B, R)
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

    def rows(self, index: torch.Tensor | slice) -> "Rollout":
        """The rollout restricted to some rows (a minibatch)."""
        return Rollout(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index]) for f in fields(self)})


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
) -> Rollout:
    """Sample up to ``max_new_tokens`` per row (pure sampling: PPO needs the policy's own distribution).

    Stops early once every row has emitted the stop token; rows that ended keep
    decoding pad tokens, which the response mask hides.
    """
    from transformers import DynamicCache

    batch = query_ids.shape[0]
    cache = DynamicCache(config=policy.parts.config)
    mask = query_mask.clone()
    positions = positions_from_mask(mask)
    step_ids, trunk_chunks = query_ids, []
    done = torch.zeros(batch, dtype=torch.bool, device=query_ids.device)
    tokens, logprobs, live = [], [], []
    for step in range(max_new_tokens):
        trunk_hidden, logits = policy.sample_step(step_ids, mask, positions, cache)
        trunk_chunks.append(trunk_hidden)
        token, logprob = sample_next_token(logits, temperature, generator)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        live.append(~done)
        tokens.append(token)
        logprobs.append(logprob)
        done = done | (token == eos_token_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        step_ids = token.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
    response_mask = torch.stack(live, dim=1).long()
    return Rollout(
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=torch.stack(tokens, dim=1),
        response_mask=response_mask,
        finished=done,
        sample_logprobs=torch.stack(logprobs, dim=1) * response_mask,
        trunk_hidden=None if policy.trunk_trainable else torch.cat(trunk_chunks, dim=1),
    )
