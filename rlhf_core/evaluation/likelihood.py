"""Log-probabilities of sampled responses under a causal LM: the raw material of KL and perplexity."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_core.generation import encode_queries


@torch.no_grad()
def response_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Sequence[int]],
    *,
    temperature: float,
    batch_size: int,
) -> list[float]:
    """``sum_t log p(y_t | x, y_<t)`` of every response under ``model``, one float per (prompt, response).

    Logits are divided by the sampling temperature, so these are log-probs of
    the distribution the responses were actually drawn from (the "N
    implementation details" of Huang et al. 2024).  Log-softmax runs in fp32
    even when the model computes in bf16.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    totals: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(responses[start : start + batch_size])
        query_ids, query_mask = encode_queries(tokenizer, list(prompts[start : start + batch_size]), device)
        width = max(1, max(len(r) for r in batch))
        response_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
        response_mask = torch.zeros_like(response_ids)
        for row, ids in enumerate(batch):
            response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[row, : len(ids)] = 1
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        # Only the logits that predict response tokens: the last `width + 1` positions minus the final one.
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1).logits
        logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
        picked = logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        totals.extend((picked * response_mask).sum(-1).tolist())
    return totals
