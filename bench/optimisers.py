"""Benchmark: PPO, RLOO, GRPO, DPO and best-of-n from the reference on one gold-vs-KL frontier, seeds 0-2.

Every optimiser starts from the same policy (the pipeline's starting policy: the SFT
model when the sft stage trained one, else paths.base_model) and trains on the
default data against the default reward model (paths.reward_model) with the
params' ``ppo:`` section, at equal budgets: PPO, RLOO and GRPO sample the same
``ppo.updates x ppo.batch_size`` responses of at most ``ppo.max_new_tokens``
tokens; DPO learns from the same preference pairs (paths.preferences).  Along
each run, every ``--measure-every`` updates, the policy is measured the same way
for all: responses to the first ``--eval-prompts`` held-out prompts (fixed seed),
their gold and proxy score, and the sequence KL(policy || reference) on them
(:class:`rlhf_core.optimisers.session.GoldSlice`).  Best-of-n from the
reference (KL = log n - (n-1)/n) is drawn on the same prompts.

Each run is a fresh subprocess (peak RSS per algorithm); wall time excludes the
measurements.  Output: bench/results/optimisers_<date>.json (every point, every
timing, machine load) and .png, and a markdown table on stdout: gold at fixed
KLs (mean over seeds, 95% t-interval), the winning optimiser at each KL and
best-of-n's lead over it, wall time, peak memory and seconds per 1,000
episodes.  The JSON is replaced after every run, so a killed benchmark keeps
the runs that finished (``--report FILE`` tabulates it, ``--resume`` runs the
rest).

    .venv/bin/python bench/optimisers.py                          # the full budget: params.yaml as it is, seeds 0-2
    .venv/bin/python bench/optimisers.py --updates 4 --eval-prompts 16   # a reduced budget
    .venv/bin/python bench/optimisers.py --updates 4 --out FILE --resume  # run only what FILE lacks
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALGORITHMS = ("ppo", "rloo", "grpo", "dpo")
KL_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% Student t by degrees of freedom


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params whose paths and ppo: section run")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--updates", type=int, help="override ppo.updates (default: params.yaml's, the full budget)")
    parser.add_argument("--measure-every", type=int, default=2, help="updates between measurements along a run")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts every measurement samples")
    parser.add_argument("--best-of-n", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="result JSON (default: bench/results/optimisers_<date>.json)")
    parser.add_argument("--report", metavar="JSON", help="table and plot of a result file")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the runs already in --out (same budget and measurements) and run only the missing ones",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- one run (in a subprocess)


def _setup(job: dict):
    import torch

    from rlhf_core.artifacts import Layout
    from rlhf_core.base_model import load_causal_lm
    from rlhf_core.config import load_params, with_overrides
    from rlhf_core.gold import gold_score
    from rlhf_core.optimisers.session import GoldSlice
    from rlhf_core.reward import RewardModel

    torch.set_num_threads(job["threads"])
    params = with_overrides(load_params(job["params"]), job["overrides"])
    layout = Layout(params.paths)
    reward = RewardModel.load(params.paths.reward_model)
    cfg = params.ppo

    def score_fn(prompts, responses, finished):
        return reward.score(prompts, responses, finished, batch_size=cfg.batch_size)

    prompts = [p.text for p in layout.prompts.read_eval()][: job["eval_prompts"]]
    start = str(layout.starting_policy.require())  # what the ppo stage starts from and keeps as its reference
    reference = load_causal_lm(start, dtype="float32").eval()
    probe = GoldSlice(prompts, gold_score, score_fn, 1234, cfg.max_new_tokens, cfg.temperature, reference=reference)
    return params, layout, score_fn, probe, start


class Timed:
    """A probe that keeps the seconds it spends, so that the run's wall time can leave them out."""

    def __init__(self, probe):
        self.probe, self.seconds, self.reference = probe, 0.0, probe.reference

    def measure(self, model, tokenizer) -> dict[str, float]:
        start = time.perf_counter()
        try:
            return self.probe.measure(model, tokenizer)
        finally:
            self.seconds += time.perf_counter() - start


