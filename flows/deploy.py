"""Scheduled retraining: serve the pipeline flow as a deployment with a cron or interval schedule.

    rlhf schedule                         # cron from params.yaml (orchestration.schedule_cron)
    rlhf schedule --interval 3600 --stages base_model prompts
    rlhf schedule --set ppo.kl.beta=0.1   # params overrides (dotted keys at any depth) for each run

``serve`` registers the deployment with the Prefect server named by
``PREFECT_API_URL`` and executes its scheduled runs in this process (the worker
of `make serve`).  Scheduling needs a real server: an ephemeral one cannot
schedule.  ``prefect.yaml`` shows the same deployment on process, Docker and
Kubernetes work pools.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rlhf_core.errors import RLHFError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron schedule (default: orchestration.schedule_cron in params.yaml)")
    when.add_argument("--interval", type=float, help="run every N seconds instead of a cron schedule")
    parser.add_argument("--name", default="retraining", help="deployment name (default: %(default)s)")
    parser.add_argument("--stages", nargs="+", help="run only these stages")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for every run, dotted key at any depth, YAML value (repeatable)")
    parser.add_argument("--from-base", action="store_true",
                        help="start each run from the base model instead of the current champion")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    from rlhf_core.config import load_params, with_overrides

    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RLHFError(f"--set {item!r}: expected section.key=value")
        overrides[key.strip()] = value
    # A mistyped key or value fails here, once, rather than in every scheduled run (and before any server is asked).
    params = with_overrides(load_params(args.params), overrides)
    if not os.environ.get("PREFECT_API_URL"):
        raise RLHFError("scheduling needs a Prefect server: run `make serve`, or start one with "
                        "`prefect server start --host 127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    root = Path(args.params).resolve().parent
    from flows.pipeline import rlhf_pipeline

    parameters = {"project_dir": str(root), "stages": args.stages, "from_champion": not args.from_base,
                  "overrides": overrides, "restore_params": True}
    schedule = {"interval": args.interval} if args.interval else {"cron": args.cron or params.orchestration.schedule_cron}
    print(f"serving deployment rlhf-pipeline/{args.name} ({schedule}); Ctrl+C stops")
    # limit=1: a retraining run never overlaps the previous one (they share the workspace and DVC's lock).
    rlhf_pipeline.serve(name=args.name, parameters=parameters, tags=["rlhf"], limit=1, **schedule)
    return 0
