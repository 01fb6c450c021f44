"""``rlhf demonstrations``: import and clean demonstrations for SFT, or convert them to TRL's SFT formats.

    rlhf demonstrations import SRC --out FILE.jsonl [--eval-prompts EVAL.jsonl] [cleaning thresholds]
    rlhf demonstrations export SRC --to prompt-completion|messages --out FILE.jsonl

Import reads SRC (JSONL, JSONL.gz, JSON, CSV, Parquet or a ``datasets``
folder), cleans it (:func:`rlhf_core.demonstrations.clean_demonstrations`; a
threshold not given keeps that function's default), drops the prompts of
``--eval-prompts`` (the prompts stage's ``eval.jsonl``), and writes the kept
demonstrations (TRL's prompt-completion form) and ``<name>.rejects.jsonl``
beside them; it fails only if none is kept.  Export writes every usable row of
SRC in the chosen form, without cleaning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: command-line option -> keyword of clean_demonstrations
THRESHOLDS = {
    "max_words": int,
    "max_chars": int,
    "restate_overlap": float,
    "restate_shingle_words": int,
    "near_duplicate_jaccard": float,
    "near_duplicate_shingle_words": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = actions.add_parser("import", help="read, clean and keep off eval prompts a demonstrations source")
    imp.add_argument("source", type=Path, help="JSONL, JSONL.gz, JSON, CSV or Parquet file, or a datasets folder")
    imp.add_argument("--out", type=Path, required=True, help="JSONL file of the kept demonstrations")
    imp.add_argument("--eval-prompts", type=Path, help="prompts to keep out (e.g. data/prompts/eval.jsonl)")
    for name, kind in THRESHOLDS.items():
        imp.add_argument(f"--{name.replace('_', '-')}", type=kind, help="see clean_demonstrations (default: its own)")
    exp = actions.add_parser("export", help="write a demonstrations source in one of TRL's SFT formats")
    exp.add_argument("source", type=Path, help="any source `import` reads")
    exp.add_argument("--to", choices=("prompt-completion", "messages"), required=True, help="TRL SFT form")
    exp.add_argument("--out", type=Path, required=True, help="JSONL file to write")


def main(args: argparse.Namespace) -> int:
    return _import(args) if args.action == "import" else _export(args)


def rejects_path(out: Path) -> Path:
    return out.with_name(f"{out.name.removesuffix('.jsonl')}.rejects.jsonl")


def _import(args: argparse.Namespace) -> int:
    from rlhf_core.demonstrations import export_demonstrations, import_demonstrations
    from rlhf_core.errors import DataError
    from rlhf_core.records import read_jsonl, write_rejects
    from rlhf_core.schemas import Prompt

    eval_prompts = read_jsonl(args.eval_prompts, Prompt) if args.eval_prompts else []
    cleaning = {name: getattr(args, name) for name in THRESHOLDS if getattr(args, name) is not None}
    demos = import_demonstrations(args.source, eval_prompts, **cleaning)
    if not demos.demonstrations:
        raise DataError(f"{args.source}: no usable demonstrations ({len(demos.rejects)} rejected of {demos.rows} rows)")
    export_demonstrations(demos.demonstrations, args.out)
    rejects = rejects_path(args.out)
    write_rejects(rejects, demos.rejects)
    counts = demos.counts()
    removed = ", ".join(f"{kind} {n}" for kind, n in counts.items() if kind not in ("rows", "kept") and n)
    print(
        f"imported {counts['kept']} of {counts['rows']} demonstrations into {args.out}; "
        f"{len(demos.rejects)} rejected{f' ({removed})' if removed else ''}, see {rejects}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlhf_core.demonstrations import export_demonstrations, read_demonstrations
    from rlhf_core.errors import DataError

    demos = read_demonstrations(args.source)
    if not demos.demonstrations:
        raise DataError(f"{args.source}: no usable demonstrations ({len(demos.rejects)} rejected of {demos.rows} rows)")
    if demos.rejects:
        print(f"skipped {len(demos.rejects)} unusable rows (first: {demos.rejects[0].describe()})")
    count = export_demonstrations(demos.demonstrations, args.out, args.to)
    print(f"exported {count} demonstrations to {args.out} ({args.to})")
    return 0
