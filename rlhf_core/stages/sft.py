"""Stage ``sft``: fine-tune the base model on demonstrations; the later stages start from the result.

1. Read the demonstrations ``sft.source`` names - ``written`` (the shipped
   ``paths.demonstrations``), ``labels`` (the labelling app's export in
   ``paths.label_export``), ``import`` (``sft.import_file`` inside
   ``paths.preference_import``) or ``simulated`` (best-of-n under the gold score
   from the base model on the training prompts) - clean them with the
   thresholds of ``sft.cleaning`` and drop every eval-split prompt; each removal
   is counted in the metrics and kept in the folder's rejects file.
2. Hold out ``sft.validation_fraction`` of the demonstrated prompts and train
   with TRL's ``SFTTrainer``, loss on the answer tokens only (:mod:`rlhf_core.sft`).
3. Save ``paths.sft_model`` (safetensors, tokenizer, atomically), then measure
   held-out loss and perplexity and - with simulated labelling, where the gold
   function exists - the gold score of its samples against the base model's on
   the first ``sft.eval_prompts`` eval prompts, with 95% intervals.
4. Write ``metrics/sft.json``, log the model and, last, register it as a version
   of ``rlhf-policy`` tagged ``stage: sft``.

With ``sft.source: none`` the stage trains nothing and leaves only a note in
``paths.sft_model``: the later stages then start from the base model
(:attr:`rlhf_core.artifacts.Layout.starting_policy`), as before SFT existed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from rlhf_core import precision, tracking
from rlhf_core.artifacts import Layout
from rlhf_core.config import Params, SFTConfig
from rlhf_core.demonstrations import DemonstrationSet, clean_demonstrations, exclude_eval_prompts, read_demonstrations
from rlhf_core.errors import DataError
from rlhf_core.records import atomic_write_text
from rlhf_core.schemas import Prompt

ARTIFACT_PATH = "policy"
SFT_TAG = "sft"


def demonstrations_file(cfg: SFTConfig, layout: Layout) -> Path:
    """The file (or datasets folder) the demonstrations are read from, for every source but ``simulated``."""
    if cfg.source == "written":
        return layout.demonstrations
    if cfg.source == "labels":
        return layout.label_demonstrations
    return layout.preference_import / cfg.import_file


def gather_demonstrations(params: Params, layout: Layout, train: list[Prompt], evaluation: list[Prompt], count_tokens):
    """Cleaned demonstrations of non-eval prompts, and what simulating them did (empty for other sources)."""
    cfg = params.sft
    simulated = {}
    if cfg.source == "simulated":
        from rlhf_core.sft import best_of_n_demonstrations

        demos, simulated = best_of_n_demonstrations(layout.base_model.require(), train, cfg)
    else:
        demos = read_demonstrations(demonstrations_file(cfg, layout))
    demos = clean_demonstrations(demos, **cfg.cleaning.model_dump(), count_tokens=count_tokens)
    return exclude_eval_prompts(demos, evaluation), simulated


def check_inputs(cfg: SFTConfig, layout: Layout) -> None:
    """Fail before any run is opened when the base model, the prompt split or the demonstrations are missing."""
    layout.base_model.require()
    layout.prompts.read_train()
    if cfg.source != "simulated":
        source = demonstrations_file(cfg, layout)
        if not source.exists():
            raise DataError(f"{source}: no demonstrations there (sft.source={cfg.source}; sft.source=none turns SFT off)")


def demonstration_metrics(demos: DemonstrationSet, train_prompts: list[Prompt]) -> dict:
    """``demonstrations/<count>``: rows read, kept, one count per kind of removal, training prompts they cover."""
    covered = {p.id for p in train_prompts} & {d.prompt_id for d in demos.demonstrations}
    return {**demos.counts(), "train_prompts_covered": len(covered)}


def write_off_note(layout: Layout) -> dict:
    """sft.source=none: replace the folder by a note saying the later stages start from the base model."""
    folder = layout.sft_model
    shutil.rmtree(folder.folder, ignore_errors=True)
    note = {"sft": "off", "starting_policy": str(layout.base_model.folder)}
    atomic_write_text(folder.off_note, json.dumps(note, indent=2) + "\n")
    return {"sft/enabled": False}


def run(params: Params) -> dict:
    from rlhf_core.base_model import load_tokenizer, save_model_folder
    from rlhf_core.sft import fit_sft, gold_comparison, split_by_prompt

    paths, cfg = params.paths, params.sft
    layout = Layout(paths)
    if cfg.source != "none":
        check_inputs(cfg, layout)
    with tracking.stage_run("sft", metrics_dir=paths.metrics, config_sections=[cfg], inputs=[layout.prompts.train]) as stage:
        stage.log_params(cfg.model_dump())
        if cfg.source == "none":
            return stage.finish(write_off_note(layout))
        start = time.perf_counter()
        base = layout.base_model.require()
        train_prompts, eval_prompts = layout.prompts.read_train(), layout.prompts.read_eval()
        tokenizer = load_tokenizer(base)
        count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
        demos, simulated = gather_demonstrations(params, layout, train_prompts, eval_prompts, count_tokens)
        if not demos.demonstrations:
            raise DataError(f"sft.source={cfg.source}: no usable demonstrations ({len(demos.rejects)} removed of {demos.rows})")
        train, validation = split_by_prompt(demos.demonstrations, cfg.validation_fraction, cfg.seed)
        device = precision.default_device()
        from rlhf_core.decoder import sampling_record

        numeric_path = sampling_record("sft", cfg.dtype, device)
        stage.log_params(numeric_path)

        fit = fit_sft(base, cfg, train, validation, Path(paths.checkpoints) / "sft")
        out = layout.sft_model
        rejects = "".join(json.dumps(asdict(reject), ensure_ascii=False) + "\n" for reject in demos.rejects)
        save_model_folder(fit.model, load_tokenizer(base), out.folder, extra_files={out.rejects.name: rejects})
        stage.log_curve("sft/train_loss", [loss for _, loss in fit.losses], start=1)

        metrics: dict[str, object] = {
            "sft/enabled": True,
            "sft/source": cfg.source,
            **{f"sft/demonstrations/{k}": v for k, v in demonstration_metrics(demos, train_prompts).items()},
            **{f"sft/simulated/{k}": v for k, v in simulated.items()},
            "sft/train_examples": fit.train_examples,
            "sft/train_answer_tokens": fit.train_answer_tokens,
            "sft/truncated_examples": fit.truncated,
            "sft/heldout_examples": fit.heldout_examples,
            "sft/heldout_loss_base": fit.heldout_loss_before,
            "sft/heldout_loss": fit.heldout_loss_after,
            "sft/heldout_perplexity": fit.heldout_perplexity,
            "sft/train_loss_first": fit.losses[0][1] if fit.losses else None,
            "sft/train_loss_last": fit.losses[-1][1] if fit.losses else None,
            "sft/train_steps": fit.steps,
            "sft/train_seconds": fit.seconds,
            "sft/trainable_parameters": fit.trainable_parameters,
            **numeric_path,
        }
        gold_prompts = [p.text for p in eval_prompts[: cfg.eval_prompts]]
        if params.labeling.backend == "simulated" and gold_prompts:
            comparison = gold_comparison(out.folder, base, gold_prompts, cfg)
            metrics.update({f"sft/eval/{k}": v for k, v in comparison.items()})
        metrics["sft/stage_seconds"] = time.perf_counter() - start
        metrics["sft/content_hash"] = tracking.hash_paths([out.folder])
        # Registered only once the folder and the metrics are complete: a kill before this line leaves no version.
        summary = stage.finish({k: v for k, v in metrics.items() if v is not None})
        stage.log_artifact(out.folder, ARTIFACT_PATH)
        tags = {"stage": SFT_TAG, "sft_source": cfg.source, "sft_run_id": stage.run_id,
                "content_hash": metrics["sft/content_hash"], "base_model_hash": tracking.hash_paths([base])}
        version = tracking.register_version(tracking.POLICY_MODEL, stage, ARTIFACT_PATH, tags=tags)
        return stage.finish({**summary, "sft/registered_version": int(version)})
