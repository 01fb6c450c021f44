"""Reward-model learning curve: held-out accuracy against the number of training comparisons, next to its ceilings.

How many comparisons does the reward model need before it agrees with the labels as well as the gold rubric
that generated them?  On simulated labels:

1. Data: ``--k`` candidates for each training prompt of the prompts stage (``paths.prompts/train.jsonl``, at
   most ``--prompts``) from the base model with params.yaml's ``candidates`` settings, ranked by the simulated
   annotators of ``labeling`` - or an existing preference folder (``--preferences``).
2. A fixed held-out split by prompt (``reward.validation_fraction``, ``reward.seed``), read on the pairs among
   each held-out prompt's first ``--eval-k`` completions (the pipeline's K), so every point is measured on the
   same pairs; its ceiling is the gold rubric's own accuracy on them.
3. For each training size (nested random subsets of the other prompts) and each ``--train-k``:
   * ``reward``: the ``train_reward`` recipe as params.yaml sets it (``fit_reward_model``);
   * ``probe``: a Bradley-Terry linear head on the frozen base model's last-token features (no fine-tuning);
   * ``rubric``: the same head on the gold rubric's six components - what perfect features reach.

    .venv/bin/python bench/reward_scaling.py                                   # ~45 min on the 2-core CPU
    .venv/bin/python bench/reward_scaling.py --preferences DIR --sizes 50,100,all --methods reward

Writes the figures as JSON (``--out``) and a plot of accuracy against training pairs (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import date
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("reward", "probe", "rubric")
RUBRIC = ("relevance", "length", "ending", "repetition", "tone", "markup")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params file whose sections are used")
    parser.add_argument("--base-model", help="base model folder (default: paths.base_model)")
    parser.add_argument("--preferences", help="existing preference folder (pairs.jsonl ...) instead of sampling one")
    parser.add_argument("--prompts", type=int, default=1000, help="training prompts to sample candidates for (at most)")
    parser.add_argument("--k", type=int, default=8, help="candidates sampled per prompt")
    parser.add_argument("--eval-k", type=int, help="held-out pairs are those among each prompt's first N (default: candidates.k)")
    parser.add_argument("--train-k", default="4", help="comma list: train on pairs among each prompt's first N completions")
    parser.add_argument("--sizes", default="50,100,200,all", help="comma list of training prompt counts ('all': every one)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--work", default=str(REPO / ".work" / "bench" / "reward-scaling"), help="scratch folder")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / f"reward_scaling_{date.today()}.json"))
    parser.add_argument("--plot", help="PNG of the curve (default: --out with .png)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training subsets")
    return parser.parse_args(argv)


def int_list(text: str, name: str, allow_all: bool = False) -> list[int | None]:
    """``"50,100,all"`` -> [50, 100, None]; anything else is a usage error that names the option."""
    from rlhf_core.errors import RLHFError

    out: list[int | None] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if allow_all and item == "all":
            out.append(None)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise RLHFError(f"{name}: {item!r} is not a positive whole number" + (" or 'all'" if allow_all else ""))
    if not out:
        raise RLHFError(f"{name}: empty")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rlhf_core.config import load_params
    from rlhf_core.errors import RLHFError

    try:
        sizes = int_list(args.sizes, "--sizes", allow_all=True)
        train_ks = int_list(args.train_k, "--train-k")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise RLHFError(f"--methods: {', '.join(unknown) or 'empty'} (choose from {', '.join(METHODS)})")
        return measure(args, load_params(args.params), sizes, train_ks, methods)
    except RLHFError as exc:
        print(f"reward scaling: {exc}", file=sys.stderr)
        return 2


def sample_preferences(args: argparse.Namespace, params, base_model: Path, work: Path) -> Path:
    """Candidates from the base model for the training prompts, ranked by the simulated annotators."""
    from rlhf_core.artifacts import BundleFolder, Layout
    from rlhf_core.preferences import bundle_pairs
    from rlhf_core.stages.collect_preferences import simulated_bundle, write_outputs
    from rlhf_core.stages.generate_candidates import generate

    prompts = Layout(params.paths).prompts.read_train()[: args.prompts]
    cfg = params.candidates.model_copy(update={"k": args.k})
    completions, stats = generate(cfg, prompts, base_model, "base")
    print(f"sampled {len(completions)} candidates ({stats.tokens_per_second:.0f} tokens/s)")
    candidates = work / "candidates"
    BundleFolder(candidates).write_candidates(prompts, completions)
    bundle = simulated_bundle(candidates, params.labeling)
    preferences = work / "preferences"
    write_outputs(preferences, bundle, bundle_pairs(bundle))
    return preferences


def first_k(group, k: int, position: dict[str, int]):
    """The group restricted to the first ``k`` of its completions in sampling order, and the comparisons among them.

    Sampling order, not the group's own (which follows the pairs, so the first annotator's favourites come first).
    """
    from rlhf_core.reward.data import Comparison, PromptComparisons

    kept = sorted(range(len(group.completion_ids)), key=lambda i: position.get(group.completion_ids[i], i))[:k]
    new_index = {old: new for new, old in enumerate(kept)}
    comparisons = [
        Comparison(new_index[c.chosen], new_index[c.rejected], c.margin, c.weight, c.rank_distance, c.pair)
        for c in group.comparisons
        if c.chosen in new_index and c.rejected in new_index
    ]
    return PromptComparisons(group.prompt_id, group.prompt, [group.completion_ids[i] for i in kept],
                             [group.responses[i] for i in kept], [group.finished[i] for i in kept], comparisons)  # fmt: skip


def pair_rows(groups, index: dict) -> list[tuple[int, int, float]]:
    """(chosen row, rejected row, weight) of every comparison, rows into the completion table ``index``."""
    return [
        (index[(g.prompt, g.responses[c.chosen])], index[(g.prompt, g.responses[c.rejected])], c.weight)
        for g in groups
        for c in g.comparisons
    ]


def agreement(scores, rows: list[tuple[int, int, float]]) -> float:
    """Share of pairs whose chosen side scores higher (a tie counts half): the stage's ``pairwise_accuracy``."""
    import torch

    from rlhf_core.reward.metrics import pairwise_accuracy

    chosen = torch.tensor([a for a, _, _ in rows])
    rejected = torch.tensor([b for _, b, _ in rows])
    return pairwise_accuracy(scores[chosen] - scores[rejected])


