"""Benchmark: reward-model scoring with each shared prompt read once, against one padded pass per response.

Two workloads of the default run, on the first prompts of the shipped prompt set:

* **evaluate**: ``--prompts`` prompts with two responses each (candidate and
  reference) plus ``--pool - 1`` more on the first ``--pool-prompts`` (the
  best-of-n pools) - the evaluate stage's one proxy pass;
* **candidates**: ``--k`` responses to each of ``--prompts`` prompts - the
  reward stage's candidates, whose frozen-trunk states train_reward computes.

Responses are ``--seed``-drawn strings of 3-30 words (their length, not their
wording, sets the cost).  For each dtype (the reward model's numeric path:
fp32, or fp32 weights under bf16 autocast) and workload it times

* **grouped**: :meth:`rlhf_core.reward.RewardModel.raw_scores`, which runs each
  shared prefix once and the answers on its KV cache
  (:func:`rlhf_core.decoder.shared_prefix_states`);
* **one pass**: every whole conversation, batched by length, right-padded -
  what the project did before;

best of ``--repeats`` runs after a warm-up, and the largest score difference
between them.  The head is freshly initialised on the base model: the timing
does not depend on training.

    .venv/bin/python bench/prefix_scoring.py                      # both workloads, fp32 and bf16, the base model
    .venv/bin/python bench/prefix_scoring.py --dtypes float32 --repeats 1

Writes bench/results/prefix_scoring_<date>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # ppo_bench, also when a test imports this file

from ppo_bench.host import write_result  # noqa: E402
from ppo_bench.workload import limit_threads, model_and_prompts, one_line_errors  # noqa: E402

DTYPES = ("float32", "bfloat16")
WORDS = ("the a of answer is that you should try to be clear and helpful when it rains we go home "
         "because water plants grow slowly in spring light").split()  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="causal LM folder (default: params.yaml paths.base_model)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params whose paths, prompts: and reward: run")
    parser.add_argument("--prompts", type=int, default=124, help="prompts per workload (the default eval split has 124)")
    parser.add_argument("--pool-prompts", type=int, default=16, help="evaluate: prompts with a best-of-n pool")
    parser.add_argument("--pool", type=int, default=16, help="evaluate: best-of-n pool size")
    parser.add_argument("--k", type=int, default=4, help="candidates: responses per prompt")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--batch-size", type=int, default=128, help="rows per pass (evaluate.batch_size)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (the best counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="result JSON (default: bench/results/prefix_scoring_<date>.json)")
    return parser.parse_args(argv)


def workloads(prompts: list[str], args) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, responses) of each workload, one entry per response."""
    rng = random.Random(args.seed)

    def answers(n: int) -> list[str]:
        return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)]

    evaluate = [(p, 2 + (args.pool - 1 if i < args.pool_prompts else 0)) for i, p in enumerate(prompts)]
    shapes = {"evaluate": evaluate, "candidates": [(p, args.k) for p in prompts]}
    return {name: ([p for p, n in shape for _ in range(n)], [a for _, n in shape for a in answers(n)])
            for name, shape in shapes.items()}  # fmt: skip


def best_time(fn, repeats: int):
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(model, prompts: list[str], responses: list[str], batch_size: int, repeats: int) -> dict:
    from rlhf_core.decoder import pad_right, shared_prefix_groups
    from rlhf_core.precision import autocast
    from rlhf_core.reward.model import encode_conversations, scores_in_length_order

    sequences, _ = encode_conversations(model.tokenizer, prompts, responses, [False] * len(prompts))
    groups = shared_prefix_groups(sequences)
    computed = sum(p + sum(len(sequences[r]) - p for r in rows) if p else len(sequences[rows[0]]) for p, rows in groups)

    def one_pass():
        def batch(rows):
            ids, mask = pad_right([sequences[r] for r in rows], model.tokenizer.pad_token_id)
            return {"input_ids": ids, "attention_mask": mask}

        with autocast(model.dtype, next(model.model.parameters()).device):
            return scores_in_length_order(model.model, [len(s) for s in sequences], batch, batch_size)

    grouped_s, grouped = best_time(lambda: model.raw_scores(prompts, responses, batch_size=batch_size), repeats)
    one_pass_s, plain = best_time(one_pass, repeats)
    return {
        "responses": len(sequences), "tokens": sum(map(len, sequences)), "tokens_computed_grouped": computed,
        "groups_with_prefix": sum(1 for p, _ in groups if p), "grouped_s": grouped_s, "one_pass_s": one_pass_s,
        "speedup": one_pass_s / grouped_s, "max_abs_score_diff": float((grouped - plain).abs().max()),
    }  # fmt: skip


def markdown(result: dict) -> str:
    lines = ["| dtype | workload | responses | tokens (computed grouped) | one pass s | grouped s | speedup | max score diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['workload']} | {r['responses']} | {r['tokens']} ({r['tokens_computed_grouped']}) "
                     f"| {r['one_pass_s']:.1f} | {r['grouped_s']:.1f} | {r['speedup']:.2f}x | {r['max_abs_score_diff']:.1e} |")  # fmt: skip
    return "\n".join(lines)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.build import init_reward_head, load_sequence_classifier
    from rlhf_core.reward.model import reward_tokenizer

    limit_threads(args.threads)
    params, model_dir, prompts = model_and_prompts(REPO, args.params, args.model, args.prompts)
    tokenizer = reward_tokenizer(model_dir, params.reward.max_length)
    rows = []
    for dtype in args.dtypes:
        model = RewardModel(load_sequence_classifier(model_dir, tokenizer.pad_token_id), tokenizer, dtype=dtype)
        init_reward_head(model.model, seed=args.seed)
        for name, (ps, responses) in workloads(prompts, args).items():
            row = {"dtype": dtype, "workload": name, **measure(model, ps, responses, args.batch_size, args.repeats)}
            rows.append(row)
            print(f"{dtype} {name}: one pass {row['one_pass_s']:.1f} s, grouped {row['grouped_s']:.1f} s", file=sys.stderr)
    result = write_result("prefix_scoring", args, {"model": str(model_dir), "rows": rows})
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
