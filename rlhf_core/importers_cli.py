"""``rlhf preferences``: import public preference data into a bundle folder, or export a bundle to TRL.

    rlhf preferences import SRC [--format F] --out BUNDLE_DIR
    rlhf preferences export BUNDLE_DIR --to trl|hf --out PATH

Import checks the source as the ``collect_preferences`` stage does
(:func:`rlhf_core.importers.import_preferences`) and writes the bundle (prompts,
completions, rankings) and ``rejects.jsonl`` beside it; it fails only if no
ranking is usable.  The text-length limit and the
default format come from the ``labeling`` section of ``params.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf_core.artifacts import REJECTS_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = actions.add_parser("import", help="read a preference file or folder into a bundle folder")
    imp.add_argument(
        "source", type=Path, help="JSONL, JSONL.gz, JSON, CSV or Parquet file, datasets folder or bundle folder"
    )
    imp.add_argument(
        "--format", help="auto, trl, hh, ratings, label_studio or rankings (default: labeling.import_format)"
    )
    imp.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    imp.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    exp = actions.add_parser("export", help="write a bundle's preference pairs in TRL's format")
    exp.add_argument("bundle", type=Path, help="bundle folder (prompts.jsonl, completions.jsonl, rankings.jsonl)")
    exp.add_argument(
        "--to",
        choices=("trl", "hf"),
        required=True,
        help="trl: a .jsonl, .jsonl.gz or .parquet file; hf: a datasets folder",
    )
    exp.add_argument("--out", type=Path, required=True, help="output file (trl) or folder (hf)")


def main(args: argparse.Namespace) -> int:
    return _import(args) if args.action == "import" else _export(args)


def _import(args: argparse.Namespace) -> int:
    from rlhf_core.config import load_params
    from rlhf_core.errors import DataError
    from rlhf_core.importers import import_preferences
    from rlhf_core.records import write_rejects

    labeling = load_params(Path(args.params)).labeling
    bundle = import_preferences(args.source, args.format or labeling.import_format, labeling.max_text_chars)
    write_rejects(args.out / REJECTS_FILE, bundle.rejects)
    if not bundle.rankings:
        raise DataError(
            f"{args.source}: no usable preferences ({len(bundle.rejects)} rejected, see {args.out / REJECTS_FILE})"
        )
    bundle.write(args.out)
    print(
        f"imported {len(bundle.rankings)} rankings of {len(bundle.prompts)} prompts into {args.out}; "
        f"{len(bundle.rejects)} rejected (see {args.out / REJECTS_FILE})"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlhf_core.errors import DataError
    from rlhf_core.importers import export_hf, export_trl
    from rlhf_core.preferences import BUNDLE_FILES, PreferenceBundle

    if not (args.bundle / BUNDLE_FILES["rankings"]).exists():
        raise DataError(f"{args.bundle}: not a bundle folder (no {BUNDLE_FILES['rankings']})")
    bundle = PreferenceBundle.read(args.bundle)
    if bundle.rejects:
        first = bundle.rejects[0].describe()
        print(f"skipped {len(bundle.rejects)} invalid records of the bundle (first: {first})")
    count = (export_trl if args.to == "trl" else export_hf)(bundle, args.out)
    print(f"exported {count} preference pairs to {args.out}")
    return 0
