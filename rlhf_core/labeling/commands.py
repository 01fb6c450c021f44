"""``rlhf label ...``: serve the labelling app, add annotators, load items, export rankings, print statistics.

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
from rlhf_core.labeling.store import LabelStore
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
    load.add_argument("--gold", action="store_true", help="the bundle's rankings.jsonl holds known answers: load gold items")
    export = _action(sub, "export", "write the human rankings as a preference bundle to paths.label_export")
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
    bundle = PreferenceBundle.read(args.folder)
    built = build_items(bundle, params.labeling.max_text_chars, gold=args.gold)
    rejects_path = store.path.parent / REJECTS_FILE
    write_rejects(rejects_path, built.rejects)
    if not built.items:
        raise DataError(f"{args.folder}: no usable items ({len(built.rejects)} rejects, see {rejects_path})")
    new = store.add_items(built.items)
    assigned = store.assign(params.labeling.assignments_per_item, params.labeling.gold_item_fraction)
    kind = "gold items" if args.gold else "items"
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
        f"exported {summary.rankings} rankings of {summary.prompts} prompts ({summary.completions} completions,"
        f" {summary.skipped} skips not exported) to {out}"
    )
    return 0


def stats(args: argparse.Namespace, params: Params, store: LabelStore) -> int:
    figures = label_stats(store)
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
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


ACTIONS = {"serve": serve, "add-annotator": add_annotator, "load": load, "export": export, "stats": stats}
