"""Stage ``collect_preferences``: rankings from the configured backend, validated and expanded to pairs.

Backends (``labeling.backend``): ``simulated`` ranks the candidates with the
simulated annotators, ``human`` reads the labelling app's export bundle at
``paths.label_export``, ``import`` loads a public preference file from
``paths.preference_import``.  Writes to ``paths.preferences`` the bundle
(prompts, completions, rankings), ``pairs.jsonl`` (every ranking's C(K,2)
comparisons, margin = rank distance; the reward trainer decides whether to use
it) and ``rejects.jsonl`` (file, line, field and reason of every bad record).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

from rlhf_core.agreement import krippendorff_alpha, pairwise_agreement
from rlhf_core.annotators import simulate_rankings
from rlhf_core.artifacts import Layout, PreferenceFolder
from rlhf_core.config import LabelingConfig, Params
from rlhf_core.errors import DataError
from rlhf_core.gold import gold_accuracy, gold_score
from rlhf_core.preferences import (
    BUNDLE_FILES,
    PreferenceBundle,
    bundle_pairs,
    length_stats,
    referenced,
    tie_rate,
    validate_bundle,
)
from rlhf_core.schemas import PreferencePair, Ranking, utc_now
from rlhf_core.tracking import stage_run


def simulated_bundle(candidates: Path, cfg: LabelingConfig) -> PreferenceBundle:
    """The validated candidates, ranked by the simulated annotators."""
    if not (candidates / BUNDLE_FILES["completions"]).exists():
        raise DataError(f"{candidates}: no candidates (run `rlhf generate-candidates` first)")
    bundle = validate_bundle(PreferenceBundle.read(candidates), max_text_chars=cfg.max_text_chars, source=str(candidates))
    bundle.rankings = simulate_rankings(
        bundle.prompts,
        bundle.completions,
        num_annotators=cfg.num_annotators,
        noise=cfg.noise,
        bias_scale=cfg.bias_scale,
        overlap_fraction=cfg.overlap_fraction,
        annotators_per_overlap=cfg.annotators_per_overlap,
        seed=cfg.seed,
        created_at=utc_now(),
    )
    return bundle


def human_bundle(export: Path, cfg: LabelingConfig) -> PreferenceBundle:
    if not (export / BUNDLE_FILES["rankings"]).exists():
        raise DataError(f"{export}: no labelling export there (run `rlhf label export` first)")
    return validate_bundle(PreferenceBundle.read(export), max_text_chars=cfg.max_text_chars, source=str(export))


def imported_bundle(folder: Path, cfg: LabelingConfig) -> PreferenceBundle:
    from rlhf_core.importers import import_preferences

    if cfg.import_file is None and not (folder / BUNDLE_FILES["rankings"]).exists():
        files = sorted(p.name for p in folder.iterdir() if p.name != "README.md") if folder.is_dir() else []
        raise DataError(
            f"labeling.backend is import but labeling.import_file is not set: name the file or folder inside "
            f"{folder} (paths.preference_import) to import" + (f", e.g. {files[0]}" if files else "")
        )
    source = folder / cfg.import_file if cfg.import_file else folder
    if not source.exists():
        raise DataError(f"{source}: no preference file to import (set paths.preference_import / labeling.import_file)")
    return import_preferences(source, cfg.import_format, cfg.max_text_chars)


def load_bundle(params: Params) -> tuple[PreferenceBundle, str]:
    """The validated bundle of the configured backend and the path it came from."""
    paths, cfg = params.paths, params.labeling
    if cfg.backend == "simulated":
        return simulated_bundle(Path(paths.candidates), cfg), paths.candidates
    if cfg.backend == "human":
        return human_bundle(Path(paths.label_export), cfg), paths.label_export
    return imported_bundle(Path(paths.preference_import), cfg), paths.preference_import


def without_human_eval(bundle: PreferenceBundle) -> tuple[PreferenceBundle, int]:
    """The bundle without the rankings of blind evaluation tasks, and how many there were
    (:func:`~rlhf_core.preferences.referenced` then drops their prompts and completions).

    ``evaluate`` hands out its side-by-side comparisons as labelling items whose
    prompts say ``source: "human_eval"``; their labels come back through the
    same export as training labels.  They measure policies on held-out prompts,
    so training the reward model on them would leak the evaluation set.
    """
    from rlhf_core.evaluation.human_eval import SOURCE

    eval_prompts = {p.id for p in bundle.prompts if p.source == SOURCE}
    if not eval_prompts:
        return bundle, 0
    kept = [r for r in bundle.rankings if r.prompt_id not in eval_prompts]
    return dataclasses.replace(bundle, rankings=kept), len(bundle.rankings) - len(kept)


def agreement_standard_error(rankings: list[Ranking]) -> float | None:
    """Standard error of the pooled pairwise agreement, clustered by prompt (a prompt's pairs are not independent).

    The linearised variance of a ratio estimator: agreement = Σ a_p c_p / Σ c_p
    over prompts p with c_p comparisons, each prompt one cluster.
    """
    by_prompt: dict[str, list[Ranking]] = {}
    for ranking in rankings:
        by_prompt.setdefault(ranking.prompt_id, []).append(ranking)
    reports = [r for r in map(pairwise_agreement, by_prompt.values()) if r.comparisons]
    if len(reports) < 2:
        return None
    total = sum(r.comparisons for r in reports)
    pooled = sum(r.agreement * r.comparisons for r in reports) / total
    n = len(reports)
    variance = n / (n - 1) * sum((r.comparisons * (r.agreement - pooled)) ** 2 for r in reports) / total**2
    return math.sqrt(variance)


def preference_metrics(bundle: PreferenceBundle, pairs: list[PreferencePair], simulated: bool) -> dict:
    """Counts, rejects by kind, agreement on overlapping prompts, tie rate, lengths, and the gold's view of the labels."""
    metrics: dict = {
        "preferences/prompts": len(bundle.prompts),
        "preferences/completions": len(bundle.completions),
        "preferences/rankings": len(bundle.rankings),
        "preferences/pairs": len(pairs),
        "preferences/annotators": len({r.annotator_id for r in bundle.rankings}),
        "preferences/rejects": len(bundle.rejects),
        **{f"preferences/rejects_{kind}": n for kind, n in sorted(Counter(r.kind for r in bundle.rejects).items())},
        "preferences/tie_rate": tie_rate(bundle.rankings),
        **{f"preferences/{k}": v for k, v in length_stats(pairs).items()},
    }
    report = pairwise_agreement(bundle.rankings)
    if report.agreement is not None:
        metrics["preferences/agreement"] = report.agreement
        metrics["preferences/agreement_comparisons"] = report.comparisons
        metrics["preferences/agreement_stderr"] = agreement_standard_error(bundle.rankings)
        metrics["preferences/krippendorff_alpha"] = krippendorff_alpha(bundle.rankings)
    if simulated:
        prompts = {p.id: p.text for p in bundle.prompts}
        golds = [gold_score(prompts[c.prompt_id], c.text) for c in bundle.completions]
        metrics["preferences/gold_mean"] = sum(golds) / len(golds)
        metrics["preferences/gold_accuracy"] = gold_accuracy(pairs)
    return {k: v for k, v in metrics.items() if v is not None}


def write_outputs(out: Path, bundle: PreferenceBundle, pairs: list[PreferencePair]) -> None:
    bundle.write(out)
    PreferenceFolder(out).write_pairs(pairs, bundle.rejects)


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.labeling
    out = Layout(paths).preferences
    inputs = {"simulated": [paths.candidates], "human": [paths.label_export], "import": [paths.preference_import]}
    with stage_run(
        "collect_preferences", metrics_dir=paths.metrics, config_sections=[cfg], inputs=inputs[cfg.backend]
    ) as stage:
        stage.log_params(cfg.model_dump())
        bundle, source = load_bundle(params)
        bundle, held_out = without_human_eval(bundle)
        bundle = referenced(bundle)
        pairs = bundle_pairs(bundle, margin="rank_distance")
        write_outputs(out.folder, bundle, pairs)
        stage.log_artifact(out.rejects)
        if not pairs:
            kept = f"{len(bundle.rankings)} rankings kept, all ties" if bundle.rankings else "no ranking kept"
            raise DataError(
                f"{source}: nothing usable: {kept}, {len(bundle.rejects)} records rejected (see {out.rejects})"
            )
        metrics = {"preferences/backend": cfg.backend, **preference_metrics(bundle, pairs, cfg.backend == "simulated")}
        if held_out:
            metrics["preferences/human_eval_rankings_left_out"] = held_out
        return stage.finish(metrics)
