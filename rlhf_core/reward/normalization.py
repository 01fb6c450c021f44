"""The completions that define reward zero: the base model's own, on the training prompts.

OpenAI's lm-human-preferences shifts and scales the reward so that the
reference policy's responses to the training queries score mean 0 and std 1;
PPO then starts from rewards of unit scale whatever the reward model learnt.
The first round's candidates are exactly such completions; later rounds sample
from the champion policy, so the base model is sampled afresh.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.config import CandidatesConfig
from rlhf_core.preferences import BUNDLE_FILES, PreferenceBundle

#: version labels of the starting policy (rlhf_core.tracking.resolve_policy): the base model, or the SFT model
BASE_VERSION_PREFIX = ("base:", "sft:")


@dataclass(frozen=True)
class BaseCompletions:
    prompts: list[str]
    responses: list[str]
    finished: list[bool]
    source: str  # "candidates", "sampled" or "imported" (the preference data's own answers)

    def __len__(self) -> int:
        return len(self.responses)

    def subsample(self, limit: int, seed: int) -> "BaseCompletions":
        """At most ``limit`` of them, drawn without replacement by ``seed`` (order kept)."""
        if len(self) <= limit:
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), limit))
        pick = lambda values: [values[i] for i in keep]  # noqa: E731
        return BaseCompletions(pick(self.prompts), pick(self.responses), pick(self.finished), self.source)


def candidate_base_completions(candidates: str | Path) -> BaseCompletions | None:
    """The base-model completions of the candidates bundle, or None when it holds none."""
    folder = Path(candidates)
    if not (folder / BUNDLE_FILES["completions"]).exists():
        return None
    bundle = PreferenceBundle.read(folder)
    prompts = {p.id: p.text for p in bundle.prompts}
    base = [c for c in bundle.completions if c.policy_version.startswith(BASE_VERSION_PREFIX) and c.prompt_id in prompts]
    if not base:
        return None
    return BaseCompletions(
        [prompts[c.prompt_id] for c in base], [c.text for c in base], [c.finished is not False for c in base], "candidates"
    )


def sample_base_completions(
    base_model: str | Path, prompts: list[str], count: int, sampling: CandidatesConfig, seed: int
) -> BaseCompletions:
    """``count`` fresh completions of the base model, spread evenly over ``prompts``, with the candidates' sampling."""
    from rlhf_core.generation import load_policy, sample_completions

    if len(prompts) > count:
        prompts = random.Random(seed).sample(prompts, count)
    per_prompt = math.ceil(count / len(prompts))
    model, tokenizer = load_policy(base_model, dtype=sampling.dtype)
    samples, _ = sample_completions(
        model,
        tokenizer,
        prompts,
        num_samples=per_prompt,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        batch_size=sampling.batch_size,
        seed=seed,
        desc="base completions",
    )
    samples = samples[:count]
    return BaseCompletions(
        [prompts[s.prompt_index] for s in samples], [s.text for s in samples], [s.finished for s in samples], "sampled"
    )
