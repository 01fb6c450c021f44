"""Stage ``prompts``: import the prompt set, reject bad prompts with reasons, split train/eval by seed."""

from __future__ import annotations

from collections import Counter

from rlhf_core.artifacts import Layout
from rlhf_core.base_model import load_tokenizer
from rlhf_core.config import Params
from rlhf_core.errors import DataError
from rlhf_core.prompts import import_prompts, split_prompts
from rlhf_core.tracking import stage_run


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.prompts
    out = Layout(paths).prompts
    with stage_run("prompts", metrics_dir=paths.metrics, config_sections=[cfg], inputs=[paths.prompt_source]) as stage:
        tokenizer = load_tokenizer(paths.base_model)
        imported = import_prompts(
            paths.prompt_source, cfg.format, cfg.text_field, lambda text: len(tokenizer(text).input_ids), cfg.max_tokens
        )
        train, evaluation = split_prompts(imported.prompts, cfg.eval_fraction, cfg.seed)
        out.write(train, evaluation, imported.rejects)
        if not imported.prompts:
            raise DataError(f"{paths.prompt_source}: no usable prompts ({len(imported.rejects)} rejected, see {out.rejects})")
        reasons = Counter(r.kind for r in imported.rejects)
        metrics = {
            "prompts/total": len(imported.prompts) + len(imported.rejects),
            "prompts/kept": len(imported.prompts),
            "prompts/train": len(train),
            "prompts/eval": len(evaluation),
            "prompts/rejected": len(imported.rejects),
            **{f"prompts/rejected_{kind}": n for kind, n in sorted(reasons.items())},
        }
        stage.log_artifact(out.rejects)
        return stage.finish(metrics)
