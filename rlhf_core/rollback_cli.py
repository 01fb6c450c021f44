"""``rlhf rollback``: move the ``champion`` alias of rlhf-policy back to the ``previous`` version."""

from __future__ import annotations

import argparse

from rlhf_core.promotion import rollback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", default="", help="why (recorded as a tag on the demoted version)")


def main(args: argparse.Namespace) -> int:
    done = rollback(args.reason)
    after = f"; previous is now {done.previous}" if done.previous else "; no earlier version left as previous"
    print(f"rlhf-policy: champion moved from version {done.demoted} back to {done.champion}{after}")
    return 0
