"""Sample the candidate, the reference and the champion on the eval prompts, with the log-probs KL needs.

Every policy samples ``samples_per_prompt`` responses to each eval prompt with
the same seed and the same batch layout, so identical policies give identical
responses (common random numbers: differences between policies are not
sampling noise).  The reference's eval responses also open the best-of-n pool,
so the pool costs only ``pool_size - samples_per_prompt`` further samples on
``best_of_n_prompts`` prompts.  One model is resident at a time.

When the candidate, the reference and the reward model share their embeddings
and lower layers (PPO and the reward model both freeze the same lower layers
of the SFT model: 24 of 30 by default) and everything computes in fp32, the
samples keep their hidden states after those layers (``Sample.trunk``): the
reference's log-probs of the candidate's responses and the reward model's
scores then run only the layers above (``EvalSamples.trunk_layers``).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.artifacts import MODEL_CONFIG_FILE
from rlhf_core.config import EvaluateConfig
from rlhf_core.decoder import DecoderParts, decoder_parts
from rlhf_core.errors import RLHFError
from rlhf_core.evaluation.likelihood import response_logprobs
from rlhf_core.generation import Sample, load_policy, sample_completions
from rlhf_core.reward.trunk import shared_layers


@dataclass(frozen=True)
class Sampled:
    samples: list[Sample]
    tokens: int
    seconds: float


@dataclass(frozen=True)
class EvalSamples:
    candidate: list[Sample]  # samples_per_prompt per prompt, prompt by prompt
    candidate_logprob: list[float]  # of each candidate response under the candidate
    candidate_ref_logprob: list[float]  # ... and under the reference
    reference: list[Sample]  # samples_per_prompt per prompt
    reference_extra: list[list[Sample]]  # pool_size - samples_per_prompt more (if any) for each best-of-n prompt
    champion: list[Sample] | None
    tokens: int
    seconds: float
    trunk_layers: int = 0  # the layers whose output the samples keep (Sample.trunk); 0: none
    samples_per_prompt: int = 1

    @property
    def kl(self) -> list[float]:
        """Per-response estimate of KL(candidate || reference): log p(y) - log p_ref(y), y drawn from the candidate."""
        return [own - ref for own, ref in zip(self.candidate_logprob, self.candidate_ref_logprob)]


def _sample(model, tokenizer, prompts: list[str], num_samples: int, cfg: EvaluateConfig, seed: int, desc: str,
            trunk_layers: int = 0) -> Sampled:  # fmt: skip
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
        trunk_layers=trunk_layers,
    )
    return Sampled(samples, stats.tokens, stats.seconds)


def _shared(model, trunk: DecoderParts | None, cfg: EvaluateConfig) -> int:
    """How many lower layers ``model`` shares with ``trunk`` (the reward model's), when both may reuse them; never all
    of them (the last layer's hidden state is read after the final norm)."""
    if trunk is None or cfg.dtype != "float32":
        return 0
    parts = decoder_parts(model)
    return shared_layers(parts, trunk, limit=len(parts.layers) - 1)


def _keeps(model, trunk: DecoderParts | None, cfg: EvaluateConfig, layers: int) -> int:
    """``layers`` when ``model`` shares at least that many lower layers with ``trunk``, else 0."""
    return layers if layers and _shared(model, trunk, cfg) >= layers else 0


def _logprobs(model, tokenizer, prompts: list[str], samples: list[Sample], cfg: EvaluateConfig, trunk_layers: int) -> list[float]:
    return response_logprobs(
        model, tokenizer, [prompts[s.prompt_index] for s in samples], [s.token_ids for s in samples],
        temperature=cfg.temperature, batch_size=cfg.batch_size,
        trunks=[s.trunk for s in samples] if trunk_layers else None, trunk_layers=trunk_layers,
    )  # fmt: skip


def _candidate(path: Path, prompts: list[str], cfg: EvaluateConfig, trunk: DecoderParts | None):
    """The candidate's responses, their log-probs under it (the sampler's own, no second pass), its vocabulary size
    and the lower layers it shares with ``trunk``, whose output its samples keep."""
    model, tokenizer = load_policy(path, cfg.dtype)
    layers = _shared(model, trunk, cfg)
    sampled = _sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg, cfg.seed, "candidate", layers)
    return sampled, [s.logprob for s in sampled.samples], len(tokenizer), layers


def _reference(path: Path, prompts: list[str], candidate: list[Sample], cfg: EvaluateConfig, vocab: int, trunk, layers: int):
    """The reference's responses, its best-of-n pool, the candidate's responses' log-probs under it, and the layers
    whose output they all keep (``layers`` when the reference shares them too, else 0)."""
    model, tokenizer = load_policy(path, cfg.dtype)
    if len(tokenizer) != vocab:
        raise RLHFError(f"{path}: its tokenizer ({len(tokenizer)} tokens) differs from the candidate's ({vocab})")
    layers = _keeps(model, trunk, cfg, layers)
    own = _sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg, cfg.seed, "reference", layers)
    extra = Sampled([], 0, 0.0)
    if cfg.pool_size > cfg.samples_per_prompt:
        pool_prompts = prompts[: cfg.best_of_n_prompts]
        more = cfg.pool_size - cfg.samples_per_prompt
        extra = _sample(model, tokenizer, pool_prompts, more, cfg, cfg.seed + 1, "best-of-n pool", layers)
    return own, extra, _logprobs(model, tokenizer, prompts, candidate, cfg, layers), layers


def _champion(path: Path, prompts: list[str], cfg: EvaluateConfig, trunk, layers: int) -> Sampled:
    """The champion's responses (only compared with the candidate's: its own KL is not measured)."""
    model, tokenizer = load_policy(path, cfg.dtype)
    layers = _keeps(model, trunk, cfg, layers)
    return _sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg, cfg.seed, "champion", layers)


def sample_policies(
    prompts: list[str], candidate_path: Path, reference_path: Path, champion_path: Path | None, cfg: EvaluateConfig,
    trunk: DecoderParts | None = None,
) -> EvalSamples:  # fmt: skip
    """Everything the evaluation samples; models are loaded one after the other and released.  ``trunk``: the reward
    model's decoder, when it scores in fp32 (see the module's docstring)."""
    for name, path in (("candidate policy", candidate_path), ("reference model", reference_path), ("champion", champion_path)):
        if path is not None and not (Path(path) / MODEL_CONFIG_FILE).exists():
            raise RLHFError(f"{path}: no {name} there")
    candidate, candidate_logprob, vocab, layers = _candidate(Path(candidate_path), prompts, cfg, trunk)
    gc.collect()
    reference, extra, candidate_ref_logprob, layers = _reference(
        Path(reference_path), prompts, candidate.samples, cfg, vocab, trunk, layers
    )
    gc.collect()
    champion = _champion(Path(champion_path), prompts, cfg, trunk, layers) if champion_path is not None else None
    gc.collect()
    pools: list[list[Sample]] = [[] for _ in range(min(cfg.best_of_n_prompts, len(prompts)))]
    for sample in extra.samples:
        pools[sample.prompt_index].append(sample)
    parts = [candidate, reference, extra] + ([champion] if champion else [])
    return EvalSamples(
        candidate=candidate.samples,
        candidate_logprob=candidate_logprob,
        candidate_ref_logprob=candidate_ref_logprob,
        reference=reference.samples,
        reference_extra=pools,
        champion=champion.samples if champion else None,
        tokens=sum(p.tokens for p in parts),
        seconds=sum(p.seconds for p in parts),
        trunk_layers=layers,
        samples_per_prompt=cfg.samples_per_prompt,
    )
