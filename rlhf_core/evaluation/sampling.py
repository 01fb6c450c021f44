"""Sample the candidate, the reference and the champion on the eval prompts, with the log-probs KL needs.

Every policy samples the eval prompts with the same seed and the same batch
layout, so identical policies give identical responses (common random
numbers: differences between policies are not sampling noise).  The
reference's first sample per prompt serves both as its eval response and as
the first member of the best-of-n pool, so the pool costs only
``pool_size - 1`` further samples on ``best_of_n_prompts`` prompts.  One model
is resident at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.config import EvaluateConfig
from rlhf_core.errors import RLHFError
from rlhf_core.evaluation.likelihood import response_logprobs
from rlhf_core.generation import Sample, load_policy, sample_completions


@dataclass(frozen=True)
class Sampled:
    samples: list[Sample]
    tokens: int
    seconds: float


@dataclass(frozen=True)
class PolicySamples:
    """One response per prompt with its log-prob under the policy itself and under the reference."""

    samples: list[Sample]
    logprob: list[float]
    ref_logprob: list[float]

    @property
    def kl(self) -> list[float]:
        """Per-prompt estimate of KL(policy || reference): log p(y) - log p_ref(y) with y drawn from the policy."""
        return [own - ref for own, ref in zip(self.logprob, self.ref_logprob)]


@dataclass(frozen=True)
class EvalSamples:
    candidate: PolicySamples
    reference: PolicySamples  # its log-probs under itself and the reference are the same
    reference_extra: list[list[Sample]]  # pool_size - 1 more for each best-of-n prompt
    champion: PolicySamples | None
    tokens: int
    seconds: float


def _sample(model, tokenizer, prompts: list[str], num_samples: int, cfg: EvaluateConfig, seed: int, desc: str) -> Sampled:
    samples, stats = sample_completions(
        model,
        tokenizer,
        prompts,
        num_samples=num_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=seed,
        desc=desc,
    )
    return Sampled(samples, stats.tokens, stats.seconds)


def _logprobs(model, tokenizer, prompts: list[str], samples: list[Sample], cfg: EvaluateConfig) -> list[float]:
    return response_logprobs(
        model, tokenizer, prompts, [s.token_ids for s in samples], temperature=cfg.temperature, batch_size=cfg.batch_size
    )


def _policy(path: Path, prompts: list[str], cfg: EvaluateConfig, name: str) -> tuple[Sampled, list[float], int]:
    """A policy's responses, their log-probs under it, and its vocabulary size."""
    model, tokenizer = load_policy(path, cfg.dtype)
    sampled = _sample(model, tokenizer, prompts, 1, cfg, cfg.seed, name)
    return sampled, _logprobs(model, tokenizer, prompts, sampled.samples, cfg), len(tokenizer)


def _reference(path: Path, prompts: list[str], others: list[list[Sample]], cfg: EvaluateConfig, vocab: int):
    """The reference's responses, its best-of-n pool, and log-probs under it of its own and the ``others``' responses."""
    model, tokenizer = load_policy(path, cfg.dtype)
    if len(tokenizer) != vocab:
        raise RLHFError(f"{path}: its tokenizer ({len(tokenizer)} tokens) differs from the candidate's ({vocab})")
    own = _sample(model, tokenizer, prompts, 1, cfg, cfg.seed, "reference")
    extra = Sampled([], 0, 0.0)
    if cfg.pool_size > 1:
        pool_prompts = prompts[: cfg.best_of_n_prompts]
        extra = _sample(model, tokenizer, pool_prompts, cfg.pool_size - 1, cfg, cfg.seed + 1, "best-of-n pool")
    own_logprob = _logprobs(model, tokenizer, prompts, own.samples, cfg)
    return own, extra, own_logprob, [_logprobs(model, tokenizer, prompts, samples, cfg) for samples in others]


def sample_policies(
    prompts: list[str], candidate_path: Path, reference_path: Path, champion_path: Path | None, cfg: EvaluateConfig
) -> EvalSamples:
    """Everything the evaluation samples; models are loaded one after the other and released."""
    for name, path in (("candidate policy", candidate_path), ("reference model", reference_path), ("champion", champion_path)):
        if path is not None and not (Path(path) / "config.json").exists():
            raise RLHFError(f"{path}: no {name} there")
    candidate, candidate_logprob, vocab = _policy(Path(candidate_path), prompts, cfg, "candidate")
    gc.collect()
    policies = [(candidate, candidate_logprob)]
    if champion_path is not None:
        champion, champion_logprob, _ = _policy(Path(champion_path), prompts, cfg, "champion")
        policies.append((champion, champion_logprob))
        gc.collect()
    reference, extra, reference_logprob, under_ref = _reference(
        Path(reference_path), prompts, [sampled.samples for sampled, _ in policies], cfg, vocab
    )
    gc.collect()
    scored = [PolicySamples(sampled.samples, own, ref) for (sampled, own), ref in zip(policies, under_ref)]
    pools: list[list[Sample]] = [[] for _ in range(min(cfg.best_of_n_prompts, len(prompts)))]
    for sample in extra.samples:
        pools[sample.prompt_index].append(sample)
    parts = [sampled for sampled, _ in policies] + [reference, extra]
    return EvalSamples(
        candidate=scored[0],
        reference=PolicySamples(reference.samples, reference_logprob, reference_logprob),
        reference_extra=pools,
        champion=scored[1] if len(scored) > 1 else None,
        tokens=sum(p.tokens for p in parts),
        seconds=sum(p.seconds for p in parts),
    )
