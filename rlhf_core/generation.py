"""Batched sampling with a KV cache, shared by the candidates, PPO and evaluation stages.

One small sampling loop instead of ``model.generate``: it returns exactly what
RLHF needs (response token ids, whether the policy emitted its stop token) and
its randomness comes from one ``torch.Generator`` per call, so a seed fixes the
samples whatever else the process has done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_core.base_model import load_tokenizer
from rlhf_core.decoder import DecodeStep, RecordingStep, reserve, skinny_linears
from rlhf_core.precision import default_device


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    num_tokens: int
    finished: bool
    logprob: float = 0.0  # sum of the sampled tokens' log-probs at the sampling temperature (untruncated)
    # with sample_completions(trunk_layers=k): the prompt's and the response's tokens, and the hidden states after the
    # first k layers at each of them ((T, d) fp32) - what a model sharing those layers reads instead of computing them
    trunk: tuple[list[int], torch.Tensor] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class GenerationStats:
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Rollout:
    """Token-level result of sampling one batch (left-padded queries, right-padded responses)."""

    query_ids: torch.Tensor  # (B, Q)
    query_mask: torch.Tensor  # (B, Q)
    response_ids: torch.Tensor  # (B, R), pad after the stop token
    response_mask: torch.Tensor  # (B, R), 1 up to and including the stop token
    finished: torch.Tensor  # (B,) bool: the stop token was emitted
    sample_logprobs: torch.Tensor  # (B, R) log-probs of the sampled tokens at the sampling temperature, 0 after the end

    def with_states(self, states: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
        """Each row's tokens (query and response, no padding) and its rows of ``states`` ((B, T, d) over the padded
        layout, T up to Q + R), as (T_row, d) copies on the CPU: a row's states stop where ``states`` does."""
        width, out = self.query_ids.shape[1], []
        for row in range(self.query_ids.shape[0]):
            start = width - int(self.query_mask[row].sum())  # left padding
            ids = self.query_ids[row, start:].tolist() + self.response_ids[row, : int(self.response_mask[row].sum())].tolist()
            out.append((ids, states[row, start : start + len(ids)].cpu().clone()))
        return out


def load_policy(path: str | Path, dtype: str):
    """A causal LM with weights in ``dtype``, ready for sampling (eval mode, on the default device), and its tokenizer.

    ``dtype`` is a stage's ``dtype`` knob (:mod:`rlhf_core.precision`); the tokenizer pads on the left.
    """
    from rlhf_core.base_model import load_causal_lm

    model = load_causal_lm(path, dtype=dtype)
    return model.to(default_device()).eval(), load_tokenizer(path)


#: A short system turn.  Without one, SmolLM2's chat template inserts a 31-token default system prompt that
#: every query, rollout and reward-model pass would carry (more than half of a typical query).
SYSTEM_PROMPT = "You are a helpful assistant."


def chat_prompt(tokenizer, text: str) -> str:
    """The prompt as the model sees it: chat template with the assistant turn opened."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # some templates (e.g. Gemma's) refuse a system role
        return tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)


def conversation_text(tokenizer, prompt: str, response: str, finished: bool = True) -> str:
    """Prompt and response as the reward model reads them (the stop token only if the policy emitted it)."""
    return chat_prompt(tokenizer, prompt) + response + (tokenizer.eos_token if finished else "")


def encode_queries(tokenizer, prompts: list[str], device: torch.device | None = None):
    """Left-padded chat-formatted prompts: (input_ids, attention_mask)."""
    enc = tokenizer([chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    device = device or torch.device("cpu")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


#: tokens per block of the two-level inverse CDF in :func:`sample_next_token`
CDF_BLOCK = 256


def sample_next_token(
    logits: torch.Tensor, temperature: float, generator: torch.Generator, top_p: float = 1.0, *,
    batch: int | None = None, rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(logits / temperature) (optionally nucleus-truncated); return it with
    its log-prob under the untruncated tempered distribution.

    When ``logits`` holds only ``rows`` of a batch of ``batch`` rows (the sampler no longer runs rows that
    ended), the uniform numbers are drawn for the whole batch and ``rows``' taken: a row draws the same
    numbers whichever other rows still run.

    Inverse-CDF sampling: one uniform number per row against the cumulative
    weights - on a CPU about 15x faster than ``torch.multinomial`` over a 49k
    vocabulary.  The CDF is taken in two levels: sums of blocks of
    :data:`CDF_BLOCK` tokens (cumulated in float64, so rounding never skips a
    block) pick the block, the cumulative weights inside that block pick the
    token; a token of weight zero is never drawn.  The weights are
    ``exp(logit - max)`` unnormalised, and the log-prob is ``logit - max -
    log(sum)``: one pass of ``exp`` over the vocabulary per step.
    """
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    top = scaled.amax(-1, keepdim=True)
    weights = (scaled - top).exp_()
    total = weights.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_weights, order = torch.sort(weights, descending=True)
        # keep the smallest prefix whose mass reaches top_p
        drop = sorted_weights.cumsum(-1) - sorted_weights > top_p * total
        weights = weights.scatter(-1, order, sorted_weights.masked_fill(drop, 0.0))
    token = _inverse_cdf(weights, generator, batch, rows)
    return token, (scaled.gather(-1, token[:, None]) - top - total.log()).squeeze(-1)