def run_algorithm(job: dict) -> dict:
    """Train one algorithm with one seed; its measured points, wall time and peak memory."""
    params, layout, score_fn, probe, start_policy = _setup(job)
    cfg, algorithm = params.ppo, job["algorithm"]
    timed = Timed(probe)
    start = time.perf_counter()
    if algorithm == "ppo":
        points = _run_ppo(cfg, start_policy, score_fn, [p.text for p in layout.prompts.read_train()], timed)
    else:
        gold = timed  # the TRL runs measure through their curve's gold slice
        with tempfile.TemporaryDirectory() as scratch:
            if algorithm == "dpo":
                from rlhf_core.optimisers.dpo import train_dpo, update_count

                pairs = layout.preferences.read_pairs()
                # as many measurements along the run as the sampling algorithms get, however many steps an epoch is
                measurements = max(1, math.ceil(cfg.updates / cfg.gold_eval_every))
                every = max(1, math.ceil(update_count(cfg, len(pairs)) / measurements))
                cfg = cfg.model_copy(update={"gold_eval_every": every})
                trained = train_dpo(cfg, start_policy, pairs, scratch, gold=gold)
            else:
                from rlhf_core.optimisers.online import train_online

                train = [p.text for p in layout.prompts.read_train()]
                trained = train_online(algorithm, cfg, start_policy, score_fn, train, scratch, gold=gold)
        points = [
            {"update": r["update"], **{k: r[f"{algorithm}/{k}"] for k in ("kl", "gold", "gold_proxy")}}
            for r in trained.history if f"{algorithm}/gold" in r
        ]  # fmt: skip
    wall = time.perf_counter() - start - timed.seconds
    episodes = 0 if algorithm == "dpo" else cfg.updates * cfg.batch_size
    return {
        "algorithm": algorithm, "seed": cfg.seed, "points": points, "train_seconds": wall, "episodes": episodes,
        "seconds_per_1000_episodes": 1000 * wall / episodes if episodes else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }  # fmt: skip


def _run_ppo(cfg, start, score_fn, prompts, probe) -> list[dict]:
    """Our engine, update by update; the policy is exported and measured like the others'."""
    from rlhf_core.base_model import load_causal_lm, load_tokenizer
    from rlhf_core.ppo.policy import export_policy
    from rlhf_core.ppo.trainer import build_trainer

    trainer = build_trainer(cfg, start, score_fn, prompts)
    tokenizer = load_tokenizer(start)

    def measured(update: int) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            export_policy(trainer.policy, cfg, start, Path(tmp) / "policy", tokenizer)
            model = load_causal_lm(Path(tmp) / "policy", dtype="float32").eval()
        return {"update": update, **probe.measure(model, tokenizer)}

    points = [{"update": 0, "kl": 0.0, **{k: v for k, v in measured(0).items() if k != "kl"}}]
    while trainer.update < cfg.updates:
        trainer.step()
        if trainer.update % cfg.gold_eval_every == 0 or trainer.update == cfg.updates:
            points.append(measured(trainer.update))
    return points


def run_best_of_n(job: dict) -> dict:
    """The best-of-n frontier from the reference on the measurement prompts."""
    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.evaluation.best_of_n import frontier
    from rlhf_core.generation import sample_completions

    params, _, score_fn, probe, start_policy = _setup(job)
    ns = job["best_of_n"]
    samples, _ = sample_completions(
        probe.reference, load_tokenizer(start_policy), list(probe.prompts), num_samples=max(ns),
        max_new_tokens=params.ppo.max_new_tokens, temperature=params.ppo.temperature, batch_size=64, seed=probe.seed,
    )  # fmt: skip
    prompts = [probe.prompts[s.prompt_index] for s in samples]
    proxy = score_fn(prompts, [s.text for s in samples], [s.finished for s in samples]).tolist()
    gold = [probe.gold_fn(p, s.text) for p, s in zip(prompts, samples)]
    k = max(ns)
    pools = lambda values: [values[i : i + k] for i in range(0, len(values), k)]  # noqa: E731
    return {"algorithm": "best_of_n", "points": [
        {"n": p.n, "kl": p.kl, "gold": p.gold, "gold_proxy": p.proxy} for p in frontier(pools(proxy), pools(gold), ns)
    ]}  # fmt: skip


