"""Batched sampling with a KV cache, shared by the candidates, PPO and evaluation stages.

One small sampling loop instead of ``model.generate``: it returns exactly what
RLHF needs (response token ids, whether the policy emitted its stop token) and
its randomness comes from one ``torch.Generator`` per call, so a seed fixes the
samples whatever else the process has done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from rlhf_core.base_model import load_tokenizer


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    num_tokens: int
    finished: bool


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


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls are then about 2.4x faster than fp32 here (STACK.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str) -> torch.dtype:
    """'auto' picks bf16 where the hardware has fast bf16 (CUDA with bf16, or a bf16-capable CPU)."""
    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(path: str | Path, dtype: str = "auto"):
    """A causal LM ready for sampling (eval mode, on the default device) and its left-padding tokenizer."""
    from rlhf_core.base_model import load_causal_lm

    model = load_causal_lm(path, dtype=str(resolve_dtype(dtype)).removeprefix("torch."))
    return model.to(default_device()).eval(), load_tokenizer(path)


def chat_prompt(tokenizer, text: str) -> str:
    """The prompt as the model sees it: chat template with the assistant turn opened."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def conversation_text(tokenizer, prompt: str, response: str, finished: bool = True) -> str:
    """Prompt and response as the reward model reads them (the stop token only if the policy emitted it)."""
    return chat_prompt(tokenizer, prompt) + response + (tokenizer.eos_token if finished else "")


def encode_queries(tokenizer, prompts: list[str], device: torch.device | None = None):
    """Left-padded chat-formatted prompts: (input_ids, attention_mask)."""
    enc = tokenizer([chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    device = device or torch.device("cpu")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu() if generator.device.type == "cpu" else probs, 1, generator=generator).to(logits.device)


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
) -> Rollout:
    """Sample up to ``max_new_tokens`` per row with a KV cache; stop early when every row has ended."""
    batch = query_ids.shape[0]
    mask = query_mask.clone()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=query_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    next_position = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=query_ids.device)
    tokens, live = [], []
    for _ in range(max_new_tokens):
        token = _next_token(logits, temperature, top_p, generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        live.append(~done)
        tokens.append(token)
        done = done | (token == eos_token_id)
        if bool(done.all()):
            break
        # Rows that have ended keep decoding pad tokens; their outputs are masked out of the response.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(
            input_ids=token.unsqueeze(-1), attention_mask=mask, position_ids=next_position, past_key_values=cache, use_cache=True
        )
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_position = next_position + 1
    response = torch.stack(tokens, dim=1)
    response_mask = torch.stack(live, dim=1).long()
    return Rollout(query_ids, query_mask, response, response_mask, done)


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
) -> tuple[list[Sample], GenerationStats]:
    """``num_samples`` completions for every prompt, in prompt order; deterministic for a given seed."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    jobs = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    # Sorting by prompt length keeps padding (wasted compute) small within each batch.
    jobs.sort(key=lambda job: len(prompts[job[0]]))
    samples: list[Sample] = []
    tokens, start = 0, time.perf_counter()
    with tqdm(total=len(jobs), desc=desc, unit="sample", disable=desc is None) as bar:
        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first : first + batch_size]
            query_ids, query_mask = encode_queries(tokenizer, [prompts[p] for p, _ in chunk], device)
            rollout = sample_tokens(
                model,
                query_ids,
                query_mask,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
            )
            for row, (prompt_index, sample_index) in enumerate(chunk):
                length = int(rollout.response_mask[row].sum())
                ids = rollout.response_ids[row, :length].tolist()
                finished = bool(rollout.finished[row])
                text_ids = ids[:-1] if finished else ids
                samples.append(
                    Sample(prompt_index, sample_index, tokenizer.decode(text_ids, skip_special_tokens=True), ids, length, finished)
                )
                tokens += length
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    samples.sort(key=lambda s: (s.prompt_index, s.sample_index))
    return samples, GenerationStats(tokens, time.perf_counter() - start)