def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator, batch: int | None = None,
                 among: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One index per row drawn in proportion to ``weights`` (B, V) >= 0 (see :func:`sample_next_token`)."""
    rows, vocab = weights.shape
    blocks = -(-vocab // CDF_BLOCK)
    padded = F.pad(weights, (0, blocks * CDF_BLOCK - vocab)).view(rows, blocks, CDF_BLOCK)
    block_cdf = padded.sum(-1).double().cumsum(-1)  # (B, blocks)
    # Drawn where the generator lives (a CPU generator gives the same stream whatever device the model is on).
    draws = rows if among is None else batch
    uniform = torch.rand(draws, 1, generator=generator, dtype=torch.float64, device=generator.device).to(weights.device)
    uniform = (uniform if among is None else uniform[among]) * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, uniform, right=True).clamp(max=blocks - 1)  # (B, 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(uniform))
    inside = padded.gather(1, block[:, :, None].expand(rows, 1, CDF_BLOCK)).squeeze(1)  # (B, CDF_BLOCK)
    offset = torch.searchsorted(inside.double().cumsum(-1), uniform - before, right=True)
    # Rounding can leave the remainder at the block's very end: take its last token of non-zero weight.
    last = torch.where(inside > 0, torch.arange(CDF_BLOCK, device=weights.device), -1).amax(-1, keepdim=True)
    offset = torch.minimum(offset, last)
    return (block * CDF_BLOCK + offset).squeeze(-1).clamp(max=vocab - 1)


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's leading padding positions (B,): the columns before its first real token."""
    return (attention_mask.cumsum(-1) == 0).sum(-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (the same rule ``generate`` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


#: Share of the rows a decode step runs that must have ended before the sampler stops running them: dropping
#: rows copies their batch's KV cache once (about what one step's cache update copies), so it waits for enough.
DROP_ENDED = 0.125
#: The sampler runs a multiple of this many rows when it drops some (ended rows make up the rest): on a CPU, MKL's
#: fp32 matmuls with a row count just below a multiple of 8 take up to 40% longer than with the multiple
#: (bench/README.md, ``ended_rows.py``).
ROW_MULTIPLE = 8


@torch.no_grad()
def sample_tokens(
    model,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator,
    num_samples: int = 1,
    feed_last: bool = False,
) -> Rollout:
    """Sample up to ``max_new_tokens`` per row with a KV cache; stop early when every row has ended.

    The one sampling loop of the project: candidates, evaluation and PPO's rollouts
    all come from here.  ``model`` is a causal LM or a
    :class:`rlhf_core.decoder.DecodeStep`, whose ``prefill`` runs the prompts (in groups of similar length, so
    that left padding costs little compute).  The attention mask of the whole
    response is allocated once, and so is the room for it in every layer's KV
    cache (:func:`rlhf_core.decoder.reserve`: steps write in place, the same bits).  With
    ``num_samples > 1`` each query is processed once and its cache repeated, so
    the K samples of a prompt share one prompt pass; output rows are query-major
    (query 0's samples first).  Once at least :data:`DROP_ENDED` of the rows
    a step runs have ended, the loop stops running them: their caches leave the
    batch (``Cache.batch_select_indices``) and the step computes only the rows
    still writing, made up to a multiple of :data:`ROW_MULTIPLE` rows
    (:meth:`rlhf_core.decoder.DecodeStep.select_rows`); until then ended rows
    decode pad tokens, which the response mask hides.  Each row draws its
    random numbers as if every row still ran, so dropping rows changes no
    sample beyond float rounding.  The one-token steps of a batch of at most
    :data:`rlhf_core.decoder.SKINNY_ROWS` rows run their linear layers through the compiled kernel or as
    ``weight @ x.T`` (:func:`rlhf_core.decoder.skinny_linears`).  With
    ``feed_last`` the last sampled tokens also go through one more step (its
    logits unused), for a ``model`` that keeps what its steps compute: PPO's
    rollout then holds the trunk states of every response token, which the
    reward model can read (:class:`rlhf_core.reward.trunk.RolloutTrunkScorer`).
    """
    step = model if isinstance(model, DecodeStep) else DecodeStep(model)
    step.select_rows(None, query_ids.shape[0] * num_samples)
    width = query_ids.shape[1]
    cache = step.new_cache()
    positions = positions_from_mask(query_mask)
    logits = step.prefill(query_ids, query_mask, positions, cache)
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        step.repeat_rows(num_samples)
        logits, positions = logits.repeat_interleave(num_samples, dim=0), positions.repeat_interleave(num_samples, dim=0)
        query_ids = query_ids.repeat_interleave(num_samples, dim=0)
        query_mask = query_mask.repeat_interleave(num_samples, dim=0)
    reserve(cache, max_new_tokens)  # each step writes its position in place (no copy of the cache per step)
    batch = query_ids.shape[0]
    mask = torch.cat([query_mask, query_mask.new_ones(batch, max_new_tokens)], dim=-1)
    next_position = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=query_ids.device)
    tokens, logprobs, live = [], [], []
    with skinny_linears(*step.sampled_modules()):
        for index in range(max_new_tokens):
            token, logprob = sample_next_token(logits, temperature, generator, top_p, batch=batch, rows=step.rows)
            # Back to the whole batch: a row the step no longer runs has ended, so it gets the pad token just below.
            token, logprob = step.whole(token), step.whole(logprob)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            live.append(~done)
            tokens.append(token)
            logprobs.append(logprob)
            done = done | (token == eos_token_id)
            if bool(done.all()) or index == max_new_tokens - 1:
                break
            # Rows that ended before this token need no more steps (a row that ends with it needs this one: its
            # stop token's position is run, as a step that records states must).
            writing = step.running(live[-1])
            running = writing.numel()
            needed = min(running, -(-int(writing.sum()) // ROW_MULTIPLE) * ROW_MULTIPLE)
            if running - needed >= max(1.0, DROP_ENDED * running):
                # the rows still writing, made up to a multiple of ROW_MULTIPLE with rows that ended (they decode pads)
                keep = torch.argsort((~writing).to(torch.int8), stable=True)[:needed].sort().values
                cache.batch_select_indices(keep)
                mask, next_position = mask[keep], next_position[keep]
                step.select_rows(keep if step.rows is None else step.rows[keep], batch)
            logits = step(step.running(token).unsqueeze(-1), mask[:, : width + index + 1], next_position, cache)
            next_position = next_position + 1
        if feed_last:
            step(step.running(token).unsqueeze(-1), mask[:, : width + index + 1], next_position, cache)
    response_mask = torch.stack(live, dim=1).long()
    return Rollout(query_ids, query_mask, torch.stack(tokens, dim=1), response_mask, done,
                   torch.stack(logprobs, dim=1) * response_mask)  # fmt: skip


def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    desc: str | None = None,
    trunk_layers: int = 0,
) -> tuple[list[Sample], GenerationStats]:
    """``num_samples`` completions for every prompt, in prompt order; deterministic for a given seed.

    With ``trunk_layers`` > 0 each sample also keeps its tokens' hidden states after that many layers
    (``Sample.trunk``, computed by the sampling itself: :class:`rlhf_core.decoder.RecordingStep`).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Sorting by prompt length keeps padding (wasted compute) small within each batch.
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    prompts_per_batch = max(1, batch_size // num_samples)
    samples: list[Sample] = []
    tokens, start = 0, time.perf_counter()
    with tqdm(total=len(prompts) * num_samples, desc=desc, unit="sample", disable=desc is None) as bar:
        for first in range(0, len(order), prompts_per_batch):
            chunk = order[first : first + prompts_per_batch]
            query_ids, query_mask = encode_queries(tokenizer, [prompts[p] for p in chunk], device)
            step = RecordingStep(model, trunk_layers) if trunk_layers else model
            rollout = sample_tokens(
                step,
                query_ids,
                query_mask,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                num_samples=num_samples,
                feed_last=bool(trunk_layers),
            )
            trunks = rollout.with_states(step.states()) if trunk_layers else None
            for row in range(rollout.response_ids.shape[0]):
                prompt_index, sample_index = chunk[row // num_samples], row % num_samples
                length = int(rollout.response_mask[row].sum())
                ids = rollout.response_ids[row, :length].tolist()
                finished = bool(rollout.finished[row])
                text_ids = ids[:-1] if finished else ids
                text = tokenizer.decode(text_ids, skip_special_tokens=True)
                logprob = float(rollout.sample_logprobs[row].sum())
                trunk = trunks[row] if trunks else None
                samples.append(Sample(prompt_index, sample_index, text, ids, length, finished, logprob, trunk))
                tokens += length
            bar.update(rollout.response_ids.shape[0])
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    samples.sort(key=lambda s: (s.prompt_index, s.sample_index))
    return samples, GenerationStats(tokens, time.perf_counter() - start)