# --------------------------------------------------------------------------- summary


def gold_at(points: list[dict], kl: float, key: str = "gold") -> float | None:
    """``key`` at ``kl`` along a run, linearly between the measured points sorted by KL (None outside their range)."""
    ordered = sorted((p["kl"], p[key]) for p in points if p.get("kl") is not None and p.get(key) is not None)
    for (k0, v0), (k1, v1) in zip(ordered, ordered[1:]):
        if k0 <= kl <= k1:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return None


def interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95% t-interval over seeds."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarise(runs: list[dict], bon: dict | None) -> dict:
    table = {}
    for kl in KL_GRID:
        row = {}
        for algorithm in ALGORITHMS:
            values = [v for r in runs if r["algorithm"] == algorithm and (v := gold_at(r["points"], kl)) is not None]
            if values:
                row[algorithm] = {"gold": interval(values), "seeds": len(values)}
        # the winner among the optimisers; best-of-n (one draw from the reference, no seeds) is the yardstick beside it
        ranked = sorted(row, key=lambda a: row[a]["gold"][0], reverse=True)
        if ranked:
            best = row[ranked[0]]["gold"]
            runner = row[ranked[1]]["gold"] if len(ranked) > 1 else None
            separated = runner is not None and not math.isnan(best[1]) and not math.isnan(runner[2]) and best[1] > runner[2]
            row["winner"] = {"algorithm": ranked[0], "by": best[0] - runner[0] if runner else None,
                             "intervals_separate": separated}  # fmt: skip
        if bon:
            value = gold_at(bon["points"], kl)
            if value is not None:
                row["best_of_n"] = {"gold": (value, math.nan, math.nan), "seeds": 1}
                if ranked:
                    row["winner"]["best_of_n_ahead_by"] = value - best[0]
        table[str(kl)] = row
    cost = {}
    for algorithm in ALGORITHMS:
        mine = [r for r in runs if r["algorithm"] == algorithm]
        if mine:
            per_1000 = [r["seconds_per_1000_episodes"] for r in mine if r["seconds_per_1000_episodes"]]
            cost[algorithm] = {
                "train_seconds": interval([r["train_seconds"] for r in mine]),
                "peak_rss_gib": max(r["peak_rss_gib"] for r in mine),
                "seconds_per_1000_episodes": interval(per_1000) if per_1000 else None,
                "final_kl": interval([r["points"][-1]["kl"] for r in mine]),
                "final_gold": interval([r["points"][-1]["gold"] for r in mine]),
                "final_proxy": interval([r["points"][-1]["gold_proxy"] for r in mine]),
            }
    return {"gold_at_kl": table, "cost": cost}


