"""``rlhf label ...``: serve the labelling app, add annotators, load items, export labels, print statistics.

The store is ``paths.labels_db``; every other setting comes from the
``labeling`` section of ``params.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhf_core.config import Params, load_params
from rlhf_core.errors import DataError
from rlhf_core.labeling.export import export_labels
from rlhf_core.labeling.guards import is_loopback
from rlhf_core.labeling.items import build_items
from rlhf_core.labeling.stats import label_stats
from rlhf_core.labeling.store import TASKS, LabelStore
from rlhf_core.preferences import PreferenceBundle
from rlhf_core.records import write_rejects

REJECTS_FILE = "label_load_rejects.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="label_command", metavar="ACTION", required=True)
    serve = _action(sub, "serve", "run the labelling web app (host and port from params: labeling.host, labeling.port)")
    serve.add_argument("--port", type=int, help="listen on this port instead of labeling.port")
    add = _action(sub, "add-annotator", "create an annotator and print its sign-in token (shown once)")
    add.add_argument("name", help="annotator name, unique")
    add.add_argument("--admin", action="store_true", help="may open the admin page; gets no items to label")
    load = _action(sub, "load", "load items (prompts with their K completions) from a bundle folder, e.g. data/candidates")
    load.add_argument("folder", type=Path, help="folder with prompts.jsonl and completions.jsonl")
    load.add_argument(
        "--task", choices=TASKS, default="ranking",
        help="ranking or rating: each prompt's completions (2 or more); demonstration: each prompt, its first"
        " completion (completions.jsonl is optional) shown as a draft to edit (default: %(default)s)",
    )
    load.add_argument("--gold", action="store_true", help="the bundle's rankings.jsonl holds known answers: load gold items")
    export = _action(
        sub, "export", "write the rankings (preference bundle), demonstrations (TRL SFT JSONL) and ratings to"
        " paths.label_export",
    )
    export.add_argument("--out", type=Path, help="write to this folder instead of paths.label_export")
    stats = _action(sub, "stats", "print throughput and agreement (as on the admin page)")
    stats.add_argument("--json", action="store_true", help="print JSON")


def _action(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    store = LabelStore(params.paths.labels_db)
    return ACTIONS[args.label_command](args, params, store)


def serve(args: argparse.Namespace, params: Params, store: LabelStore) -> int:
    import uvicorn

    from rlhf_core.labeling.app import create_app

    cfg = params.labeling
    port = args.port if args.port is not None else cfg.port
    if not is_loopback(cfg.host):
        print(
            f"warning: labeling.host {cfg.host} is not a loopback address: the labelling app becomes reachable from"
            " the network, and over plain HTTP its tokens and session cookies cross it readable; bind 127.0.0.1"
            " and put a reverse proxy with TLS in front of it",
            file=sys.stderr,
            flush=True,
        )
    print(f"labelling app on http://{cfg.host}:{port}/ (store {store.path})", flush=True)
    uvicorn.run(create_app(store, cfg), host=cfg.host, port=port, log_level="warning")
    return 0


def add_annotator(args: argparse.Namespace, params: Params, store: LabelStore) -> int:
    token = store.add_annotator(args.name, admin=args.admin)
    assigned = store.assign(params.labeling.assignments_per_item, params.labeling.gold_item_fraction)
    print(token)
    role = " (admin)" if args.admin else ""
    print(f"annotator {args.name!r} added{role}; {assigned.new} new assignments, {assigned.moved} moved to even out queues")
    return 0


def load(args: argparse.Namespace, params: Params, store: LabelStore) -> int:
    if not args.folder.is_dir():
        raise DataError(f"{args.folder}: not a folder (expected prompts.jsonl and completions.jsonl)")
    if args.gold and args.task != "ranking":
        raise DataError(f"--gold loads known rankings: it goes with --task ranking, not --task {args.task}")
    bundle = PreferenceBundle.read(args.folder)
    built = build_items(bundle, params.labeling.max_text_chars, gold=args.gold, task=args.task)
    rejects_path = store.path.parent / REJECTS_FILE
    write_rejects(rejects_path, built.rejects)
    if not built.items:
        raise DataError(f"{args.folder}: no usable items ({len(built.rejects)} rejects, see {rejects_path})")
    new = store.add_items(built.items)
    assigned = store.assign(params.labeling.assignments_per_item, params.labeling.gold_item_fraction)
    kind = "gold items" if args.gold else f"{args.task} items"
    print(f"{new} new {kind} ({len(built.items) - new} already loaded), {assigned.new} new assignments,"
          f" {assigned.moved} moved to even out queues")
    if built.rejects:
        print(f"{len(built.rejects)} rejects written to {rejects_path}; first: {built.rejects[0].describe()}")
    if bundle.rankings and not args.gold:
        print(f"{len(bundle.rankings)} rankings in the bundle ignored (load with --gold to use them as gold items)")
    return 0


def export(args: argparse.Namespace, params: Params, store: LabelStore) -> int:
    out = args.out or Path(params.paths.label_export)
    summary = export_labels(store, out)
    print(
        f"exported {summary.rankings} rankings of {summary.prompts} prompts ({summary.completions} completions),"
        f" {summary.demonstrations} demonstrations and {summary.ratings} ratings ({summary.skipped} skips not"
        f" exported) to {out}"
    )
    return 0


def stats(args: argparse.Namespace, params: Params, store: LabelStore) -> int:
    figures = label_stats(store, params.labeling.demonstration_words)
    if args.json:
        print(json.dumps(figures.as_dict(), indent=2))
        return 0
    print(f"items {figures.items} ({figures.gold_items} gold), labels {figures.labels} ({figures.skipped} skipped),"
          f" {figures.labels_last_hour} in the last hour")
    print(f"pairwise agreement {_fmt(figures.pairwise_agreement)} over {figures.agreement_comparisons} comparisons,"
          f" Krippendorff's alpha {_fmt(figures.krippendorff_alpha)}")
    for a in figures.annotators:
        print(f"  {a.name}: {a.done}/{a.assigned} done, {a.skipped} skipped, {a.flagged} flags,"
              f" {a.last_hour} last hour, agreement {_fmt(a.agreement_with_others)}, with gold {_fmt(a.agreement_with_gold)}")
    for t in figures.tasks:
        print(f"{t.task}: {t.items} items, {t.labels} labels ({t.skipped} skipped), {t.last_hour} in the last hour,"
              f" {_fmt(t.per_active_hour, '.1f')} per active hour")
    r, d = figures.rating, figures.demonstration
    if r.ratings:
        print(f"ratings: {r.ratings}, mean score {_fmt(r.mean_score, '.2f')}, Krippendorff's alpha (interval)"
              f" {_fmt(r.krippendorff_alpha_interval)} over {r.pairable_units} completions rated twice or more,"
              f" {r.commented} comments")
    if d.demonstrations:
        low, high = d.guide_words
        print(f"demonstrations: {d.demonstrations}, mean {_fmt(d.mean_words, '.1f')} words (median"
              f" {_fmt(d.median_words, '.1f')}), {_fmt(d.within_guide, '.0%')} within {low}-{high} words;"
              f" {d.with_draft} from a draft ({d.unchanged_drafts} unchanged), edit distance"
              f" {_fmt(d.mean_edit_distance, '.1f')} words ({_fmt(d.mean_relative_edit_distance, '.0%')} of the longer)")
    return 0


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


ACTIONS = {"serve": serve, "add-annotator": add_annotator, "load": load, "export": export, "stats": stats}
