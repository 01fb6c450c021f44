"""Benchmark: the sampler dropping rows that ended against the sampler running them to the end, side by side.

:func:`rlhf_core.generation.sample_tokens` stops running a row once it has
emitted the stop token (as soon as :data:`rlhf_core.generation.DROP_ENDED` of
the rows a step runs have ended).  Here the first ``--prompts`` prompts of the
shipped set, sorted by length as the stages sort them, are sampled ``--k``
times each, in batches of ``--batch`` sequences, from a policy that stops (by
default the SFT model, ``paths.sft_model``: the base model's answers mostly run
to the limit), once dropping ended rows and once keeping them (``DROP_ENDED``
above 1).  The two runs of a batch take turns - which goes first alternates
from batch to batch - and use the same seed, so that a drifting load hits both
alike and the tokens must come out identical (``identical_tokens``).  Besides
the seconds, the decode steps' rows are counted: ``row_steps`` is the work the
steps did, which dropping cuts by the share of rows that had ended.

    .venv/bin/python bench/ended_rows.py                           # SFT model, 128 prompts x 4, 32 tokens
    .venv/bin/python bench/ended_rows.py --new-tokens 64

Writes bench/results/ended_rows_<date>.json and prints a markdown table (bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # ppo_bench, also when a test imports this file

from ppo_bench.host import write_result  # noqa: E402
from ppo_bench.workload import limit_threads, model_and_prompts, one_line_errors  # noqa: E402

#: a share above 1: no step ever has that many ended rows, so none is dropped
KEEP_ALL = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="policy folder (default: params.yaml paths.sft_model)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params whose paths and prompts: section run")
    parser.add_argument("--prompts", type=int, default=128, help="prompts sampled (candidates.max_prompts)")
    parser.add_argument("--k", type=int, default=4, help="answers per prompt (candidates.k)")
    parser.add_argument("--batch", type=int, default=128, help="sequences per sampling batch (candidates.batch_size)")
    parser.add_argument("--new-tokens", type=int, default=32, help="most tokens per answer (candidates.max_new_tokens)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="result JSON (default: bench/results/ended_rows_<date>.json)")
    return parser.parse_args(argv)


def timed_batch(model, tokenizer, prompts: list[str], args, seed: int, share: float) -> tuple[object, float, int]:
    """(rollout, seconds, rows run by the decode steps) of one batch sampled with ``DROP_ENDED = share``."""
    import torch

    from rlhf_core import generation
    from rlhf_core.decoder import DecodeStep

    class Counting(DecodeStep):
        rows = 0

        def __call__(self, input_ids, attention_mask, position_ids, cache):
            if input_ids.shape[1] == 1:  # a decode step (the prompt pass is the same either way)
                Counting.rows += input_ids.shape[0]
            return super().__call__(input_ids, attention_mask, position_ids, cache)

    ids, mask = generation.encode_queries(tokenizer, prompts)
    saved, generation.DROP_ENDED = generation.DROP_ENDED, share
    try:
        start = time.perf_counter()
        rollout = generation.sample_tokens(
            Counting(model), ids, mask, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=args.new_tokens, generator=torch.Generator().manual_seed(seed), num_samples=args.k,
        )  # fmt: skip
        return rollout, time.perf_counter() - start, Counting.rows
    finally:
        generation.DROP_ENDED = saved


def markdown(result: dict) -> str:
    lines = ["| sampler | seconds | tokens/s | decode row-steps |", "|---|---|---|---|"]
    for side in ("dropping", "keeping"):
        row = result[side]
        lines.append(f"| {side} ended rows | {row['seconds']:.1f} | {row['tokens_per_s']:.0f} | {row['row_steps']} |")
    lines.append(f"\n{result['tokens']} tokens, {result['finished_share']:.0%} of answers ended before the limit; "
                 f"dropping is {result['speedup']:.2f}x, with {result['row_step_share']:.0%} of the row-steps; "
                 f"identical tokens: {result['identical_tokens']}")  # fmt: skip
    return "\n".join(lines)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from rlhf_core import generation
    from rlhf_core.config import load_params

    limit_threads(args.threads)
    model_arg = args.model or str(REPO / load_params(args.params).paths.sft_model)
    _, model_dir, prompts = model_and_prompts(REPO, args.params, model_arg, args.prompts)
    model, tokenizer = generation.load_policy(model_dir, args.dtype)
    prompts.sort(key=len)  # as sample_completions orders them
    per_batch = max(1, args.batch // args.k)
    sides = {share: {"seconds": 0.0, "row_steps": 0} for share in (generation.DROP_ENDED, KEEP_ALL)}
    tokens = finished = answers = 0
    identical = True
    for number, first in enumerate(range(0, len(prompts), per_batch)):
        chunk, seed = prompts[first : first + per_batch], args.seed + number
        order = list(sides) if number % 2 == 0 else list(sides)[::-1]
        rollouts = {}
        for share in order:
            rollouts[share], seconds, rows = timed_batch(model, tokenizer, chunk, args, seed, share)
            sides[share]["seconds"] += seconds
            sides[share]["row_steps"] += rows
        dropped, kept = rollouts[generation.DROP_ENDED], rollouts[KEEP_ALL]
        identical &= torch.equal(dropped.response_ids, kept.response_ids)
        tokens += int(kept.response_mask.sum())
        finished += int(kept.finished.sum())
        answers += kept.finished.numel()
        print(f"batch {number}: {len(chunk) * args.k} answers, dropping {sides[generation.DROP_ENDED]['seconds']:.1f} s, "
              f"keeping {sides[KEEP_ALL]['seconds']:.1f} s so far", file=sys.stderr)  # fmt: skip
    dropping, keeping = sides[generation.DROP_ENDED], sides[KEEP_ALL]
    for side in (dropping, keeping):
        side["tokens_per_s"] = tokens / side["seconds"] if side["seconds"] > 0 else 0.0
    result = write_result("ended_rows", args, {
        "model": str(model_dir), "drop_ended": generation.DROP_ENDED, "tokens": tokens, "answers": answers,
        "finished_share": finished / answers if answers else 0.0, "dropping": dropping, "keeping": keeping,
        "speedup": keeping["seconds"] / dropping["seconds"] if dropping["seconds"] > 0 else 0.0,
        "row_step_share": dropping["row_steps"] / keeping["row_steps"] if keeping["row_steps"] else 1.0,
        "identical_tokens": identical,
    })  # fmt: skip
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