def _fmt(triple) -> str:
    if triple is None:
        return "-"
    mean, low, high = triple
    return f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown(summary: dict) -> str:
    names = [a for a in (*ALGORITHMS, "best_of_n") if any(a in row for row in summary["gold_at_kl"].values())]
    lines = ["| KL (nats) | " + " | ".join(names) + " | winner |", "|---" * (len(names) + 2) + "|"]
    for kl, row in summary["gold_at_kl"].items():
        cells = [_fmt(row[a]["gold"]) if a in row else "-" for a in names]
        win = row.get("winner")
        verdict = "-" if not win else f"{win['algorithm']}" + (f" by {win['by']:.3f}" if win["by"] is not None else "") + (
            "" if win["intervals_separate"] else " (intervals overlap)" if win["by"] is not None else "")
        if win and "best_of_n_ahead_by" in win:
            verdict += f"; best-of-n {win['best_of_n_ahead_by']:+.3f}"
        lines.append(f"| {kl} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "| algorithm | final KL | final gold | final proxy | train s | s / 1,000 episodes | peak RSS GiB |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for a, c in summary["cost"].items():
        lines.append(f"| {a} | {_fmt(c['final_kl'])} | {_fmt(c['final_gold'])} | {_fmt(c['final_proxy'])} | "
                     f"{_fmt(c['train_seconds'])} | {_fmt(c['seconds_per_1000_episodes'])} | {c['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def plot(runs: list[dict], bon: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for algorithm, colour in zip(ALGORITHMS, ("C0", "C1", "C2", "C3")):
        for i, run in enumerate(r for r in runs if r["algorithm"] == algorithm):
            xs, ys = zip(*sorted((p["kl"], p["gold"]) for p in run["points"]))
            axis.plot(xs, ys, "o-", color=colour, alpha=0.6, label=algorithm if i == 0 else None)
    if bon:
        axis.plot([p["kl"] for p in bon["points"]], [p["gold"] for p in bon["points"]], "k--s", label="best-of-n")
    axis.set_xlabel("KL(policy || reference), nats per response")
    axis.set_ylabel("gold score (held-out prompts)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------- main


def _child(job: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{job['algorithm']} seed {job.get('seed')}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _earlier(out: Path, base: dict, overrides: dict) -> dict | None:
    """The result file to resume (None when there is none yet); a file of another budget or measurement stops."""
    if not out.exists():
        return None
    try:
        earlier = json.loads(out.read_text())
        same = earlier["overrides"] == overrides and all(earlier["args"][k] == v for k, v in base.items())
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"--resume: {out} is not a result of this benchmark ({error})") from None
    if not same:
        raise SystemExit(f"--resume: {out} measured another budget or other measurements; choose another --out")
    return earlier


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(run_best_of_n(job) if job["algorithm"] == "best_of_n" else run_algorithm(job)))
        return 0
    from rlhf_core.records import atomic_write_text

    if args.report:
        result = json.loads(Path(args.report).read_text())
        plot(result["runs"], result["best_of_n"], Path(args.report).with_suffix(".png"))
        print(markdown(summarise(result["runs"], result["best_of_n"])))
        return 0
    base = {"params": args.params, "threads": args.threads, "eval_prompts": args.eval_prompts, "best_of_n": args.best_of_n}
    overrides = {"ppo.gold_eval_every": str(args.measure_every), "ppo.checkpoint_every": "1000000"}
    if args.updates:
        overrides["ppo.updates"] = str(args.updates)
    out = Path(args.out or REPO / "bench" / "results" / f"optimisers_{datetime.date.today()}.json")
    earlier = _earlier(out, base, overrides) if args.resume else None
    load = (earlier["load_averages"] if earlier else []) + [os.getloadavg()]
    start = time.time() - (earlier["wall_seconds"] if earlier else 0.0)  # a resumed file's wall time goes on

    def save(runs: list[dict], complete: bool) -> dict:
        """The result so far, replaced atomically after every run: a kill keeps the runs that finished."""
        summary = summarise(runs, bon)
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args), "overrides": overrides,
            "load_averages": load, "cpus": os.cpu_count(), "wall_seconds": time.time() - start, "complete": complete,
            "best_of_n": bon, "runs": runs, "summary": summary,
        }  # fmt: skip
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")
        return summary

    bon = earlier["best_of_n"] if earlier else _child({**base, "algorithm": "best_of_n", "overrides": overrides})
    runs: list[dict] = list(earlier["runs"]) if earlier else []
    done = {(r["algorithm"], r["seed"]) for r in runs}
    # the sampling algorithms first, DPO (the longest) last: a stopped benchmark has the most comparisons
    order = sorted(args.algorithms, key=lambda a: a == "dpo")
    for algorithm, seed in ((a, s) for a in order for s in args.seeds if (a, s) not in done):
        job = {**base, "algorithm": algorithm, "seed": seed,
               "overrides": {**overrides, "ppo.seed": str(seed), "ppo.algorithm": algorithm}}  # fmt: skip
        runs.append(_child(job))
        load.append(os.getloadavg())
        save(runs, complete=False)
        print(f"{algorithm} seed {seed}: {runs[-1]['train_seconds']:.0f} s", file=sys.stderr)
    summary = save(runs, complete=True)
    plot(runs, bon, out.with_suffix(".png"))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
