"""The reward model on real human judgements: held-out accuracy next to simple baselines, time and peak memory.

``accuracy FILE``: any preference file ``rlhf preferences import`` reads (HH-RLHF transcripts, TRL pairs, ...).

1. Import it, group its pairs by dialogue (the prompt: everything before the final answer) and hold out
   ``--validation-fraction`` of the dialogues, chosen by a hash of (``--seed``, dialogue) - the split the
   ``train_reward`` stage itself makes.
2. Train on the rest with the stage's code (``fit_reward_model``, ``reward:`` of ``--params``, e.g. a preset
   applied to params.yaml) and score the held-out pairs as the stage does.
3. Report held-out accuracy with its 95% Wilson interval, by length difference and calibration, next to two
   baselines on the same split: the shorter final answer wins, and a bag-of-words logistic regression on the
   final answers (chosen-minus-rejected word presence, L2 chosen on the training split by 5-fold CV).
   Wall time and the process's peak RSS (training and scoring only happen in this process).

``memory``: peak RSS and time of ``fit_reward_model`` against the number of pairs (synthetic pairs of
``reward.max_length`` tokens, each size in its own process), on a model of SmolLM2-135M's width (576) with two
layers: what the trunk states and features cost scales with width and tokens, not depth, and two layers keep
10,000 pairs inside minutes on two cores.

    .venv/bin/python bench/reward_real.py accuracy ../shared/data/hh-rlhf/harmless-base-dev-1800.jsonl.gz \\
        --params .work/hh-params.yaml
    .venv/bin/python bench/reward_real.py memory --pairs 1000,2000,5000,10000 --modes none,freeze
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    acc = actions.add_parser("accuracy", help="held-out accuracy on a preference file, next to the baselines")
    acc.add_argument("source", type=Path, help="preference file or folder (HH-RLHF, TRL pairs, ...)")
    acc.add_argument("--format", default="auto", help="importer format (default: auto)")
    acc.add_argument("--params", default=str(REPO / "params.yaml"), help="params file whose reward section trains")
    acc.add_argument("--base-model", help="base model folder (default: paths.base_model of --params)")
    acc.add_argument("--validation-fraction", type=float, help="share of dialogues held out (default: reward.validation_fraction)")
    acc.add_argument("--seed", type=int, help="split seed (default: reward.seed)")
    acc.add_argument("--work", default=str(REPO / ".work" / "bench" / "reward-real"), help="scratch folder")
    acc.add_argument("--out", default=str(REPO / "bench" / "results" / f"reward_real_{date.today()}.json"))
    mem = actions.add_parser("memory", help="peak RSS and time against the number of synthetic pairs")
    mem.add_argument("--pairs", default="1000,2000,5000,10000", help="comma list of pair counts")
    mem.add_argument("--modes", default="none,freeze", help="comma list of reward.mode values")
    mem.add_argument("--params", default=str(REPO / "params.yaml"), help="params file whose reward section trains")
    mem.add_argument("--max-length", type=int, help="tokens per synthetic conversation (default: reward.max_length)")
    mem.add_argument("--work", default=str(REPO / ".work" / "bench" / "reward-memory"), help="scratch folder")
    mem.add_argument("--out", default=str(REPO / "bench" / "results" / f"reward_real_memory_{date.today()}.json"))
    one = actions.add_parser("one-size", help=argparse.SUPPRESS)  # a single memory point, in a fresh process
    one.add_argument("pairs", type=int)
    one.add_argument("mode")
    one.add_argument("--params", required=True)
    one.add_argument("--max-length", type=int, required=True)
    one.add_argument("--work", required=True)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args(argv)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def host() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "load_average_at_start": os.getloadavg()[0],
    }


# ----------------------------------------------------------------------------- baselines


def shorter_wins(pairs: list[tuple[str, str]]) -> float:
    """Share of pairs whose chosen answer is the shorter (in characters); a tie counts half."""
    return sum((len(c) < len(r)) + 0.5 * (len(c) == len(r)) for c, r in pairs) / len(pairs)


def bag_of_words(train: list[tuple[str, str]], test: list[tuple[str, str]], seed: int) -> tuple[float, float]:
    """(held-out accuracy, L2 chosen) of a logistic regression on chosen-minus-rejected word presence.

    A Bradley-Terry model on words of the final answers only: what "which words does the better answer use"
    reaches without any language model.  Words seen at least twice in the training answers; L2 by 5-fold CV.
    """
    import re
    from collections import Counter

    import torch

    words = lambda text: set(re.findall(r"[a-z']+", text.lower()))  # noqa: E731
    counts = Counter(w for c, r in train for w in words(c) | words(r))
    vocab = {w: i for i, w in enumerate(sorted(w for w, n in counts.items() if n >= 2))}

    def features(pairs):
        x = torch.zeros(len(pairs), len(vocab), dtype=torch.float64)
        for row, (c, r) in enumerate(pairs):
            for sign, text in ((1.0, c), (-1.0, r)):
                for w in words(text):
                    if w in vocab:
                        x[row, vocab[w]] += sign
        return x

    def fit(x, l2):
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -torch.nn.functional.logsigmoid(x @ w).mean() + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    accuracy = lambda x, w: float(((x @ w > 0).double() + 0.5 * (x @ w == 0).double()).mean())  # noqa: E731
    x_train, x_test = features(train), features(test)
    folds = list(range(len(train)))
    random.Random(seed).shuffle(folds)
    best = None
    for l2 in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
        scores = []
        for k in range(5):
            held = set(folds[k::5])
            inside = [i for i in range(len(train)) if i not in held]
            scores.append(accuracy(x_train[sorted(held)], fit(x_train[inside], l2)))
        if best is None or sum(scores) > best[0]:
            best = (sum(scores), l2)
    return accuracy(x_test, fit(x_train, best[1])), best[1]


# ----------------------------------------------------------------------------- accuracy


def final_answers(groups) -> list[tuple[str, str]]:
    return [(g.responses[c.chosen], g.responses[c.rejected]) for g in groups for c in g.comparisons]


def measure_accuracy(args: argparse.Namespace) -> dict:
    import torch

    from rlhf_core.config import load_params
    from rlhf_core.errors import DataError
    from rlhf_core.importers import import_preferences
    from rlhf_core.precision import autocast
    from rlhf_core.preferences import bundle_pairs
    from rlhf_core.reward.data import group_pairs, num_pairs, split_by_prompt
    from rlhf_core.reward.metrics import conversations, preference_report, score_conversations, wilson_interval
    from rlhf_core.reward.trainer import fit_reward_model, loss_first_last

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    cfg = params.reward
    start = time.perf_counter()
    bundle = import_preferences(args.source, args.format, params.labeling.max_text_chars)
    pairs = bundle_pairs(bundle)
    if not pairs:
        raise DataError(f"{args.source}: no usable preference pairs ({len(bundle.rejects)} rejected)")
    groups = group_pairs(pairs, bundle, cfg.margin, args.source)
    fraction = args.validation_fraction or cfg.validation_fraction
    seed = cfg.seed if args.seed is None else args.seed
    train, heldout = split_by_prompt(groups, fraction, seed)
    print(f"{len(pairs)} pairs of {len(groups)} dialogues: {num_pairs(train)} train, {num_pairs(heldout)} held out")

    fit = fit_reward_model(args.base_model or params.paths.base_model, cfg, train, Path(args.work) / "checkpoints")
    device = next(fit.model.parameters()).device
    with autocast(cfg.dtype, device):
        scores = score_conversations(fit.scorer, conversations(heldout), cfg.score_batch_size, desc="scoring")
    report = preference_report(heldout, scores)
    seconds = time.perf_counter() - start
    n = report["pairs"]
    short = shorter_wins(final_answers(heldout))
    bow, bow_l2 = bag_of_words(final_answers(train), final_answers(heldout), seed)
    first, last = loss_first_last(fit.losses)
    return {
        "date": str(date.today()),
        "source": str(args.source),
        "split": {"seed": seed, "validation_fraction": fraction, "by": "dialogue (prompt before the final answer)",
                  "train_pairs": num_pairs(train), "heldout_pairs": n, "rejected_records": len(bundle.rejects)},
        "reward": cfg.model_dump(),
        "reward_model": report,
        "baselines": {
            "shorter_answer_wins": {"accuracy": short, "interval": wilson_interval(short * n, n)},
            "bag_of_words": {"accuracy": bow, "interval": wilson_interval(bow * n, n), "l2": bow_l2},
        },
        "lengths": vars(fit.lengths),
        "train_loss_first": first,
        "train_loss_last": last,
        "train_seconds": fit.seconds,
        "total_seconds": seconds,
        "peak_rss_gb": peak_rss_gb(),
        "host": {**host(), "load_average_at_end": os.getloadavg()[0]},
    }


# ----------------------------------------------------------------------------- memory


#: common words that are one token each (with their leading space) in SmolLM2's tokenizer
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see").split()


def synthetic_groups(pairs: int, tokens: int, seed: int):
    """``pairs`` one-pair dialogues of about ``tokens`` tokens each (prompt and answer in the chat template)."""
    from rlhf_core.reward.data import Comparison, PromptComparisons
    from rlhf_core.schemas import PreferencePair

    rng = random.Random(seed)
    words = max(1, tokens // 2 - 16)  # the chat template and its default system prompt take ~30 tokens
    text = lambda: " ".join(rng.choice(WORDS) for _ in range(words))  # noqa: E731
    groups = []
    for i in range(pairs):
        prompt, good, bad = text(), text() + " yes", text() + " no"
        pair = PreferencePair(prompt_id=f"p{i}", prompt=prompt, chosen_id="c", chosen=good, rejected_id="r",
                              rejected=bad, ranking_id=f"r{i}", annotator_id="synthetic")
        group = PromptComparisons(f"p{i}", prompt, ["c", "r"], [good, bad], [True, True])
        group.comparisons = [Comparison(0, 1, 0.0, 1.0, 1, pair)]
        groups.append(group)
    return groups


def one_size(args: argparse.Namespace) -> int:
    import torch

    from rlhf_core.config import load_params
    from rlhf_core.reward.trainer import fit_reward_model

    torch.set_num_threads(args.threads)
    cfg = load_params(args.params).reward.model_copy(
        update={"mode": args.mode, "read_layer": None, "freeze_layers": 1, "epochs": 1.0, "max_length": args.max_length}
    )
    groups = synthetic_groups(args.pairs, cfg.max_length, seed=0)
    start = time.perf_counter()
    fit = fit_reward_model(Path(args.work) / "base", cfg, groups, Path(args.work) / "checkpoints")
    print(json.dumps({"pairs": args.pairs, "mode": args.mode, "seconds": time.perf_counter() - start,
                      "peak_rss_gb": peak_rss_gb(), "tokens_p50": fit.lengths.p50, "cut": fit.lengths.cut}))
    return 0


def measure_memory(args: argparse.Namespace) -> dict:
    from rlhf_core.base_model import build_tiny
    from rlhf_core.config import TinyModelConfig, load_params

    work = Path(args.work)
    shape = TinyModelConfig(hidden_size=576, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                            intermediate_size=1536)
    if not (work / "base" / "config.json").exists():
        build_tiny(shape, work / "base")
    max_length = args.max_length or load_params(args.params).reward.max_length
    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        for pairs in [int(n) for n in args.pairs.split(",") if n]:
            done = subprocess.run(
                [sys.executable, __file__, "--threads", str(args.threads), "one-size", str(pairs), mode,
                 "--params", args.params, "--max-length", str(max_length), "--work", str(work)],
                capture_output=True, text=True, check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"{mode} at {pairs} pairs failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    return {"date": str(date.today()), "model": shape.model_dump(), "max_length": max_length,
            "rows": rows, "host": {**host(), "load_average_at_end": os.getloadavg()[0]}}


def main(argv: list[str] | None = None) -> int:
    from rlhf_core.errors import RLHFError

    args = parse_args(argv)
    try:
        if args.action == "one-size":
            return one_size(args)
        result = measure_accuracy(args) if args.action == "accuracy" else measure_memory(args)
    except RLHFError as exc:
        print(f"reward real: {exc}", file=sys.stderr)
        return 2
    from rlhf_core.records import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
