"""Stage ``generate_candidates``: K completions per training prompt from the current policy.

Writes ``paths.candidates`` as a bundle without rankings (``prompts.jsonl`` and
``completions.jsonl``); each completion records the policy version and the seed
that wrote it, how many tokens it has and whether the policy ended it itself.

With ``labeling.backend: import`` the preferences come with their own
completions and the reward model normalises on them, so nothing reads
candidates: the stage writes an empty bundle at once instead of sampling, and
``dvc repro`` trains on the import without this stage's minutes of sampling.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from rlhf_core import precision
from rlhf_core.artifacts import Layout
from rlhf_core.config import CandidatesConfig, Params
from rlhf_core.generation import GenerationStats, Sample, load_policy, sample_completions
from rlhf_core.schemas import Completion, Prompt
from rlhf_core.tracking import resolve_policy, stage_run


def completion_id(policy_version: str, seed: int, prompt_id: str, sample_index: int) -> str:
    """Unique across candidate rounds: the same prompt sampled by another policy or seed gets new ids."""
    key = f"{policy_version}|{seed}|{prompt_id}|{sample_index}"
    return "c" + hashlib.sha256(key.encode()).hexdigest()[:12]


def to_completions(prompts: list[Prompt], samples: list[Sample], policy_version: str, seed: int) -> list[Completion]:
    return [
        Completion(
            id=completion_id(policy_version, seed, prompts[s.prompt_index].id, s.sample_index),
            prompt_id=prompts[s.prompt_index].id,
            text=s.text,
            policy_version=policy_version,
            seed=seed,
            num_tokens=s.num_tokens,
            finished=s.finished,
        )
        for s in samples
    ]


def generate(cfg: CandidatesConfig, prompts: list[Prompt], policy: Path, policy_version: str) -> tuple[list[Completion], GenerationStats]:
    """Sample ``cfg.k`` completions for each prompt with the sampling settings of ``cfg``."""
    model, tokenizer = load_policy(policy, dtype=cfg.dtype)
    samples, stats = sample_completions(
        model,
        tokenizer,
        [p.text for p in prompts],
        num_samples=cfg.k,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        desc="candidates",
    )
    return to_completions(prompts, samples, policy_version, cfg.seed), stats


def candidate_metrics(completions: list[Completion], prompts: list[Prompt], stats: GenerationStats) -> dict:
    n = len(completions)
    return {
        "candidates/prompts": len(prompts),
        "candidates/completions": n,
        "candidates/tokens": stats.tokens,
        "candidates/seconds": round(stats.seconds, 3),
        "candidates/tokens_per_second": round(stats.tokens_per_second, 2),
        "candidates/mean_tokens": sum(c.num_tokens for c in completions) / n,
        "candidates/finished_rate": sum(bool(c.finished) for c in completions) / n,
        "candidates/mean_words": sum(len(c.text.split()) for c in completions) / n,
        "candidates/empty_rate": sum(not c.text.strip() for c in completions) / n,
    }


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.candidates
    layout = Layout(paths)
    train_file, out = layout.prompts.train, layout.candidates
    with stage_run(
        "generate_candidates", metrics_dir=paths.metrics, config_sections=[cfg], inputs=[train_file]
    ) as stage:
        if params.labeling.backend == "import":
            shutil.rmtree(out.folder, ignore_errors=True)
            out.write_candidates([], [])
            print("generate_candidates: skipped, labeling.backend is import (the imported preferences bring their own "
                  "completions)")
            return stage.finish({"candidates/prompts": 0, "candidates/completions": 0,
                                 "candidates/skipped": "labeling.backend is import"})
        prompts = layout.prompts.read_train()[: cfg.max_prompts]
        policy, policy_version = resolve_policy(cfg.policy, layout.starting_policy)
        from rlhf_core.decoder import sampling_record

        numeric_path = sampling_record("candidates", cfg.dtype, precision.default_device())
        stage.log_params({**cfg.model_dump(), "policy_version": policy_version, **numeric_path})
        completions, stats = generate(cfg, prompts, policy, policy_version)
        shutil.rmtree(out.folder, ignore_errors=True)
        out.write_candidates(prompts, completions)
        return stage.finish(
            {**candidate_metrics(completions, prompts, stats), "candidates/policy_version": policy_version, **numeric_path}
        )
