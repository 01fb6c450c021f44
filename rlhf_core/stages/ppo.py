"""Stage ``ppo``: fine-tune the policy with PPO against the reward model train_reward handed over.

1. Start from ``ppo.init_policy`` (``base``: the layout's starting policy - the
   SFT model when the sft stage trained one, else the base model - or a
   registered version; the flow resolves the ``champion`` alias to a version
   before the stage runs), keep those weights as the frozen reference, and
   score with the reward model ``train_reward`` handed over (``paths.reward_model``
   as named by ``paths.reward_release``); one that missed its accuracy bar stops
   the stage before any training.
2. Resume from the last checkpoint under ``<paths.checkpoints>/ppo`` when it
   belongs to this same run (settings, starting policy, reward model, prompts).
3. Train on the training prompts (cycled in seeded order); log every update to
   MLflow in one batched call; measure the gold score and the proxy on a fixed
   slice of eval prompts before training, every ``gold_eval_every`` updates and
   at the end.
4. Write ``<paths.plots>/ppo_curve.csv`` and its gold probes per prompt,
   ``ppo_gold_probe.csv`` (both read by the evaluation stage), save the
   policy (safetensors, LoRA merged, tokenizer included) to ``paths.policy``,
   log it and register a version of ``rlhf-policy`` with alias ``candidate``.

Runs unchanged under ``accelerate launch``: every process trains on its share of
each batch; only the main one logs, measures gold and writes files.

``ppo.algorithm`` other than ``ppo`` runs TRL's RLOO, GRPO or DPO instead
(:mod:`rlhf_core.optimisers`, one process, no resume) and writes the same
outputs: the policy folder, the curve (empty cells where an algorithm has no
value), the registry candidate, and metrics and MLflow curves under
``<algorithm>/``; the hand-off keys evaluate reads stay ``ppo/``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rlhf_core import precision, tracking
from rlhf_core.artifacts import Layout
from rlhf_core.config import Params
from rlhf_core.errors import DataError
from rlhf_core.records import read_jsonl
from rlhf_core.reward.release import RewardRelease, handed_over
from rlhf_core.schemas import Prompt

ARTIFACT_PATH = "policy"
CURVE_COLUMNS = [
    "update", "kl", "beta", "score", "rlhf_reward", "entropy", "approx_kl", "clipfrac",
    "response_length", "tokens_per_second", "gold", "gold_proxy",
]  # fmt: skip
PROBE_COLUMNS = ["update", "prompt", "gold", "gold_proxy"]


def reward_lineage(release: RewardRelease) -> dict[str, str]:
    """How every record of a run names its reward model: registry version and content hash."""
    return {"reward_model_version": release.version, "reward_model_hash": release.content_hash}


def read_prompts(path: Path, required: bool) -> list[str]:
    if not path.exists():
        if required:
            raise DataError(f"{path}: no training prompts (run `rlhf prompts` first)")
        return []
    prompts = [p.text for p in read_jsonl(path, Prompt)]
    if required and not prompts:
        raise DataError(f"{path}: no training prompts")
    return prompts


def write_curve(layout: Layout, history: list[dict], prefix: str = "ppo") -> None:
    """The curve, one row per update (row 0: the gold baseline before training; unmeasured cells stay empty), and
    its gold probes per prompt, one row per probe and prompt."""
    curve = ([row["update"]] + [row.get(f"{prefix}/{c}") for c in CURVE_COLUMNS[1:]] for row in history)
    layout.ppo_curve.write(CURVE_COLUMNS, curve)
    probes = []
    for row in history:
        per_prompt = zip(row.get(f"{prefix}/gold_per_prompt", ()), row.get(f"{prefix}/gold_proxy_per_prompt", ()))
        probes += [[row["update"], i, gold, proxy] for i, (gold, proxy) in enumerate(per_prompt)]
    layout.ppo_gold_probe.write(PROBE_COLUMNS, probes)


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


def _lineage(release: RewardRelease, run_id: str, start_label: str, train_file: Path, layout: Layout, algorithm: str):
    lineage = {
        **reward_lineage(release),
        "ppo_run_id": run_id,
        "init_policy": start_label,
        "prompts_hash": tracking.hash_paths([train_file]),
        "algorithm": algorithm,
    }
    pairs = layout.preferences.pairs
    if pairs.exists():
        lineage["preference_data_hash"] = tracking.hash_paths([pairs])
    return lineage


def run_trl_optimiser(params: Params, release: RewardRelease, start_path: Path, start_label: str) -> dict:
    """``ppo.algorithm`` rloo, grpo or dpo (:mod:`rlhf_core.optimisers`), with the same outputs as PPO."""
    from rlhf_core.gold import gold_score
    from rlhf_core.optimisers.session import GoldSlice, export_policy, summary
    from rlhf_core.reward import RewardModel

    paths, cfg, algorithm = params.paths, params.ppo, params.ppo.algorithm
    layout = Layout(paths)
    train_file, pairs_file = layout.prompts.train, layout.preferences.pairs
    train_prompts = read_prompts(train_file, required=True)
    gold_prompts = read_prompts(layout.prompts.eval, required=False)[: cfg.gold_eval_prompts]
    if algorithm == "dpo" and not pairs_file.exists():
        raise DataError(f"{pairs_file}: no preference pairs for ppo.algorithm dpo (run `rlhf collect-preferences` first)")
    reward = RewardModel.load(paths.reward_model)

    def score_fn(prompts: list[str], responses: list[str], finished: list[bool]):
        return reward.score(prompts, responses, finished, batch_size=cfg.batch_size)

    gold = GoldSlice(gold_prompts, gold_score, score_fn, cfg.seed, cfg.max_new_tokens, cfg.temperature) if gold_prompts else None
    inputs = [pairs_file] if algorithm == "dpo" else [train_file]
    with tracking.stage_run("ppo", metrics_dir=paths.metrics, config_sections=[cfg], inputs=inputs) as stage:
        numeric_path = {
            **precision.record(algorithm, cfg.dtype, precision.default_device()), f"{algorithm}/reward_dtype": reward.dtype
        }
        stage.log_params({**cfg.model_dump(), **numeric_path})
        stage.set_tags({**reward_lineage(release), "init_policy": start_label, "algorithm": algorithm})
        options = dict(gold=gold, on_update=lambda row: stage.log_step(_step_metrics(row), step=row["update"]))
        scratch = Path(paths.checkpoints) / algorithm
        if algorithm == "dpo":
            from rlhf_core.optimisers.dpo import train_dpo

            trained = train_dpo(cfg, start_path, layout.preferences.read_pairs(), scratch, **options)
        else:
            from rlhf_core.optimisers.online import train_online

            trained = train_online(algorithm, cfg, start_path, score_fn, train_prompts, scratch, **options)
        write_curve(layout, trained.history, prefix=algorithm)
        export_policy(trained.model, trained.tokenizer, paths.policy)
        stage.log_artifact(paths.policy, ARTIFACT_PATH)
        metrics = {
            **summary(algorithm, trained.history),
            f"{algorithm}/trainable_parameters": trained.trainable_parameters,
            **numeric_path,
            "ppo/algorithm": algorithm,
            "ppo/reward_model_version": release.version,
            "ppo/reward_model_hash": release.content_hash,
            "ppo/init_policy": start_label,
        }
        # Registered only once the policy, the curve and the metrics are complete.
        metrics = stage.finish(metrics)
        lineage = _lineage(release, stage.run_id, start_label, train_file, layout, algorithm)
        version = tracking.register_version(tracking.POLICY_MODEL, stage, ARTIFACT_PATH, aliases=["candidate"], tags=lineage)
        return stage.finish({**metrics, "ppo/registered_version": int(version)})


def run(params: Params) -> dict:
    from accelerate import Accelerator

    from rlhf_core.gold import gold_score
    from rlhf_core.ppo.loop import GoldProbe, resume, run_fingerprint, train
    from rlhf_core.ppo.policy import export_policy
    from rlhf_core.ppo.trainer import build_trainer
    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.trunk import RolloutTrunkScorer

    paths, cfg = params.paths, params.ppo
    release = handed_over(paths.reward_release, paths.reward_model)
    layout = Layout(paths)
    # The starting policy is also PPO's frozen reference: with SFT on, the KL penalty is measured against it.
    start_path, start_label = tracking.resolve_policy(cfg.init_policy, layout.starting_policy)
    if cfg.algorithm != "ppo":
        return run_trl_optimiser(params, release, start_path, start_label)
    train_file = layout.prompts.train
    train_prompts = read_prompts(train_file, required=True)
    gold_prompts = read_prompts(layout.prompts.eval, required=False)[: cfg.gold_eval_prompts]

    # ---- models: the reward model scores on every process; the trainer wraps the policy for accelerate
    accelerator = Accelerator()
    reward = RewardModel.load(paths.reward_model)  # scored in its own reward.dtype, the path its normalisation holds in
    reward.model.to(accelerator.device)

    def score_fn(prompts: list[str], responses: list[str], finished: list[bool]):
        return reward.score(prompts, responses, finished, batch_size=cfg.batch_size)

    trainer = build_trainer(cfg, start_path, score_fn, train_prompts, accelerator)
    # Rollouts are scored from the trunk states sampling computed when the reward model shares the policy's trunk.
    shared = RolloutTrunkScorer.for_policy(reward, trainer.policy, cfg.batch_size)
    trainer.score_fn = shared or score_fn
    fingerprint = run_fingerprint(
        cfg, start=start_label, reward=f"{release.name}/{release.version}/{release.content_hash}", prompts=tracking.hash_paths([train_file])
    )
    checkpoints = Path(paths.checkpoints) / "ppo"
    history, resumed_from = resume(trainer, checkpoints, fingerprint, cfg.updates)
    options = dict(
        updates=cfg.updates,
        checkpoint_dir=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
        fingerprint=fingerprint,
        gold=GoldProbe(gold_prompts, gold_score, cfg.seed) if gold_prompts else None,
        gold_every=cfg.gold_eval_every,
    )
    if not accelerator.is_main_process:
        train(trainer, history=history, **options)
        return {}

    # ---- main process: MLflow run, curve, policy, registry
    with tracking.stage_run("ppo", metrics_dir=paths.metrics, config_sections=[cfg], inputs=[train_file]) as stage:
        from rlhf_core.decoder import sampling_record

        numeric_path = {**sampling_record("ppo", cfg.dtype, accelerator.device), "ppo/reward_dtype": reward.dtype}
        stage.log_params({**cfg.model_dump(), **numeric_path})
        stage.set_tags({**reward_lineage(release), "init_policy": start_label, "run_fingerprint": fingerprint})
        for row in history:  # a resumed run repeats the curve so far, so that this MLflow run shows all of it
            stage.log_step(_step_metrics(row), step=row["update"])
        history = train(
            trainer, history=history, on_update=lambda row: stage.log_step(_step_metrics(row), step=row["update"]), **options
        )
        write_curve(layout, history)
        export_policy(trainer.policy, cfg, start_path, paths.policy, trainer.tokenizer)
        stage.log_artifact(paths.policy, ARTIFACT_PATH)
        lineage = _lineage(release, stage.run_id, start_label, train_file, layout, "ppo")
        metrics = {
            **summary(history),
            "ppo/resumed_from_update": int(resumed_from.name.split("-")[-1]) if resumed_from else 0,
            "ppo/trainable_parameters": sum(t.numel() for t in trainer.policy.trainable_state().values()),
            # share of rollout rows the reward model scored from the rollout's trunk states (0: it shares no trunk)
            "ppo/reward_rows_from_rollout_trunk": shared.rows_read / shared.rows_scored if shared and shared.rows_scored else 0.0,
            **numeric_path,
            "ppo/algorithm": "ppo",
            "ppo/reward_model_version": release.version,
            "ppo/reward_model_hash": release.content_hash,
            "ppo/init_policy": start_label,
        }
        # Registered only once the policy, the curve and the metrics are complete.
        metrics = stage.finish(metrics)
        version = tracking.register_version(tracking.POLICY_MODEL, stage, ARTIFACT_PATH, aliases=["candidate"], tags=lineage)
        return stage.finish({**metrics, "ppo/registered_version": int(version)})
