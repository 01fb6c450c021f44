"""Log-probabilities of sampled responses under a causal LM: the raw material of KL and perplexity."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_core.generation import chat_prompt, encode_queries
from rlhf_core.reward.trunk import FrozenTrunk


#: Padded tokens (rows x longest query + longest response) per forward pass; rows are length-sorted first.
MAX_BATCH_TOKENS = 4096


def length_batches(lengths: Sequence[tuple[int, int]], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Row indexes grouped for padded forward passes: sorted by (query, response) length, at most ``batch_size``
    rows and ``max_tokens`` padded tokens per group (a longer single row still gets a group of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    widest_query = widest_response = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        query, response = lengths[index]
        query_width, response_width = max(widest_query, query), max(widest_response, response)
        if current and (len(current) >= batch_size or (len(current) + 1) * (query_width + response_width) > max_tokens):
            batches.append(current)
            current, query_width, response_width = [], query, response
        current.append(index)
        widest_query, widest_response = query_width, response_width
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def response_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Sequence[int]],
    *,
    temperature: float,
    batch_size: int,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    trunks: Sequence[tuple[list[int], torch.Tensor] | None] | None = None,
    trunk_layers: int = 0,
) -> list[float]:
    """``sum_t log p(y_t | x, y_<t)`` of every response under ``model``, one float per (prompt, response).

    Logits are divided by the sampling temperature, so these are log-probs of
    the distribution the responses were actually drawn from (the "N
    implementation details" of Huang et al. 2024).  Log-softmax runs in fp32
    even when the model computes in bf16.  Rows are batched by length: with
    prompts of very different lengths, one wide batch is mostly padding.

    With ``trunks`` (per row, the prompt and response tokens and the hidden
    states after ``model``'s first ``trunk_layers`` layers at them, as
    :func:`rlhf_core.generation.sample_completions` keeps them for a sampler
    sharing those layers: ``Sample.trunk``) only the layers above run, for
    every batch whose rows all have states for the very tokens read here.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    chats = [chat_prompt(tokenizer, p) for p in prompts]
    query_lengths = [len(ids) for ids in tokenizer(chats, add_special_tokens=False).input_ids] if chats else []
    lengths = [(q, len(r)) for q, r in zip(query_lengths, responses)]
    totals = [0.0] * len(prompts)
    for rows in length_batches(lengths, batch_size, max_batch_tokens):
        batch = [responses[i] for i in rows]
        query_ids, query_mask = encode_queries(tokenizer, [prompts[i] for i in rows], device)
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
        states = _matching_states(trunks, rows, query_ids, query_mask, batch)
        if states is None:
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1).logits
        else:
            embeds = _states_in_layout(states, query_mask, [len(r) for r in batch], width)
            with FrozenTrunk(model, trunk_layers).upper():
                logits = model(inputs_embeds=embeds.to(device), attention_mask=mask, position_ids=positions,
                               logits_to_keep=width + 1).logits  # fmt: skip
        logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
        picked = logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        for row, total in zip(rows, (picked * response_mask).sum(-1).tolist()):
            totals[row] = total
    return totals


def _matching_states(trunks, rows, query_ids, query_mask, responses) -> list[torch.Tensor] | None:
    """The rows' trunk states when every row has them for exactly its prompt and response tokens, else None."""
    if trunks is None:
        return None
    states = []
    for row, index in enumerate(rows):
        trunk = trunks[index]
        query = query_ids[row, query_ids.shape[1] - int(query_mask[row].sum()) :].tolist()
        if trunk is None or trunk[0] != query + list(responses[row]) or trunk[1].shape[0] < len(trunk[0]) - 1:
            return None
        states.append(trunk[1])
    return states


def _states_in_layout(states: list[torch.Tensor], query_mask: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """Per-row trunk states (prompt then response tokens) laid out as the token batch: prompt left-padded to the
    query width, response right-padded to ``width``; zeros at padding."""
    queries = query_mask.shape[1]
    out = states[0].new_zeros((len(states), queries + width, states[0].shape[-1]))
    for row, (state, length) in enumerate(zip(states, lengths)):
        query = int(query_mask[row].sum())
        out[row, queries - query : queries] = state[:query]
        response = state[query : query + length]  # the last token's state may be missing: nothing reads it
        out[row, queries : queries + response.shape[0]] = response
    return out
