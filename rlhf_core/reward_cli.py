"""``rlhf reward``: score the reward model on any preference file; apply a named recipe.

    rlhf reward evaluate FILE [--format F] [--model DIR] [--out REPORT.json]
    rlhf reward preset presets/hh.yaml [--params params.yaml]

FILE is anything ``rlhf preferences import`` reads (TRL pairs, HH-RLHF
transcripts, ratings, Label Studio exports, a bundle folder).  The report gives
pairwise accuracy with its 95% Wilson interval, next to the shorter-answer-wins
rule on the same pairs; accuracy by the length difference of the two answers (in
words: a model that learnt "shorter is better" shows it here); and calibration
(how often a pair the model is p% sure of is ordered right, and the ECE).
The model defaults to ``paths.reward_model``; the text-length limit and the
default format come from the ``labeling`` section of ``params.yaml``.

A preset is a YAML file of ``dotted.key: value`` lines (``presets/``); ``preset``
writes them into the params file in place - validated first, comments kept,
replaced atomically - and lists what changed; ``dvc repro`` then retrains.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ev = actions.add_parser("evaluate", help="accuracy (95%% interval), accuracy by length difference, calibration")
    ev.add_argument("source", type=Path, help="preference file or folder, in any format `rlhf preferences import` reads")
    ev.add_argument("--format", help="auto, trl, hh, ratings, label_studio or rankings (default: labeling.import_format)")
    ev.add_argument("--model", type=Path, help="reward model folder (default: paths.reward_model)")
    ev.add_argument("--out", type=Path, help="also write the report as JSON here")
    ev.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    pre = actions.add_parser("preset", help="write a preset's settings (dotted.key: value) into the params file")
    pre.add_argument("preset", type=Path, help="preset file, e.g. presets/hh.yaml")
    pre.add_argument("--params", default="params.yaml", help="params file to edit (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    if args.action == "preset":
        return apply_preset(args.preset, Path(args.params))
    report = evaluate_file(args)
    if args.out:
        from rlhf_core.records import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0


def evaluate_file(args: argparse.Namespace) -> dict:
    from rlhf_core.config import load_params
    from rlhf_core.errors import DataError
    from rlhf_core.importers import import_preferences
    from rlhf_core.precision import autocast
    from rlhf_core.preferences import bundle_pairs
    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.data import group_pairs
    from rlhf_core.reward.metrics import conversations, preference_report, score_conversations

    params = load_params(Path(args.params))
    labeling, cfg = params.labeling, params.reward
    bundle = import_preferences(args.source, args.format or labeling.import_format, labeling.max_text_chars)
    pairs = bundle_pairs(bundle, margin="rank_distance")
    if not pairs:
        raise DataError(f"{args.source}: no usable preference pairs ({len(bundle.rejects)} records rejected)")
    groups = group_pairs(pairs, bundle, "none", args.source)
    model = RewardModel.load(args.model or params.paths.reward_model)
    with autocast(model.dtype, next(model.model.parameters()).device):
        scores = score_conversations(model, conversations(groups), cfg.score_batch_size, desc="scoring")
    report = preference_report(groups, scores)
    return {"source": str(args.source), "model": str(args.model or params.paths.reward_model), "rejected": len(bundle.rejects), **report}


def format_report(report: dict) -> str:
    lines = [
        f"{report['source']}: {report['pairs']} pairs ({report['rejected']} records rejected), model {report['model']}",
        f"accuracy {report['accuracy']:.3f} (95% {report['accuracy_low']:.3f}-{report['accuracy_high']:.3f}); "
        f"shorter answer wins {report['shorter_answer_wins']:.3f}",
        "by length difference, chosen minus rejected (words):",
        *(f"  {key:>12}  {row['pairs']:5d} pairs  accuracy {row['accuracy']:.3f}" for key, row in report["accuracy_by_length_difference"].items()),
        f"calibration: ECE {report['calibration_ece']:.3f}",
        *(
            f"  confidence >= {row['confidence_low']:.1f}  {row['pairs']:5d} pairs  mean confidence {row['confidence']:.3f}"
            f"  accuracy {row['accuracy']:.3f}"
            for row in report["calibration"]
        ),
    ]
    return "\n".join(lines)


def apply_preset(preset: Path, params_file: Path) -> int:
    import yaml

    from rlhf_core.config import set_params
    from rlhf_core.errors import ConfigError

    if not preset.is_file():
        raise ConfigError(f"{preset}: preset not found (the presets are in presets/)")
    try:
        values = yaml.safe_load(preset.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{preset}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{preset}: expected a mapping of dotted.key: value lines")
    overrides = {str(key): yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
                 for key, value in values.items()}
    try:
        changed = set_params(params_file, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{preset}: {exc}") from None
    print(f"{params_file}: {len(changed)} of {len(values)} settings of {preset} changed"
          + (f" ({', '.join(changed)}); run `dvc repro` to retrain" if changed else ""))
    return 0
