"""What both sides of the benchmark run, and what each side measures about itself.

The driver writes a :class:`Workload` as JSON for each side's subprocess, so
every side sees the same model, reward model, prompts, PPO settings and thread
count.
"""

from __future__ import annotations

import functools
import json
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

#: Seed of the reward model's randomly initialised scalar head (the same head on every side).
REWARD_HEAD_SEED = 0


@dataclass(frozen=True)
class Workload:
    """One side's assignment: models, prompts, PPO settings (params.yaml ``ppo:`` fields), updates, threads."""

    side: str
    model: str
    reward_model: str
    prompts: list[str]
    ppo: dict
    updates: int
    threads: int
    trl_dir: str


def first_prompts(source: Path, text_field: str, count: int) -> list[str]:
    """The texts of the first ``count`` prompts of a JSONL prompt set, ordered by ``id``."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda row: str(row["id"]))
    return [row[text_field] for row in rows[:count]]


def model_and_prompts(repo: Path, params_file: str, model: str | None, count: int):
    """(params, model folder, the first ``count`` prompts) a benchmark runs on: ``model`` or the params'
    ``paths.base_model``, and the params' prompt set; an :class:`RLHFError` naming what is missing."""
    from rlhf_core.config import load_params
    from rlhf_core.errors import RLHFError

    params = load_params(params_file)
    model_dir = Path(model or repo / params.paths.base_model)
    if not (model_dir / "config.json").exists():
        raise RLHFError(f"no model at {model_dir}: run `dvc repro base_model` (or pass --model)")
    return params, model_dir, first_prompts(repo / params.paths.prompt_source, params.prompts.text_field, count)


def one_line_errors(main):
    """A benchmark's ``main(argv)`` that ends on an :class:`RLHFError` (a missing model or prompt set, bad params)
    with ``error: ...`` on one line of stderr and exit status 2, not a traceback."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        from rlhf_core.errors import RLHFError

        try:
            return main(argv)
        except RLHFError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapped


def limit_threads(threads: int) -> None:
    """The same thread count on every side: torch's intra-op pool and any OpenMP/MKL pool."""
    import torch

    torch.set_num_threads(threads)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process plus that of any waited-for children (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) * 1024


def build_reward_model(base: str, out_dir: Path, max_length: int) -> dict:
    """The benchmark's reward (and TRL's value) model: the base LM as ``AutoModelForSequenceClassification``
    with one label and a seeded head, saved as a reward-model folder with identity normalisation.

    The head is drawn N(0, 1/(hidden+1)) as in lm-human-preferences, from a fixed seed, so
    every side scores with exactly the same weights.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf_core.reward.model import RewardModel, reward_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, use_safetensors=True, dtype=torch.float32)
    tokenizer = reward_tokenizer(base, max_length)
    model.config.pad_token_id = tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(REWARD_HEAD_SEED)
    with torch.no_grad():
        std = 1 / math.sqrt(model.config.hidden_size + 1)
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) * std)
    RewardModel(model.eval(), tokenizer).save(out_dir)
    return {"path": str(out_dir), "head_seed": REWARD_HEAD_SEED, "max_length": max_length}
