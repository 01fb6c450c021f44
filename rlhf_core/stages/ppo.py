"""Stage ``ppo``: fine-tune the policy with PPO against the champion reward model.

1. Start from ``ppo.init_policy`` (``base``: the layout's starting policy - the
   SFT model when the sft stage trained one, else the base model - or a
   registered version), keep those weights as the frozen reference, and score with ``rlhf-reward-model@champion``.
2. Resume from the last checkpoint under ``<paths.checkpoints>/ppo`` when it
   belongs to this same run (settings, starting policy, reward model, prompts).
3. Train on the training prompts (cycled in seeded order); log every update to
   MLflow in one batched call; measure the gold score and the proxy on a fixed
   slice of eval prompts before training, every ``gold_eval_every`` updates and
   at the end.
4. Write ``<paths.plots>/ppo_curve.csv`` (read by the evaluation stage), save the
   policy (safetensors, LoRA merged, tokenizer included) to ``paths.policy``,
   log it and register a version of ``rlhf-policy`` with alias ``candidate``.

Runs unchanged under ``accelerate launch``: every process trains on its share of
each batch; only the main one logs, measures gold and writes files.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from rlhf_core import precision, tracking
from rlhf_core.artifacts import Layout
from rlhf_core.config import Params
from rlhf_core.errors import DataError, RLHFError
from rlhf_core.records import read_jsonl
from rlhf_core.schemas import Prompt

ARTIFACT_PATH = "policy"
CURVE_COLUMNS = [
    "update", "kl", "beta", "score", "rlhf_reward", "entropy", "approx_kl", "clipfrac",
    "response_length", "tokens_per_second", "gold", "gold_proxy",
]  # fmt: skip


def champion_reward_model() -> tracking.ModelRef:
    ref = tracking.model_by_alias(tracking.REWARD_MODEL, "champion")
    if ref is None:
        raise RLHFError(
            f"no reward model to train against: the registry has no {tracking.REWARD_MODEL}@champion "
            "(run `rlhf train-reward`; it names a champion only when the model passes reward.champion_min_accuracy)"
        )
    return ref


def read_prompts(path: Path, required: bool) -> list[str]:
    if not path.exists():
        if required:
            raise DataError(f"{path}: no training prompts (run `rlhf prompts` first)")
        return []
    prompts = [p.text for p in read_jsonl(path, Prompt)]
    if required and not prompts:
        raise DataError(f"{path}: no training prompts")
    return prompts


def write_curve(path: Path, history: list[dict]) -> None:
    """One row per update (row 0: the gold baseline before training); unmeasured cells stay empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CURVE_COLUMNS)
        for row in history:
            values = [row["update"]] + [row.get(f"ppo/{column}") for column in CURVE_COLUMNS[1:]]
            writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in values])
    tmp.replace(path)


def summary(history: list[dict]) -> dict:
    """Final and median figures of the run for ``metrics/ppo.json``."""
    updates = [row for row in history if row["update"] > 0]
    last = updates[-1]
    gold = [row for row in history if row.get("ppo/gold") is not None]
    out = {
        "ppo/updates": last["update"],
        **{f"ppo/final_{name}": last[f"ppo/{name}"] for name in ("kl", "beta", "score", "rlhf_reward", "entropy", "response_length")},
        "ppo/seconds_per_update_median": statistics.median(row["ppo/seconds_per_update"] for row in updates),
        "ppo/tokens_per_second_median": statistics.median(row["ppo/tokens_per_second"] for row in updates),
    }
    if gold:
        out.update({
            "ppo/gold_start": gold[0]["ppo/gold"], "ppo/gold_end": gold[-1]["ppo/gold"],
            "ppo/gold_proxy_start": gold[0]["ppo/gold_proxy"], "ppo/gold_proxy_end": gold[-1]["ppo/gold_proxy"],
        })  # fmt: skip
    return out


def _step_metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "update"}


