"""Stage ``train_reward``: train, normalise, evaluate and register the reward model.

1. Group the preference pairs by prompt and hold out whole prompts.
2. Train with TRL's ``RewardTrainer``, all pairs of a prompt in one batch element
   (K forward passes for C(K,2) pairs), the frozen lower layers run once per
   completion, the head started as a linear probe (:mod:`rlhf_core.reward.trainer`).
3. Normalise: the base model's own completions on the training prompts (for
   imported data, the training split's own answers) score mean 0, std 1.
4. Measure held-out pairwise accuracy next to its ceiling (annotator agreement;
   for simulated labels, the gold score's own accuracy on the same noisy pairs),
   accuracy by rank distance and calibration.
5. Save ``paths.reward_model``, log it to MLflow, register a version of
   ``rlhf-reward-model`` as ``candidate``; it becomes ``champion`` only when its
   held-out accuracy reaches ``reward.champion_min_accuracy``.

Runs unchanged under ``accelerate launch`` with several processes: every process
trains; only the main one writes files, MLflow runs and registry entries.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from rlhf_core import precision, tracking
from rlhf_core.artifacts import Layout, MetricsFolder
from rlhf_core.config import Params
from rlhf_core.records import atomic_write_text, read_jsonl
from rlhf_core.reward import RewardModel
from rlhf_core.reward.data import PromptComparisons, load_prompt_comparisons, num_pairs, split_by_prompt
from rlhf_core.reward.metrics import conversations, heldout_metrics, score_conversations
from rlhf_core.reward.release import RewardRelease
from rlhf_core.reward.normalization import BaseCompletions, candidate_base_completions, sample_base_completions
from rlhf_core.reward.trainer import check_scores, fit_reward_model, is_main_process, loss_first_last, loss_window
from rlhf_core.schemas import Prompt

ARTIFACT_PATH = "reward_model"
CHAMPION, CANDIDATE, PREVIOUS = "champion", "candidate", "previous"


def normalization_completions(params: Params, train: list[PromptComparisons]) -> BaseCompletions:
    """What scores mean 0, std 1: the training split's own answers for imported data, else base-model completions.

    Imported preferences (``labeling.backend: import``) come without candidates;
    sampling the base model on their long multi-turn prompts took minutes and
    16 GB.  Their answers - human-rated responses to the very prompts trained
    on - are a sample of the same kind of text, and they are already scored:
    ``reward.normalization_samples`` of them, drawn by ``reward.seed``.
    Otherwise: the candidates when the base model wrote them, else fresh samples.
    """
    paths, cfg = params.paths, params.reward
    if params.labeling.backend == "import":
        return imported_completions(train).subsample(cfg.normalization_samples, cfg.seed)
    found = candidate_base_completions(paths.candidates)
    if found is None:
        prompts = training_prompts(params, train)
        start = Layout(paths).starting_policy.require()  # the SFT model when sft is on: the policy PPO starts from
        found = sample_base_completions(start, prompts, cfg.normalization_samples, params.candidates, cfg.seed)
    return found.subsample(cfg.normalization_samples, cfg.seed)


def imported_completions(train: list[PromptComparisons]) -> BaseCompletions:
    items = conversations(train)
    return BaseCompletions([p for p, _, _ in items], [r for _, r, _ in items], [f for _, _, f in items], "imported")


def training_prompts(params: Params, train: list[PromptComparisons]) -> list[str]:
    """The prompts PPO trains on (the prompts stage's train split), else those of the preference data."""
    layout = Layout(params.paths)
    for path in (layout.candidates.prompts, layout.prompts.train):
        if path.exists():
            prompts = [p.text for p in read_jsonl(path, Prompt)]
            if prompts:
                return prompts
    return [group.prompt for group in train]


def noise_ceiling(metrics_dir: str | Path, validation: list[PromptComparisons]) -> dict[str, float]:
    """What held-out accuracy should be read against, from the collect_preferences stage's metrics.

    ``agreement``: how often two annotators order a pair alike.  ``gold_accuracy``
    (simulated labels only): how often the gold score that generated the labels
    agrees with them on the same held-out pairs - the best any model can do there.
    """
    collected = MetricsFolder(Path(metrics_dir)).read("collect_preferences")
    ceiling = {}
    if collected.get("preferences/agreement") is not None:
        ceiling["agreement"] = float(collected["preferences/agreement"])
    if collected.get("preferences/gold_accuracy") is not None:
        from rlhf_core.gold import gold_accuracy

        ceiling["gold_accuracy"] = gold_accuracy([c.pair for group in validation for c in group.comparisons])
    return ceiling


def write_loss_curve(path: str | Path, losses: list[tuple[int, float]]) -> None:
    """``plots/reward_loss.csv`` with columns step, loss (the DVC plot of this stage), replaced atomically."""
    atomic_write_text(path, "".join(f"{step},{loss}\n" for step, loss in [("step", "loss"), *losses]))


def register(stage: tracking.StageRun, folder: str | Path, accuracy: float, min_accuracy: float) -> tuple[str, bool]:
    """Log the model folder, register it as ``candidate``; move ``champion`` to it only if accurate enough."""
    stage.log_artifact(folder, ARTIFACT_PATH)
    model = tracking.REWARD_MODEL
    version = tracking.register_version(
        model, stage, ARTIFACT_PATH, aliases=[CANDIDATE], tags={"heldout_accuracy": f"{accuracy:.4f}"}
    )
    if accuracy < min_accuracy:
        reason = f"held-out accuracy {accuracy:.3f} < reward.champion_min_accuracy {min_accuracy}"
        tracking.tag_version(model, version, {"status": "not_champion", "not_champion_reason": reason})
        return version, False
    old = tracking.model_by_alias(model, CHAMPION)
    if old is not None:
        tracking.set_alias(model, PREVIOUS, old.version)
    tracking.set_alias(model, CHAMPION, version)
    tracking.tag_version(model, version, {"status": "champion"})
    return version, True


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.reward
    Layout(paths).base_model.require()
    groups = load_prompt_comparisons(paths.preferences, cfg.margin)
    train, validation = split_by_prompt(groups, cfg.validation_fraction, cfg.seed)
    output_dir = Path(paths.checkpoints) / "reward"
    if not is_main_process():
        # A secondary process of a distributed launch only takes its share of the training.
        fit_reward_model(paths.base_model, cfg, train, output_dir)
        return {}

    with tracking.stage_run(
        "train_reward", metrics_dir=paths.metrics, config_sections=[cfg], inputs=[paths.preferences, paths.candidates]
    ) as stage:
        start = time.perf_counter()
        stage.log_params(cfg.model_dump())
        fit = fit_reward_model(paths.base_model, cfg, train, output_dir)
        if fit.lengths.note():
            print(f"train_reward: {fit.lengths.note()}", file=sys.stderr)
        reward_model = RewardModel(fit.model, fit.tokenizer, reads_stop_token=cfg.read_stop_token, dtype=cfg.dtype)
        device = next(fit.model.parameters()).device
        numeric_path = precision.record("reward", cfg.dtype, device)
        stage.log_params(numeric_path)

        # One pass scores both the normalisation set and the held-out completions (in round 1 they overlap).
        base = normalization_completions(params, train)
        base_items = list(zip(base.prompts, base.responses, base.finished))
        heldout_items = conversations(validation)
        with precision.autocast(cfg.dtype, device):  # the path every later stage scores this model in
            scores = score_conversations(fit.scorer, base_items + heldout_items, cfg.score_batch_size, desc="scoring")
        heldout_scores = torch.tensor([scores[item] for item in heldout_items])
        check_scores(torch.tensor(list(scores.values())), heldout_scores, cfg.learning_rate)
        reward_model.fit_normalization(torch.tensor([scores[item] for item in base_items]))
        normalised = (heldout_scores - reward_model.shift) / reward_model.scale
        loss_first, loss_last = loss_first_last(fit.losses)
        metrics = {**heldout_metrics(validation, scores), **noise_ceiling(paths.metrics, validation)}
        reward_model.save(paths.reward_model)
        write_loss_curve(Layout(paths).reward_loss.path, fit.losses)
        stage.log_curve("reward/train_loss", [loss for _, loss in fit.losses], start=1)
        metrics.update(
            {
                "gap_to_gold": metrics["gold_accuracy"] - metrics["accuracy"] if "gold_accuracy" in metrics else None,
                "heldout_reward_mean": float(normalised.mean()),
                "heldout_reward_std": float(normalised.std(unbiased=False)),
                "shift": reward_model.shift,
                "scale": reward_model.scale,
                "normalization_samples": len(base),
                "normalization_source": base.source,
                "train_prompts": len(train),
                "train_pairs": fit.pairs,
                "heldout_prompts": len(validation),
                "heldout_pairs": num_pairs(validation),
                "truncated_completions": fit.lengths.cut,
                "length_p50": fit.lengths.p50,
                "length_p90": fit.lengths.p90,
                "length_p99": fit.lengths.p99,
                "length_max": fit.lengths.longest,
                "trainable_parameters": fit.trainable_parameters,
                "train_steps": fit.steps,
                "train_loss_first": loss_first,
                "train_loss_last": loss_last,
                "train_loss_window": loss_window(fit.losses),
                "train_seconds": fit.seconds,
                "pairs_per_second": fit.pairs * cfg.epochs / fit.seconds if fit.seconds > 0 else None,
                "stage_seconds": time.perf_counter() - start,
                "content_hash": tracking.hash_paths([paths.reward_model]),
            }
        )
        # Registered only once the folder, the curve and the metrics are complete: a kill before this
        # line leaves no version, one after it a version whose outputs are all there.
        summary = stage.finish({**{f"reward/{k}": v for k, v in metrics.items() if v is not None}, **numeric_path})
        version, champion = register(stage, paths.reward_model, metrics["accuracy"], cfg.champion_min_accuracy)
        release = RewardRelease(
            name=tracking.REWARD_MODEL,
            version=version,
            content_hash=metrics["content_hash"],
            heldout_accuracy=metrics["accuracy"],
            min_accuracy=cfg.champion_min_accuracy,
            run_id=stage.run_id,
        )
        release.write(paths.reward_release)
        return stage.finish({**summary, "reward/registered_version": int(version), "reward/champion": champion})

