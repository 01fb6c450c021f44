"""The ``rlhf`` command: one subcommand per stage of ``dvc.yaml`` plus tools around it.

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

from rlhf_core.artifacts import pipeline_stages, stage_command

#: the group of entry points (pyproject.toml) that add commands from outside the library, e.g. ``schedule``
#: from the orchestration layer: each names a module exposing ``add_arguments(parser)`` and ``main(args)``.
COMMAND_ENTRY_POINTS = "rlhf.commands"

#: subcommand -> (module exposing ``add_arguments(parser)`` and ``main(args)``, help) for the library's own tools.
TOOLS: dict[str, tuple[str, str]] = {
    "label": ("rlhf_core.labeling.commands", "human labelling app: serve, add-annotator, load, export, stats"),
    "preferences": ("rlhf_core.importers_cli", "import public preference data into a bundle, export a bundle to TRL"),
    "demonstrations": ("rlhf_core.demonstrations_cli", "import and clean SFT demonstrations, export them to TRL"),
    "rollback": ("rlhf_core.rollback_cli", "move the champion alias of rlhf-policy back to the previous version"),
    "reward": ("rlhf_core.reward_cli", "score the reward model on any preference file: accuracy, by length, calibration"),
}


def stages() -> dict[str, tuple[str, str]]:
    """subcommand -> (module exposing ``run(params)``, help), one per stage of ``dvc.yaml`` in its order.

    The help is the stage's ``desc``; modules are imported lazily so that ``--help`` is instant.
    """
    return {
        stage_command(name): (f"rlhf_core.stages.{name}", f"{stage.get('desc', name)} (stage {name})")
        for name, stage in pipeline_stages().items()
    }


def tools() -> dict[str, tuple[str, str]]:
    """The library's tools plus the commands installed under :data:`COMMAND_ENTRY_POINTS`."""
    from importlib.metadata import entry_points

    found = dict(TOOLS)
    for entry in entry_points(group=COMMAND_ENTRY_POINTS):
        module = importlib.import_module(entry.value)
        found[entry.name] = (entry.value, (module.__doc__ or entry.name).strip().splitlines()[0].rstrip("."))
    return found


def _parser(stage_commands: dict[str, tuple[str, str]], tool_commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="RLHF pipeline: base model -> preferences -> reward model -> PPO -> evaluation and promotion.",
        epilog="Run the whole pipeline with `dvc repro` or `make run`; see README.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check = sub.add_parser("check-params", help="validate params.yaml and exit")
    check.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for name, (_, help_text) in stage_commands.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for name, (module, help_text) in tool_commands.items():
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
    from rlhf_core import runtime
    from rlhf_core.errors import RLHFError

    try:
        stage_commands, tool_commands = stages(), tools()
    except RLHFError as exc:
        print(f"rlhf: error: {exc}", file=sys.stderr)
        return 2
    args = _parser(stage_commands, tool_commands).parse_args(argv)

    runtime.configure()
    runtime.tune_allocator()
    try:
        if args.command in tool_commands:
            return int(importlib.import_module(tool_commands[args.command][0]).main(args) or 0)
        from rlhf_core.config import load_params

        params = load_params(Path(args.params))
        if args.command == "check-params":
            print(f"{args.params}: ok")
            return 0
        from rlhf_core.launch import relaunch_if_distributed

        status = relaunch_if_distributed(args.command, args.params, params.orchestration)
        if status is not None:
            return status
        metrics = importlib.import_module(stage_commands[args.command][0]).run(params)
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
