"""The ``rlhf`` command: one subcommand per pipeline stage plus tools around it.

Every stage reads ``params.yaml`` (``--params`` to use another file) and writes
``metrics/<stage>.json``.  Errors in input or configuration print one line and
exit with status 2; unexpected errors print one line and keep the traceback in
``.work/logs/last_error.txt``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

#: subcommand -> (module exposing ``run(params)``, help).  Modules are imported lazily so ``--help`` is instant.
STAGES: dict[str, tuple[str, str]] = {
    "base-model": ("rlhf_core.stages.base_model", "fetch and convert the pretrained base model (stage base_model)"),
    "prompts": ("rlhf_core.stages.prompts", "import, clean and split the prompt set (stage prompts)"),
    "generate-candidates": (
        "rlhf_core.stages.generate_candidates",
        "sample K completions per training prompt from the current policy (stage generate_candidates)",
    ),
    "collect-preferences": (
        "rlhf_core.stages.collect_preferences",
        "rank candidates (simulated, human export or import), validate, expand to pairs (stage collect_preferences)",
    ),
    "train-reward": ("rlhf_core.stages.train_reward", "train, normalise and register the reward model (stage train_reward)"),
    "ppo": ("rlhf_core.stages.ppo", "fine-tune the policy with PPO against the reward model (stage ppo)"),
    "evaluate": ("rlhf_core.stages.evaluate", "evaluate the candidate policy and apply the gates (stage evaluate)"),
    "promote": ("rlhf_core.stages.promote", "move the champion alias if every gate passed (stage promote)"),
}

#: subcommand -> (module exposing ``add_arguments(parser)`` and ``main(args)``, help) for tools that are not stages.
TOOLS: dict[str, tuple[str, str]] = {
    "schedule": ("flows.deploy", "serve the pipeline as a scheduled retraining deployment (needs a Prefect server)"),
    "label": ("rlhf_core.labeling.commands", "human labelling app: serve, add-annotator, load, export, stats"),
    "preferences": ("rlhf_core.importers_cli", "import public preference data into a bundle, export a bundle to TRL"),
    "demonstrations": ("rlhf_core.demonstrations_cli", "import and clean SFT demonstrations, export them to TRL"),
    "rollback": ("rlhf_core.rollback_cli", "move the champion alias of rlhf-policy back to the previous version"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="RLHF pipeline: base model -> preferences -> reward model -> PPO -> evaluation and promotion.",
        epilog="Run the whole pipeline with `dvc repro` or `make run`; see README.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check = sub.add_parser("check-params", help="validate params.yaml and exit")
    check.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for name, (_, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for name, (module, help_text) in TOOLS.items():
        tool = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(tool)
    return parser


def _report_unexpected(exc: BaseException) -> None:
    from rlhf_core import runtime

    log = runtime.work_dir() / "logs" / "last_error.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(traceback.format_exception(exc)))
    print(f"rlhf: unexpected error: {type(exc).__name__}: {exc} (traceback in {log})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rlhf_core import runtime
    from rlhf_core.errors import RLHFError

    runtime.configure()
    try:
        if args.command in TOOLS:
            return int(importlib.import_module(TOOLS[args.command][0]).main(args) or 0)
        from rlhf_core.config import load_params

        params = load_params(Path(args.params))
        if args.command == "check-params":
            print(f"{args.params}: ok")
            return 0
        from rlhf_core.launch import relaunch_if_distributed

        status = relaunch_if_distributed(args.command, args.params, params.orchestration)
        if status is not None:
            return status
        metrics = importlib.import_module(STAGES[args.command][0]).run(params)
        print(f"{args.command}: done ({len(metrics or {})} metrics)")
        return 0
    except RLHFError as exc:
        print(f"rlhf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line for the user, traceback to a file
        _report_unexpected(exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
