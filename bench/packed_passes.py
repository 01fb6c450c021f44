"""Benchmark: PPO's training step with its length groups packed into one tensor against each group run alone.

PPO's passes over whole sequences (reference, old values, training) run the
rows of a rollout in groups of similar length (:func:`rlhf_core.ppo.policy.length_groups`).
Packed (:func:`rlhf_core.decoder.run_packed`), the decoder layers' projections,
norms and MLP run once over every group's positions and only attention runs
group by group; unpacked, each group goes through the layers' own forward, so
each weight is multiplied once per group and its gradient is a sum of narrow
products.  Here one update samples and scores a rollout (its score a constant:
the step's cost does not depend on it), then the same optimisation step
(:meth:`PPOTrainer._optimise`, ``ppo_epochs`` x ``minibatches`` optimiser steps)
runs ``--rounds`` times each way, in turns - which goes first alternates - so
that a drifting load hits both alike.

    .venv/bin/python bench/packed_passes.py                      # full fine-tuning (fp32, separate value model)
    .venv/bin/python bench/packed_passes.py --mode freeze        # the default mode: 6 upper layers

Writes bench/results/packed_passes_<date>.json and prints a markdown table (bench/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # ppo_bench, also when a test imports this file

from ppo_bench.host import write_result  # noqa: E402
from ppo_bench.workload import limit_threads, model_and_prompts, one_line_errors  # noqa: E402

#: per mode, the ``ppo:`` overrides (full fine-tuning as ``ppo_vs_trl.py``'s ``ours-full`` side)
MODES = {"full": {"mode": "full", "dtype": "float32", "value_model": "separate"}, "freeze": {}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="policy's starting weights (default: params.yaml paths.base_model)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params whose ppo: and prompts: sections run")
    parser.add_argument("--mode", choices=list(MODES), default="full", help="full: every weight trains; freeze: the default")
    parser.add_argument("--prompts", type=int, default=64, help="prompts the rollout draws from (ppo_vs_trl.py's 64)")
    parser.add_argument("--rounds", type=int, default=3, help="optimisation steps timed each way")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="result JSON (default: bench/results/packed_passes_<date>.json)")
    return parser.parse_args(argv)


def captured_experience(trainer):
    """Run one update, keeping the experience its optimisation step was given."""
    kept = {}
    optimise = trainer._optimise

    def keeping(exp):
        kept["exp"] = exp
        return optimise(exp)

    trainer._optimise = keeping
    try:
        trainer.step()
    finally:
        trainer._optimise = optimise
    return kept["exp"]


def markdown(result: dict) -> str:
    lines = ["| passes | optimisation step, median s | each round (s) |", "|---|---:|---|"]
    for side in ("packed", "per_group"):
        row = result[side]
        lines.append(f"| {side.replace('_', ' ')} | {row['median_seconds']:.2f} | {', '.join(f'{s:.2f}' for s in row['seconds'])} |")
    lines.append(f"\n{result['mode']} mode, {result['groups']} length groups in the rollout; packed is "
                 f"{result['speedup']:.2f}x")  # fmt: skip
    return "\n".join(lines)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo import policy
    from rlhf_core.ppo.trainer import build_trainer
    from rlhf_core.runtime import tune_allocator

    limit_threads(args.threads)
    allocator = tune_allocator()  # as the rlhf command runs the ppo stage
    params, model_dir, prompts = model_and_prompts(REPO, args.params, args.model, args.prompts)
    cfg = PPOConfig.model_validate({**params.ppo.model_dump(), **MODES[args.mode]})
    trainer = build_trainer(cfg, model_dir, lambda p, r, f: [1.0] * len(p), prompts)
    captured_experience(trainer)  # warm-up: the allocator settles, every pass has run once
    exp = captured_experience(trainer)
    groups = len(policy.length_groups(exp.rollout.attention_mask))
    packs = policy.packs_layers
    sides = {"packed": packs, "per_group": lambda layers: False}
    seconds = {side: [] for side in sides}
    try:
        for number in range(args.rounds):
            for side in list(sides) if number % 2 == 0 else list(sides)[::-1]:
                policy.packs_layers = sides[side]
                start = time.perf_counter()
                trainer._optimise(exp)
                seconds[side].append(time.perf_counter() - start)
                print(f"round {number}: {side} {seconds[side][-1]:.2f} s", file=sys.stderr)
    finally:
        policy.packs_layers = packs
    rows = {side: {"seconds": times, "median_seconds": statistics.median(times)} for side, times in seconds.items()}
    result = write_result("packed_passes", args, {
        "model": str(model_dir), "mode": args.mode, "ppo": cfg.model_dump(), "allocator_tuned": allocator,
        "groups": groups, "rows": int(exp.mask.shape[0]), **rows,
        "speedup": rows["per_group"]["median_seconds"] / rows["packed"]["median_seconds"],
    })  # fmt: skip
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