def last_token_features(model_dir: Path, cfg, items: list[tuple[str, str, bool]]):
    """The frozen base model's final (normalised) hidden state at the last token the reward head would read."""
    import torch
    from tqdm.auto import tqdm

    from rlhf_core.reward.build import load_sequence_classifier
    from rlhf_core.reward.model import encode_conversations, finished_flags, pad_right, reward_tokenizer

    tokenizer = reward_tokenizer(model_dir, cfg.max_length)
    prompts, responses, finished = zip(*items)
    flags = finished_flags(list(prompts), list(finished), cfg.read_stop_token)
    sequences, _ = encode_conversations(tokenizer, list(prompts), list(responses), flags)
    model = load_sequence_classifier(model_dir, tokenizer.pad_token_id).eval()
    features = torch.zeros(len(sequences), model.config.hidden_size)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with torch.no_grad():
        for first in tqdm(range(0, len(order), cfg.score_batch_size), desc="frozen features", unit="batch"):
            rows = order[first : first + cfg.score_batch_size]
            input_ids, mask = pad_right([sequences[i] for i in rows], tokenizer.pad_token_id)
            hidden = model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            features[rows] = hidden[torch.arange(len(rows)), mask.sum(1) - 1].float()
    return features


def fit_head(features, rows: list[tuple[int, int, float]], l2: float):
    """Scores of every completion under the Bradley-Terry linear head fitted on the pairs ``rows``."""
    import torch

    from rlhf_core.reward.probe import fit_linear_head

    chosen = torch.tensor([a for a, _, _ in rows])
    rejected = torch.tensor([b for _, b, _ in rows])
    weight = torch.tensor([w for _, _, w in rows], dtype=torch.float32)
    head = fit_linear_head(features[chosen], features[rejected], torch.zeros(len(rows)), weight, l2)
    return features @ head