def run(params: Params) -> dict:
    from accelerate import Accelerator

    from rlhf_core.gold import gold_score
    from rlhf_core.ppo.loop import GoldProbe, resume, run_fingerprint, train
    from rlhf_core.ppo.policy import export_policy
    from rlhf_core.ppo.trainer import build_trainer
    from rlhf_core.reward import RewardModel

    paths, cfg = params.paths, params.ppo
    reward_ref = champion_reward_model()
    layout = Layout(paths)
    # The starting policy is also PPO's frozen reference: with SFT on, the KL penalty is measured against it.
    start_path, start_label = tracking.resolve_policy(cfg.init_policy, layout.starting_policy)
    train_file = layout.prompts.train
    train_prompts = read_prompts(train_file, required=True)
    gold_prompts = read_prompts(layout.prompts.eval, required=False)[: cfg.gold_eval_prompts]

    # ---- models: the reward model scores on every process; the trainer wraps the policy for accelerate
    accelerator = Accelerator()
    reward = RewardModel.load(reward_ref.path)  # scored in its own reward.dtype, the path its normalisation holds in
    reward.model.to(accelerator.device)

    def score_fn(prompts: list[str], responses: list[str], finished: list[bool]):
        return reward.score(prompts, responses, finished, batch_size=cfg.batch_size)

    trainer = build_trainer(cfg, start_path, score_fn, train_prompts, accelerator)
    fingerprint = run_fingerprint(
        cfg, start=start_label, reward=f"{reward_ref.name}/{reward_ref.version}", prompts=tracking.hash_paths([train_file])
    )
    checkpoints = Path(paths.checkpoints) / "ppo"
    history, resumed_from = resume(trainer, checkpoints, fingerprint, cfg.updates)
    options = dict(
        updates=cfg.updates,
        checkpoint_dir=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
        fingerprint=fingerprint,
        gold=GoldProbe(gold_prompts, gold_score, score_fn, cfg.seed) if gold_prompts else None,
        gold_every=cfg.gold_eval_every,
    )
    if not accelerator.is_main_process:
        train(trainer, history=history, **options)
        return {}

    # ---- main process: MLflow run, curve, policy, registry
    with tracking.stage_run("ppo", metrics_dir=paths.metrics, config_sections=[cfg], inputs=[train_file]) as stage:
        numeric_path = {**precision.record("ppo", cfg.dtype, accelerator.device), "ppo/reward_dtype": reward.dtype}
        stage.log_params({**cfg.model_dump(), **numeric_path})
        stage.set_tags({"reward_model_version": reward_ref.version, "init_policy": start_label, "run_fingerprint": fingerprint})
        for row in history:  # a resumed run repeats the curve so far, so that this MLflow run shows all of it
            stage.log_step(_step_metrics(row), step=row["update"])
        history = train(
            trainer, history=history, on_update=lambda row: stage.log_step(_step_metrics(row), step=row["update"]), **options
        )
        write_curve(layout.ppo_curve.path, history)
        export_policy(trainer.policy, cfg, start_path, paths.policy, trainer.tokenizer)
        stage.log_artifact(paths.policy, ARTIFACT_PATH)
        lineage = {
            "reward_model_version": reward_ref.version,
            "ppo_run_id": stage.run_id,
            "init_policy": start_label,
            "prompts_hash": tracking.hash_paths([train_file]),
        }
        pairs = layout.preferences.pairs
        if pairs.exists():
            lineage["preference_data_hash"] = tracking.hash_paths([pairs])
        metrics = {
            **summary(history),
            "ppo/resumed_from_update": int(resumed_from.name.split("-")[-1]) if resumed_from else 0,
            "ppo/trainable_parameters": sum(t.numel() for t in trainer.policy.trainable_state().values()),
            **numeric_path,
            "ppo/reward_model_version": reward_ref.version,
            "ppo/init_policy": start_label,
        }
        # Registered only once the policy, the curve and the metrics are complete.
        metrics = stage.finish(metrics)
        version = tracking.register_version(tracking.POLICY_MODEL, stage, ARTIFACT_PATH, aliases=["candidate"], tags=lineage)
        return stage.finish({**metrics, "ppo/registered_version": int(version)})