def measure(args: argparse.Namespace, params, sizes: list[int | None], train_ks: list[int], methods: list[str]) -> int:
    import torch

    from rlhf_core.artifacts import ModelFolder
    from rlhf_core.gold import gold_components
    from rlhf_core.preferences import PreferenceBundle
    from rlhf_core.reward.data import load_prompt_comparisons, split_by_prompt
    from rlhf_core.reward.metrics import conversations, score_conversations
    from rlhf_core.reward.trainer import fit_reward_model

    torch.set_num_threads(args.threads)
    cfg = params.reward
    model = ModelFolder(Path(args.base_model or params.paths.base_model), "base_model")
    if not model.exists():
        from rlhf_core.errors import RLHFError

        raise RLHFError(f"{model.folder}: no base model there (run `rlhf base-model` first, or pass --base-model)")
    base_model = model.folder
    layers = json.loads(model.config.read_text()).get("num_hidden_layers", cfg.freeze_layers + 1)
    cfg = cfg.model_copy(update={"freeze_layers": min(cfg.freeze_layers, layers - 1)})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    preferences = Path(args.preferences) if args.preferences else sample_preferences(args, params, base_model, work)
    groups = load_prompt_comparisons(preferences, cfg.margin)
    train, validation = split_by_prompt(groups, cfg.validation_fraction, cfg.seed)
    eval_k = args.eval_k or params.candidates.k
    bundle = PreferenceBundle.read(preferences)
    position = {c.id: n for n, c in enumerate(bundle.completions)}
    validation = [first_k(g, eval_k, position) for g in validation]

    items = sorted({item for g in groups for item in conversations([g])})
    index = {(prompt, response): row for row, (prompt, response, _) in enumerate(items)}
    parts = [gold_components(prompt, response) for prompt, response, _ in items]
    gold = torch.tensor([p["gold"] for p in parts])
    heldout = pair_rows(validation, index)
    heldout_by_gold = [(a, b, w) if gold[a] >= gold[b] else (b, a, w) for a, b, w in heldout]  # the gold rubric's order
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "versions": {name: metadata.version(name) for name in ("torch", "transformers", "trl")},
        "base_model": str(base_model),
        "preferences": str(preferences),
        "reward_config": cfg.model_dump(),
        "train_prompts_available": len(train),
        "heldout_prompts": len(validation),
        "heldout_pairs": len(heldout),
        "eval_k": eval_k,
        "ceiling": {"gold_accuracy": agreement(gold, heldout)},
        "points": [],
    }
    print(f"held-out: {len(validation)} prompts, {len(heldout)} pairs; gold rubric's accuracy on them "
          f"{report['ceiling']['gold_accuracy']:.3f}")  # fmt: skip
    features = {}
    if "rubric" in methods:
        features["rubric"] = torch.tensor([[p[name] for name in RUBRIC] for p in parts])
    if "probe" in methods:
        start = time.perf_counter()
        features["probe"] = last_token_features(base_model, cfg, items)
        print(f"frozen features of {len(items)} completions: {time.perf_counter() - start:.0f} s")

    order = list(train)
    random.Random(args.seed).shuffle(order)
    for size in sorted({min(s or len(order), len(order)) for s in sizes}):
        for k in train_ks:
            subset = [first_k(g, k, position) for g in order[:size]]
            rows = pair_rows(subset, index)
            for method in methods:
                start = time.perf_counter()
                if method == "reward":
                    fit = fit_reward_model(base_model, cfg, subset, work / "trainer")
                    scored = score_conversations(fit.scorer, conversations(subset) + conversations(validation), cfg.score_batch_size)
                    scores = torch.zeros(len(items))
                    for (prompt, response, _), value in scored.items():
                        scores[index[(prompt, response)]] = value
                else:
                    scores = fit_head(features[method], rows, cfg.probe_l2 if method == "probe" else 1e-3)
                point = {
                    "method": method, "train_prompts": size, "train_k": k, "train_pairs": len(rows),
                    "heldout_accuracy": round(agreement(scores, heldout), 4),
                    "heldout_gold_agreement": round(agreement(scores, heldout_by_gold), 4),
                    "train_accuracy": round(agreement(scores, rows), 4),
                    "seconds": round(time.perf_counter() - start, 1),
                }  # fmt: skip
                report["points"].append(point)
                print(json.dumps(point), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot_curve(report, plot)
    print(f"wrote {out} and {plot}")
    return 0


def plot_curve(report: dict, out: Path) -> Path:
    """Held-out accuracy against training pairs (log scale), one line per method and K, the ceiling drawn across."""
    from rlhf_core.evaluation.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines: dict[tuple[str, int], list[dict]] = {}
    for point in report["points"]:
        lines.setdefault((point["method"], point["train_k"]), []).append(point)
    for (method, k), points in sorted(lines.items()):
        points.sort(key=lambda p: p["train_pairs"])
        ax.plot([p["train_pairs"] for p in points], [p["heldout_accuracy"] for p in points], marker="o",
                label=f"{method} (K={k})")  # fmt: skip
    ceiling = report["ceiling"]["gold_accuracy"]
    ax.axhline(ceiling, color="black", linewidth=1, label=f"gold rubric {ceiling:.3f}")
    ax.axhline(ceiling - 0.05, color="black", linewidth=1, linestyle="--", label="gold rubric - 5 points")
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("training pairs")
    ax.set_ylabel(f"held-out pairwise accuracy ({report['heldout_pairs']} pairs)")
    ax.set_title("Reward model learning curve")
    ax.legend(fontsize=8)
    return _save(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
